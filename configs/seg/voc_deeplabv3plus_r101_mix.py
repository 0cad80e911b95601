# DeepLabV3+ R101-D8 trained on real + generated voc pairs (ConcatDataset), real val split.
#   CONFIG=configs/seg/voc_deeplabv3plus_r101_mix.py GPUS=4 bash scripts/seg/voc_deeplabv3plus_r101.sh \
#       --cfg-options train_dataloader.dataset.datasets.0.data_root=DIR
# The synthetic part is train_dataloader.dataset.datasets.0, the real part .datasets.1.
_base_ = ["./voc_deeplabv3plus_r101_synthetic.py"]
train_dataloader = dict(
    dataset=dict(
        _delete_=True,
        type="ConcatDataset",
        datasets=[_base_.synthetic_train, _base_.real_train],
    )
)
