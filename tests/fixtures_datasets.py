"""Tiny dataset trees laid out exactly like the real ones, for tests (a few small files each).

    info = make_voc(tmp_path / "VOCdevkit" / "VOC2012").info
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from dataset import get_dataset_info
from dataset.base import DatasetInfo


@dataclass
class Fixture:
    info: DatasetInfo
    masks: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)  # split -> id -> mask
    captions: dict[str, dict[str, str]] = field(default_factory=dict)  # split -> id -> caption

    def ids(self, split: str) -> list[str]:
        return sorted(self.masks[split])


def save_png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.ascontiguousarray(array)).save(path, format="PNG")


def save_jpg(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.ascontiguousarray(array)).save(path, format="JPEG", quality=95)


def random_mask(rng: np.random.Generator, h: int, w: int, labels: list[int]) -> np.ndarray:
    """Blocky mask (4x4 cells) drawn from ``labels``: big regions survive a nearest resize."""
    cells = rng.choice(labels, size=(-(-h // 4), -(-w // 4)))
    return np.repeat(np.repeat(cells, 4, 0), 4, 1)[:h, :w].astype(np.uint8)


def _fill_split(fx: Fixture, split: str, ids: list[str], rng, hw, labels, captions: bool):
    spec = fx.info.splits[split]
    root = fx.info.root()
    fx.masks.setdefault(split, {})
    for name in ids:
        h, w = hw
        mask = random_mask(rng, h, w, labels)
        image = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
        (save_jpg if fx.info.img_suffix == ".jpg" else save_png)(root / spec.img_dir / (name + fx.info.img_suffix), image)
        save_png(root / spec.ann_dir / (name + fx.info.seg_map_suffix), mask)
        fx.masks[split][name] = mask
    (root / spec.ann_dir).mkdir(parents=True, exist_ok=True)
    if captions:
        caps = {name: f"a test caption for {name}" for name in ids}
        path = root / spec.caption_file
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(caps))
        fx.captions[split] = caps


def make_ade20k(root: Path, n_train: int = 3, n_val: int = 2, hw=(20, 28), captions: bool = True,
                seed: int = 0) -> Fixture:
    """``ADEChallengeData2016/images|annotations/{training,validation}`` (0 other, 1..150)."""
    fx = Fixture(get_dataset_info("ade20k", data_root=str(root)))
    rng = np.random.default_rng(seed)
    labels = [0, 1, 3, 13, 150]
    _fill_split(fx, "train", [f"ADE_train_{i:08d}" for i in range(1, n_train + 1)], rng, hw, labels, captions)
    _fill_split(fx, "val", [f"ADE_val_{i:08d}" for i in range(1, n_val + 1)], rng, hw, labels, captions)
    return fx


def make_voc(root: Path, n_train: int = 3, n_val: int = 2, hw=(24, 18), captions: bool = True,
             seed: int = 1) -> Fixture:
    """``VOCdevkit/VOC2012/{JPEGImages,SegmentationClassAug,ImageSets/Segmentation}``.

    Train and val images share one folder and are told apart by the list files; one extra
    image is in neither list (it must not be loaded).
    """
    fx = Fixture(get_dataset_info("voc", data_root=str(root)))
    rng = np.random.default_rng(seed)
    labels = [0, 8, 15, 20, 255]  # 255: the boundary (ignore) label
    train_ids = [f"2007_{i:06d}" for i in range(n_train)]
    val_ids = [f"2008_{i:06d}" for i in range(n_val)]
    _fill_split(fx, "train", train_ids, rng, hw, labels, captions)
    _fill_split(fx, "val", val_ids, rng, hw, labels, captions)
    extra = Fixture(fx.info)
    _fill_split(extra, "train", ["2012_999999"], rng, hw, labels, False)
    lists = root / "ImageSets" / "Segmentation"
    lists.mkdir(parents=True, exist_ok=True)
    (lists / "trainaug.txt").write_text("\n".join(train_ids) + "\n")
    (lists / "val.txt").write_text("\n".join(val_ids) + "\n")
    return fx


def make_coco(root: Path, n_train: int = 3, n_val: int = 2, hw=(16, 22), captions: bool = True,
              seed: int = 2) -> Fixture:
    """``coco/images/{train2017,val2017}`` + ``semantic_80/{train2017,val2017}``."""
    fx = Fixture(get_dataset_info("coco", data_root=str(root)))
    rng = np.random.default_rng(seed)
    labels = [0, 1, 17, 80, 255]  # 255: crowd
    _fill_split(fx, "train", [f"{i:012d}" for i in range(9, 9 + n_train)], rng, hw, labels, captions)
    _fill_split(fx, "val", [f"{i:012d}" for i in range(139, 139 + n_val)], rng, hw, labels, captions)
    return fx


MAKERS = {"ade20k": make_ade20k, "voc": make_voc, "coco": make_coco}
# where each maker expects to be pointed, relative to a tmp dir (the real folder names)
ROOTS = {"ade20k": "ade/ADEChallengeData2016", "voc": "VOCdevkit/VOC2012", "coco": "coco"}


def make_fixture(name: str, tmp: Path, **kwargs) -> Fixture:
    return MAKERS[name](Path(tmp) / ROOTS[name], **kwargs)


LABEL_STEP = 40  # colour-coded fixtures: red channel = LABEL_STEP * label


def make_colour_coded(root: Path, hw=(24, 36), n: int = 4, seed: int = 3, cell: int = 3) -> Fixture:
    """A toy-layout dataset whose image encodes its mask (red = 40 * label), PNG so it is exact.

    Labels follow x and y asymmetrically, so a flip or shift applied to only one of image and
    mask shows up as disagreement.
    """
    info = dataclasses.replace(get_dataset_info("toy"), data_root=str(root))
    fx = Fixture(info)
    rng = np.random.default_rng(seed)
    spec = info.splits["train"]
    h, w = hw
    yy, xx = np.mgrid[0:h, 0:w]
    fx.masks["train"] = {}
    for i in range(n):
        mask = ((xx // (cell + i)) + (yy // (cell + 2)) * 2 + i) % info.num_labels
        mask = mask.astype(np.uint8)
        image = np.stack([mask * LABEL_STEP, rng.integers(0, 256, (h, w)), np.full((h, w), 7)], -1).astype(np.uint8)
        name = f"{i:06d}"
        save_png(root / spec.img_dir / f"{name}.png", image)
        save_png(root / spec.ann_dir / f"{name}.png", mask)
        fx.masks["train"][name] = mask
    return fx


def make_coco_unzipped(root: Path, **kwargs) -> Fixture:
    """``make_coco``, with the images as the official archives unzip: ``coco/{train2017,val2017}``."""
    fx = make_coco(root, **kwargs)
    for spec in fx.info.splits.values():
        (root / spec.img_dir).rename(root / Path(spec.img_dir).name)
    (root / "images").rmdir()
    return Fixture(get_dataset_info("coco", data_root=str(root)), fx.masks, fx.captions)


def make_mmseg_folder(root: Path, n_train: int = 6, n_val: int = 2, name_format: str = "{:03d}") -> Path:
    """``img_dir/{train,val}`` + ``ann_dir/{train,val}`` of random 32 px toy pairs (labels 0..5)."""
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("val", n_val)):
        (root / "img_dir" / split).mkdir(parents=True)
        (root / "ann_dir" / split).mkdir(parents=True)
        for i in range(n):
            name = name_format.format(i)
            Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(
                root / "img_dir" / split / f"{name}.png")
            Image.fromarray(rng.integers(0, 6, (32, 32), dtype=np.uint8)).save(
                root / "ann_dir" / split / f"{name}.png")
    return root
