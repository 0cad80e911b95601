"""The built-in toy dataset ("shapes"): the embedded default, made on this machine, no download.

    python -m utils.make_toy_dataset --out data/toy --size 32 --num_train 4000 --num_val 500

    data/toy/
      img_dir/{train,val}/*.png
      ann_dir/{train,val}/*.png     # 0 background, 1..5 shapes
      captions/{train,val}.json     # "a red circle and a blue star on a striped background"
"""
from dataset.base import DatasetInfo, SplitSpec

data_root = "data/toy"

# ring vs circle and star vs square differ only by geometry: the text must say which to draw.
CLASSES = ("background", "circle", "square", "triangle", "ring", "star")

PALETTE = ((0, 0, 0), (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48))

INFO = DatasetInfo(
    name="toy",
    classes=CLASSES,
    palette=PALETTE,
    data_root=data_root,
    splits={
        "train": SplitSpec("img_dir/train", "ann_dir/train", None, "captions/train.json"),
        "val": SplitSpec("img_dir/val", "ann_dir/val", None, "captions/val.json"),
    },
    img_suffix=".png",
    caption_source="toy",
    default_size=32,
)
