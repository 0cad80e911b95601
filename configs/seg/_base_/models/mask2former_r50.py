# Mask2Former with a ResNet-50 backbone (mmseg's Mask2FormerHead over mmdet components: needs
# mmdet installed). The top-level config sets num_classes and loss_cls.class_weight
# ([1.0] * num_classes + [0.1] for the "no object" query) and trains with
# mask2former_train_pipeline below.
# Model, backbone checkpoint and pipeline are MMSegmentation's recipe
# (mmseg 1.2.2, configs/mask2former/mask2former_r50_8xb2-160k_ade20k-512x512.py): the backbone
# starts from torchvision's ImageNet ResNet-50 ('torchvision://resnet50' = resnet50-0676ba61.pth),
# which train/segmenter.py takes from torch hub's cache (~/.cache/torch/hub/checkpoints/,
# downloaded there once); offline it stops and says so.
#   a local copy:  --cfg-options model.backbone.init_cfg.checkpoint=/path/resnet50-0676ba61.pth
#   from scratch:  --cfg-options model.backbone.init_cfg=None
data_preprocessor = dict(
    type="SegDataPreProcessor",
    mean=[123.675, 116.28, 103.53],
    std=[58.395, 57.12, 57.375],
    bgr_to_rgb=True,
    pad_val=0,
    seg_pad_val=255,
    size=(512, 512),  # the crop size of the dataset configs
    test_cfg=dict(size_divisor=32),
)
_attn = dict(embed_dims=256, num_heads=8, attn_drop=0.0, proj_drop=0.0, dropout_layer=None,
             batch_first=True)
model = dict(
    type="EncoderDecoder",
    data_preprocessor=data_preprocessor,
    backbone=dict(
        type="ResNet",
        depth=50,
        deep_stem=False,
        num_stages=4,
        out_indices=(0, 1, 2, 3),
        frozen_stages=-1,
        norm_cfg=dict(type="SyncBN", requires_grad=False),
        style="pytorch",
        init_cfg=dict(type="Pretrained", checkpoint="torchvision://resnet50"),
    ),
    decode_head=dict(
        type="Mask2FormerHead",
        in_channels=[256, 512, 1024, 2048],
        strides=[4, 8, 16, 32],
        feat_channels=256,
        out_channels=256,
        num_classes=21,  # set by the top-level config
        num_queries=100,
        num_transformer_feat_level=3,
        align_corners=False,
        pixel_decoder=dict(
            type="mmdet.MSDeformAttnPixelDecoder",
            num_outs=3,
            norm_cfg=dict(type="GN", num_groups=32),
            act_cfg=dict(type="ReLU"),
            encoder=dict(
                num_layers=6,
                layer_cfg=dict(
                    self_attn_cfg=dict(embed_dims=256, num_heads=8, num_levels=3, num_points=4,
                                       im2col_step=64, dropout=0.0, batch_first=True,
                                       norm_cfg=None, init_cfg=None),
                    ffn_cfg=dict(embed_dims=256, feedforward_channels=1024, num_fcs=2,
                                 ffn_drop=0.0, act_cfg=dict(type="ReLU", inplace=True)),
                ),
                init_cfg=None,
            ),
            positional_encoding=dict(num_feats=128, normalize=True),
            init_cfg=None,
        ),
        enforce_decoder_input_project=False,
        positional_encoding=dict(num_feats=128, normalize=True),
        transformer_decoder=dict(
            return_intermediate=True,
            num_layers=9,
            layer_cfg=dict(
                self_attn_cfg=_attn,
                cross_attn_cfg=_attn,
                ffn_cfg=dict(embed_dims=256, feedforward_channels=2048, num_fcs=2,
                             act_cfg=dict(type="ReLU", inplace=True), ffn_drop=0.0,
                             dropout_layer=None, add_identity=True),
            ),
            init_cfg=None,
        ),
        loss_cls=dict(type="mmdet.CrossEntropyLoss", use_sigmoid=False, loss_weight=2.0,
                      reduction="mean", class_weight=[1.0] * 21 + [0.1]),
        loss_mask=dict(type="mmdet.CrossEntropyLoss", use_sigmoid=True, reduction="mean",
                       loss_weight=5.0),
        loss_dice=dict(type="mmdet.DiceLoss", use_sigmoid=True, activate=True, reduction="mean",
                       naive_dice=True, eps=1.0, loss_weight=5.0),
        train_cfg=dict(
            num_points=12544,
            oversample_ratio=3.0,
            importance_sample_ratio=0.75,
            assigner=dict(
                type="mmdet.HungarianAssigner",
                match_costs=[
                    dict(type="mmdet.ClassificationCost", weight=2.0),
                    dict(type="mmdet.CrossEntropyLossCost", weight=5.0, use_sigmoid=True),
                    dict(type="mmdet.DiceCost", weight=5.0, pred_act=True, eps=1.0),
                ],
            ),
            sampler=dict(type="mmdet.MaskPseudoSampler"),
        ),
    ),
    train_cfg=dict(),
    test_cfg=dict(mode="whole"),
)

# The training pipeline of that recipe, copied value for value: short side drawn from
# 256, 307, ..., 1024 px (0.5-2.0 x 512, long side at most 2048), a 512 x 512 crop with no class
# above 75 %, flip, photometric distortion. mmseg has Mask2Former recipes for ADE20K and
# Cityscapes only; VOC and COCO use this one, at the 512 px crop of their DeepLabV3+ recipes.
# LoadAnnotations takes reduce_zero_label from the dataset (True for ADE20K, as in the recipe).
mask2former_train_pipeline = [
    dict(type="LoadImageFromFile"),
    dict(type="LoadAnnotations"),
    dict(type="RandomChoiceResize", scales=[int(512 * x * 0.1) for x in range(5, 21)],
         resize_type="ResizeShortestEdge", max_size=2048),
    dict(type="RandomCrop", crop_size=(512, 512), cat_max_ratio=0.75),
    dict(type="RandomFlip", prob=0.5),
    dict(type="PhotoMetricDistortion"),
    dict(type="PackSegInputs"),
]
