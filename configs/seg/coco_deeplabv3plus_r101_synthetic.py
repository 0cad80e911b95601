# DeepLabV3+ R101-D8 trained on generated coco pairs, evaluated on the real coco val split.
#   GPUS=4 bash scripts/seg/coco_deeplabv3plus_r101.sh \
#       --cfg-options train_dataloader.dataset.data_root=DIR
_base_ = ["./coco_deeplabv3plus_r50_synthetic.py"]
model = dict(backbone=dict(depth=101))
