"""COCO 2017, 80 thing classes + background, as semantic PNGs made by
``python -m utils.prepare_coco_semantic_80`` from ``instances_{train,val}2017.json``.

Edit ``data_root`` below (or pass ``--data_root`` to any stage).

    data/coco/
      images/{train2017,val2017}/*.jpg          # or train2017/, val2017/ directly under the root
      annotations/instances_{train,val}2017.json, captions_{train,val}2017.json
      semantic_80/{train2017,val2017}/*.png     # 0 background, 1..80 classes, 255 crowd
      captions/{train2017,val2017}.json         # first COCO caption per image

Two image layouts are accepted: ``images/train2017/`` (MMSegmentation's), and the official
archives unzipped in place (``train2017.zip``, ``val2017.zip`` and
``annotations_trainval2017.zip`` give ``train2017/``, ``val2017/`` and ``annotations/`` side by
side). The rule, per split, when the root is set (``get_dataset_info("coco", root)``): if
``<root>/images/<split>`` is not a folder and ``<root>/<split>`` is, the images are read from
the latter. Everything else (``annotations/``, ``semantic_80/``, ``captions/``) sits under the root
in both layouts.
"""
import dataclasses
from pathlib import Path

from dataset.base import DatasetInfo, SplitSpec, make_palette

data_root = "data/coco"

CLASSES = (
    "background", "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck",
    "boat", "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat",
    "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella",
    "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite",
    "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange",
    "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant",
    "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone",
    "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors",
    "teddy bear", "hair drier", "toothbrush",
)
assert len(CLASSES) == 81

# COCO category ids (1..90 with gaps) in the order of CLASSES[1:]: label = index + 1
COCO_CATEGORY_IDS = (
    1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 27, 28,
    31, 32, 33, 34, 35, 36, 37, 38, 39, 40, 41, 42, 43, 44, 46, 47, 48, 49, 50, 51, 52, 53, 54, 55,
    56, 57, 58, 59, 60, 61, 62, 63, 64, 65, 67, 70, 72, 73, 74, 75, 76, 77, 78, 79, 80, 81, 82, 84,
    85, 86, 87, 88, 89, 90,
)
assert len(COCO_CATEGORY_IDS) == 80

IMAGES_DIR = "images"  # the images/<split> layout; without it, <split> directly under the root
IMAGE_SPLITS = ("train2017", "val2017")  # the folders the official image archives unzip to


def resolve_image_dirs(info: DatasetInfo) -> DatasetInfo:
    """``info`` with each split's ``img_dir`` pointing at the layout found under its root (docstring)."""
    root = Path(info.data_root)
    splits = {}
    for key, spec in info.splits.items():
        parts = Path(spec.img_dir).parts
        if parts[-1] in IMAGE_SPLITS and parts[:-1] in ((), (IMAGES_DIR,)):  # not a custom folder
            nested, flat = f"{IMAGES_DIR}/{parts[-1]}", parts[-1]
            use_flat = not (root / nested).is_dir() and (root / flat).is_dir()
            spec = dataclasses.replace(spec, img_dir=flat if use_flat else nested)
        splits[key] = spec
    return info if splits == info.splits else dataclasses.replace(info, splits=splits)


class CocoInfo(DatasetInfo):
    """COCO's description: setting the root also picks the image layout found there."""

    def with_root(self, data_root) -> DatasetInfo:
        return resolve_image_dirs(super().with_root(data_root))


INFO = CocoInfo(
    name="coco",
    classes=CLASSES,
    palette=make_palette(len(CLASSES)),
    data_root=data_root,
    splits={
        "train": SplitSpec("images/train2017", "semantic_80/train2017", None, "captions/train2017.json"),
        "val": SplitSpec("images/val2017", "semantic_80/val2017", None, "captions/val2017.json"),
    },
    img_suffix=".jpg",
    caption_source="coco_first",
    extra={"category_ids": COCO_CATEGORY_IDS},
)
