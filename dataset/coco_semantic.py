"""COCO 2017, 80 thing classes + background, as semantic PNGs made by
``python -m utils.prepare_coco_semantic_80`` from ``instances_{train,val}2017.json``.

Edit ``data_root`` below (or pass ``--data_root`` to any stage).

    data/coco/
      images/{train2017,val2017}/*.jpg
      annotations/instances_{train,val}2017.json, captions_{train,val}2017.json
      semantic_80/{train2017,val2017}/*.png     # 0 background, 1..80 classes, 255 crowd
      captions/{train2017,val2017}.json         # first COCO caption per image
"""
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

INFO = DatasetInfo(
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
