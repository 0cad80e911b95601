# DeepLabV3+ R101-D8 trained on real + generated coco pairs (ConcatDataset), real val split.
#   GPUS=4 bash scripts/seg/coco_deeplabv3plus_r101_mix.sh     (SYNTH=DIR for another generated set)
# The synthetic part is train_dataloader.dataset.datasets.0, the real part .datasets.1.
# Backbone: open-mmlab://resnet101_v1c, ImageNet-pretrained as in MMSegmentation's recipe, read from
# torch hub's cache (~/.cache/torch/hub/checkpoints/resnet101_v1c-e67eebb6.pth, downloaded there
# once); offline without it the run stops with one line. A local copy / from scratch:
#   --cfg-options model.backbone.init_cfg.checkpoint=/path/resnet101_v1c-e67eebb6.pth
#   --cfg-options model.backbone.init_cfg=None
_base_ = ["./coco_deeplabv3plus_r101_synthetic.py"]
train_dataloader = dict(
    dataset=dict(
        _delete_=True,
        type="ConcatDataset",
        datasets=[_base_.synthetic_train, _base_.real_train],
    )
)
