"""ADE20K (SceneParsing, 150 classes), mmseg layout.

Edit ``data_root`` below (or pass ``--data_root`` to any stage).

    data/ade/ADEChallengeData2016/
      images/{training,validation}/*.jpg
      annotations/{training,validation}/*.png   # 0 other, 1..150 classes
      captions/{training,validation}.json       # BLIP-2 captions (utils/prepare_captions.py)
"""
from dataset.base import DatasetInfo, SplitSpec, make_palette

data_root = "data/ade/ADEChallengeData2016"

CLASSES = (
    "other", "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane",
    "grass", "cabinet", "sidewalk", "person", "earth", "door", "table", "mountain", "plant",
    "curtain", "chair", "car", "water", "painting", "sofa", "shelf", "house", "sea", "mirror",
    "rug", "field", "armchair", "seat", "fence", "desk", "rock", "wardrobe", "lamp", "bathtub",
    "railing", "cushion", "base", "box", "column", "signboard", "chest of drawers", "counter",
    "sand", "sink", "skyscraper", "fireplace", "refrigerator", "grandstand", "path", "stairs",
    "runway", "case", "pool table", "pillow", "screen door", "stairway", "river", "bridge",
    "bookcase", "blind", "coffee table", "toilet", "flower", "book", "hill", "bench", "countertop",
    "stove", "palm", "kitchen island", "computer", "swivel chair", "boat", "bar", "arcade machine",
    "hovel", "bus", "towel", "light", "truck", "tower", "chandelier", "awning", "streetlight",
    "booth", "television receiver", "airplane", "dirt track", "apparel", "pole", "land",
    "bannister", "escalator", "ottoman", "bottle", "buffet", "poster", "stage", "van", "ship",
    "fountain", "conveyer belt", "canopy", "washer", "plaything", "swimming pool", "stool",
    "barrel", "basket", "waterfall", "tent", "bag", "minibike", "cradle", "oven", "ball", "food",
    "step", "tank", "trade name", "microwave", "pot", "animal", "bicycle", "lake", "dishwasher",
    "screen", "blanket", "sculpture", "hood", "sconce", "vase", "traffic light", "tray", "ashcan",
    "fan", "pier", "crt screen", "plate", "monitor", "bulletin board", "shower", "radiator",
    "glass", "clock", "flag",
)
assert len(CLASSES) == 151

INFO = DatasetInfo(
    name="ade20k",
    classes=CLASSES,
    palette=make_palette(len(CLASSES)),
    data_root=data_root,
    splits={
        "train": SplitSpec("images/training", "annotations/training", None, "captions/training.json"),
        "val": SplitSpec("images/validation", "annotations/validation", None, "captions/validation.json"),
    },
    img_suffix=".jpg",
    reduce_zero_label=True,
    caption_source="blip2",
)
