# DeepLabV3+ R50-D8 trained on generated voc pairs, evaluated on the real voc val split.
#   CONFIG=configs/seg/voc_deeplabv3plus_r50_synthetic.py GPUS=4 bash scripts/seg/voc_deeplabv3plus_r101.sh \
#       --cfg-options train_dataloader.dataset.data_root=DIR
_base_ = [
    "./_base_/models/deeplabv3plus_r50.py",
    "./_base_/datasets/voc.py",
    "./_base_/default_runtime.py",
    "./_base_/schedules/sgd_poly_40k.py",
]
model = dict(decode_head=dict(num_classes=_base_.num_classes),
             auxiliary_head=dict(num_classes=_base_.num_classes))
