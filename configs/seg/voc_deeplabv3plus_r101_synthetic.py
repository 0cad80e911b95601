# DeepLabV3+ R101-D8 trained on generated voc pairs, evaluated on the real voc val split.
#   GPUS=4 bash scripts/seg/voc_deeplabv3plus_r101.sh \
#       --cfg-options train_dataloader.dataset.data_root=DIR
_base_ = ["./voc_deeplabv3plus_r50_synthetic.py"]
model = dict(backbone=dict(depth=101))
