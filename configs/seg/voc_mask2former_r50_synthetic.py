# Mask2Former R50 trained on generated voc pairs, evaluated on the real voc val split.
#   GPUS=4 bash scripts/seg/voc_mask2former_r50.sh \
#       --cfg-options train_dataloader.dataset.data_root=DIR
# Backbone: torchvision://resnet50, ImageNet-pretrained as in MMSegmentation's recipe, read from
# torch hub's cache (~/.cache/torch/hub/checkpoints/resnet50-0676ba61.pth, downloaded there
# once); offline without it the run stops with one line. A local copy / from scratch:
#   --cfg-options model.backbone.init_cfg.checkpoint=/path/resnet50-0676ba61.pth
#   --cfg-options model.backbone.init_cfg=None
_base_ = [
    "./_base_/models/mask2former_r50.py",
    "./_base_/datasets/voc.py",
    "./_base_/default_runtime.py",
    "./_base_/schedules/adamw_poly_160k.py",
]
num_classes = _base_.num_classes
# MMSegmentation's Mask2Former training pipeline (see _base_/models/mask2former_r50.py), also in
# synthetic_train / real_train so a config built from them (e.g. a real + synthetic mix) has it
train_pipeline = _base_.mask2former_train_pipeline
synthetic_train = dict(pipeline=train_pipeline)
real_train = dict(pipeline=train_pipeline)
train_dataloader = dict(dataset=dict(pipeline=train_pipeline))
model = dict(
    decode_head=dict(
        num_classes=num_classes,
        loss_cls=dict(class_weight=[1.0] * num_classes + [0.1]),
    )
)
# VOC is small: 40k iterations, as for DeepLabV3+
max_iters = 40000
param_scheduler = [
    dict(type="PolyLR", eta_min=0, power=0.9, begin=0, end=max_iters, by_epoch=False),
]
train_cfg = dict(max_iters=max_iters, val_interval=4000)
default_hooks = dict(checkpoint=dict(interval=4000))
