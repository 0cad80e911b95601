"""What every stage knows about a dataset, in one place.

Label convention (every stage uses it; documented once here)
-------------------------------------------------------------
Masks are single-channel uint8 PNGs in the dataset's *annotation label space*:

* ``0`` is background ("other" in ADE20K, "background" in VOC/COCO/toy),
* ``1..K`` are the K foreground classes (``num_classes`` = K),
* ``ignore_index`` (255) marks pixels that carry no label (VOC boundaries, COCO crowd, low
  confidence decodes).

So a mask holds ``num_labels = K + 1`` valid values. The label VAE bit-encodes exactly these
values (ignore -> the all-zero code) and decodes K + 1 logits; generated masks are written in
the same space as the real annotations, so one mmseg dataset definition reads both.

For the downstream segmenter the usual mmseg convention applies per dataset:
``reduce_zero_label=True`` for ADE20K (0 -> 255, 1..150 -> 0..149: 150 classes), ``False`` for
VOC (21 classes incl. background), COCO-80 (81) and toy (K + 1). ``seg_classes`` gives the
class names the segmenter sees.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class SplitSpec:
    """Where one split's files live, relative to ``data_root``."""

    img_dir: str
    ann_dir: str
    list_file: str | None = None  # text file of image ids; None = every image in img_dir
    caption_file: str | None = None  # JSON {image id: caption}; None/missing = class-name captions


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    classes: tuple[str, ...]  # label 0..K names, index = annotation value (includes background)
    palette: tuple[tuple[int, int, int], ...]  # one RGB per label value
    data_root: str
    splits: dict[str, SplitSpec]
    img_suffix: str = ".jpg"
    seg_map_suffix: str = ".png"
    ignore_index: int = 255
    reduce_zero_label: bool = False  # mmseg convention for the downstream segmenter
    caption_source: str = "class_names"  # "blip2", "coco_first" or "class_names"
    caption_template: str = "a photo of {}"  # used for class-name captions
    default_size: int = 512  # training resolution of the paper's recipe
    extra: dict = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        """K: foreground classes (labels 1..K)."""
        return len(self.classes) - 1

    @property
    def num_labels(self) -> int:
        """K + 1 valid label values (0..K)."""
        return len(self.classes)

    @property
    def seg_classes(self) -> tuple[str, ...]:
        """Class names the downstream segmenter predicts (mmseg METAINFO)."""
        return self.classes[1:] if self.reduce_zero_label else self.classes

    @property
    def seg_palette(self) -> tuple[tuple[int, int, int], ...]:
        return self.palette[1:] if self.reduce_zero_label else self.palette

    def with_root(self, data_root: str | Path | None) -> "DatasetInfo":
        """A copy with another ``data_root`` (command-line override); None keeps the default."""
        if data_root is None:
            return self
        return dataclasses.replace(self, data_root=str(data_root))

    def root(self) -> Path:
        return Path(self.data_root)

    def class_name_caption(self, labels) -> str:
        """'a photo of cat, sofa' from the label values present (background left out)."""
        names = [self.classes[int(l)] for l in sorted(set(int(x) for x in labels))
                 if 0 < int(l) < self.num_labels]
        return self.caption_template.format(", ".join(names) if names else self.classes[0])


def make_palette(n: int) -> tuple[tuple[int, int, int], ...]:
    """The Pascal VOC colour map (bit-interleaved), extended to n colours; deterministic."""
    out = []
    for i in range(n):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        out.append((r, g, b))
    return tuple(out)
