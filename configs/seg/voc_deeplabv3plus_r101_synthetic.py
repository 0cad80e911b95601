# DeepLabV3+ R101-D8 trained on generated voc pairs, evaluated on the real voc val split.
#   GPUS=4 bash scripts/seg/voc_deeplabv3plus_r101.sh \
#       --cfg-options train_dataloader.dataset.data_root=DIR
# Backbone: open-mmlab://resnet101_v1c, ImageNet-pretrained as in MMSegmentation's recipe, read from
# torch hub's cache (~/.cache/torch/hub/checkpoints/resnet101_v1c-e67eebb6.pth, downloaded there
# once); offline without it the run stops with one line. A local copy / from scratch:
#   --cfg-options model.backbone.init_cfg.checkpoint=/path/resnet101_v1c-e67eebb6.pth
#   --cfg-options model.backbone.init_cfg=None
_base_ = ["./voc_deeplabv3plus_r50_synthetic.py"]
# as in MMSegmentation's deeplabv3plus_r101-d8 configs: depth 101, its own ImageNet checkpoint
model = dict(backbone=dict(depth=101,
                           init_cfg=dict(checkpoint="open-mmlab://resnet101_v1c")))
