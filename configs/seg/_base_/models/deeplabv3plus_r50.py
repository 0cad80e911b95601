# DeepLabV3+ with a dilated ResNet-50 (V1c: deep stem), output stride 8.
# Backbone: ImageNet-pretrained, the checkpoint MMSegmentation's recipe uses
# (configs/_base_/models/deeplabv3plus_r50-d8.py: pretrained='open-mmlab://resnet50_v1c'; the
# R101 configs use open-mmlab://resnet101_v1c). train/segmenter.py takes it from torch hub's cache
# (~/.cache/torch/hub/checkpoints/, downloaded there once); offline it stops and says so.
#   a local copy:  --cfg-options model.backbone.init_cfg.checkpoint=/path/resnet50_v1c-2cccc1ad.pth
#   from scratch:  --cfg-options model.backbone.init_cfg=None
norm_cfg = dict(type="SyncBN", requires_grad=True)  # reverted to BN on a single device
data_preprocessor = dict(
    type="SegDataPreProcessor",
    mean=[123.675, 116.28, 103.53],
    std=[58.395, 57.12, 57.375],
    bgr_to_rgb=True,
    pad_val=0,
    seg_pad_val=255,
    size=(512, 512),  # the crop size of the dataset configs
)
model = dict(
    type="EncoderDecoder",
    data_preprocessor=data_preprocessor,
    pretrained=None,
    backbone=dict(
        type="ResNetV1c",
        depth=50,
        num_stages=4,
        out_indices=(0, 1, 2, 3),
        dilations=(1, 1, 2, 4),
        strides=(1, 2, 1, 1),
        norm_cfg=norm_cfg,
        norm_eval=False,
        style="pytorch",
        contract_dilation=True,
        init_cfg=dict(type="Pretrained", checkpoint="open-mmlab://resnet50_v1c"),
    ),
    decode_head=dict(
        type="DepthwiseSeparableASPPHead",
        in_channels=2048,
        in_index=3,
        channels=512,
        dilations=(1, 12, 24, 36),
        c1_in_channels=256,
        c1_channels=48,
        dropout_ratio=0.1,
        num_classes=21,  # set by the dataset config
        norm_cfg=norm_cfg,
        align_corners=False,
        loss_decode=dict(type="CrossEntropyLoss", use_sigmoid=False, loss_weight=1.0),
    ),
    auxiliary_head=dict(
        type="FCNHead",
        in_channels=1024,
        in_index=2,
        channels=256,
        num_convs=1,
        concat_input=False,
        dropout_ratio=0.1,
        num_classes=21,
        norm_cfg=norm_cfg,
        align_corners=False,
        loss_decode=dict(type="CrossEntropyLoss", use_sigmoid=False, loss_weight=0.4),
    ),
    train_cfg=dict(),
    test_cfg=dict(mode="whole"),
)
