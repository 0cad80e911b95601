# Mask2Former R50 trained on generated ade20k pairs, evaluated on the real ade20k val split.
#   GPUS=4 bash scripts/seg/ade20k_mask2former_r50.sh \
#       --cfg-options train_dataloader.dataset.data_root=DIR
_base_ = [
    "./_base_/models/mask2former_r50.py",
    "./_base_/datasets/ade20k.py",
    "./_base_/default_runtime.py",
    "./_base_/schedules/adamw_poly_160k.py",
]
num_classes = _base_.num_classes
model = dict(
    decode_head=dict(
        num_classes=num_classes,
        loss_cls=dict(class_weight=[1.0] * num_classes + [0.1]),
    )
)
