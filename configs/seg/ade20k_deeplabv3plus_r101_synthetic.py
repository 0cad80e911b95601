# DeepLabV3+ R101-D8 trained on generated ade20k pairs, evaluated on the real ade20k val split.
#   GPUS=4 bash scripts/seg/ade20k_deeplabv3plus_r101.sh \
#       --cfg-options train_dataloader.dataset.data_root=DIR
_base_ = ["./ade20k_deeplabv3plus_r50_synthetic.py"]
model = dict(backbone=dict(depth=101))
