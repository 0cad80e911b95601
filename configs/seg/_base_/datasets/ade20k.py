# ade20k: train on generated pairs (dataset/synthetic.py layout), evaluate on the real val split.
# Classes, palette and reduce_zero_label come from dataset/ade20k_semantic.py.
# Paths: the synthetic folder is train_dataloader.dataset.data_root; the real data_root is the
# one in dataset/ade20k_semantic.py unless val_dataloader.dataset.data_root is set, e.g.
#   --cfg-options train_dataloader.dataset.data_root=/data/jodiffusion/ade20k \
#                 val_dataloader.dataset.data_root=/data/ade20k test_dataloader.dataset.data_root=/data/ade20k
dataset_type = "JoDiffusionSegDataset"
dataset_name = "ade20k"
num_classes = 150  # len(get_dataset_info("ade20k").seg_classes); tests check it
synthetic_root = "data/synthetic/ade20k"
crop_size = (512, 512)
train_pipeline = [
    dict(type="LoadImageFromFile"),
    dict(type="LoadAnnotations"),  # reduce_zero_label follows the dataset
    dict(type="RandomResize", scale=(2048, 512), ratio_range=(0.5, 2.0), keep_ratio=True),
    dict(type="RandomCrop", crop_size=crop_size, cat_max_ratio=0.75),
    dict(type="RandomFlip", prob=0.5),
    dict(type="PhotoMetricDistortion"),
    dict(type="PackSegInputs"),
]
test_pipeline = [
    dict(type="LoadImageFromFile"),
    dict(type="Resize", scale=(2048, 512), keep_ratio=True),
    dict(type="LoadAnnotations"),
    dict(type="PackSegInputs"),
]
synthetic_train = dict(type=dataset_type, dataset_name=dataset_name, source="synthetic",
                       split="train", data_root=synthetic_root, pipeline=train_pipeline)
real_train = dict(type=dataset_type, dataset_name=dataset_name, source="real", split="train",
                  data_root=None, pipeline=train_pipeline)
real_val = dict(type=dataset_type, dataset_name=dataset_name, source="real", split="val",
                data_root=None, pipeline=test_pipeline)
train_dataloader = dict(
    batch_size=4,  # per GPU; the recipe is 4 GPUs x 4 = 16
    num_workers=4,
    persistent_workers=True,
    sampler=dict(type="InfiniteSampler", shuffle=True),
    dataset=synthetic_train,
)
val_dataloader = dict(
    batch_size=1,
    num_workers=4,
    persistent_workers=True,
    sampler=dict(type="DefaultSampler", shuffle=False),
    dataset=real_val,
)
test_dataloader = val_dataloader
val_evaluator = dict(type="JoDiffusionIoUMetric", iou_metrics=["mIoU"])
test_evaluator = val_evaluator
