"""Pascal VOC 2012 with the SBD augmentation (``trainaug``, 10,582 images), mmseg layout.

Edit ``data_root`` below (or pass ``--data_root`` to any stage).

    data/VOCdevkit/VOC2012/
      JPEGImages/*.jpg
      SegmentationClassAug/*.png          # 0 background, 1..20 classes, 255 boundary
      ImageSets/Segmentation/{trainaug,val}.txt
      captions/{trainaug,val}.json        # BLIP-2 captions (utils/prepare_captions.py)
"""
from dataset.base import DatasetInfo, SplitSpec, make_palette

data_root = "data/VOCdevkit/VOC2012"

CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
    "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
)

INFO = DatasetInfo(
    name="voc",
    classes=CLASSES,
    palette=make_palette(len(CLASSES)),
    data_root=data_root,
    splits={
        "train": SplitSpec("JPEGImages", "SegmentationClassAug",
                           "ImageSets/Segmentation/trainaug.txt", "captions/trainaug.json"),
        "val": SplitSpec("JPEGImages", "SegmentationClassAug",
                         "ImageSets/Segmentation/val.txt", "captions/val.json"),
    },
    img_suffix=".jpg",
    caption_source="blip2",
)
