"""COCO 2017 instance annotations -> semantic class maps, 80 thing classes + background.

    python -m utils.prepare_coco_semantic_80 --data_root data/coco --num_workers 8

Reads ``<data_root>/annotations/instances_{train,val}2017.json`` and writes one single-channel
uint8 PNG per image listed in the JSON (images without annotations get an all-background map):

    <data_root>/semantic_80/{train2017,val2017}/<image id, 12 digits>.png

``<data_root>`` is the folder holding ``annotations/``, with the images either in
``images/{train2017,val2017}/`` or, as the official archives unzip, in ``train2017/`` and
``val2017/`` beside it (the rule is in ``dataset/coco_semantic.py``); the masks go to the same
place in both layouts, and the line printed per split names the image folder the other stages
will read. Only the annotations are needed here: the images are not opened.

Labels follow ``dataset/coco_semantic.py``: ``0`` background, ``index in COCO_CATEGORY_IDS + 1``
for the 80 classes (1..80), ``255`` ignore.

Overlap rule: non-crowd instances are painted from the largest (decoded pixel area) to the
smallest, ties broken by annotation id, so where instances overlap the *smaller* one wins. A
small object lying on a large one (a cup on a dining table) keeps its pixels instead of being
swallowed.

Crowd rule: ``iscrowd=1`` regions (RLE "crowd" blobs of many unlabelled instances) become
``255`` (ignore) unless a non-crowd instance covers the pixel, in which case the instance's
class wins. Crowd regions are painted first and instances on top of them.

Resumable: PNGs are written atomically (temp name, then rename), so any PNG present is
complete; one whose size matches the image is skipped (``--overwrite true`` redoes all).
"""
from __future__ import annotations

import json
import multiprocessing
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from dataset.coco_semantic import COCO_CATEGORY_IDS, IMAGES_DIR, INFO
from utils.config import die, parse_config
from utils.io import save_image_atomic

IGNORE = 255
CATEGORY_TO_LABEL = {cat_id: index + 1 for index, cat_id in enumerate(COCO_CATEGORY_IDS)}


@dataclass
class PrepareCocoConfig:
    """Convert COCO instance annotations to 80-class semantic PNGs."""

    data_root: str = field(default=INFO.data_root, metadata={"help": "COCO root (holds annotations/)"})
    splits: list[str] = field(default_factory=lambda: ["train2017", "val2017"],
                              metadata={"help": "COCO split names to convert"})
    annotations_dir: str | None = field(default=None, metadata={
        "help": "folder with instances_<split>.json (default <data_root>/annotations)"})
    out_dir: str | None = field(default=None, metadata={
        "help": "output folder (default <data_root>/semantic_80, as dataset/coco_semantic.py expects)"})
    num_workers: int = field(default=8, metadata={"help": "worker processes (0 = in this process)"})
    overwrite: bool = field(default=False, metadata={"help": "rewrite PNGs that already exist"})


def decode_segmentation(segmentation, height: int, width: int) -> np.ndarray:
    """A COCO segmentation (polygons, uncompressed RLE or compressed RLE) -> bool HxW mask."""
    from pycocotools import mask as mask_utils

    if isinstance(segmentation, list):  # polygons: one list of x, y coordinates per part
        polygons = [p for p in segmentation if len(p) >= 6]  # fewer than 3 points: no area
        if not polygons:
            return np.zeros((height, width), dtype=bool)
        rle = mask_utils.merge(mask_utils.frPyObjects(polygons, height, width))
    elif isinstance(segmentation, dict) and isinstance(segmentation.get("counts"), list):
        rle = mask_utils.frPyObjects(segmentation, height, width)  # uncompressed RLE (crowd)
    elif isinstance(segmentation, dict):
        rle = dict(segmentation)
        if isinstance(rle["counts"], str):
            rle["counts"] = rle["counts"].encode("ascii")
    else:
        raise ValueError(f"unknown segmentation format {type(segmentation).__name__}")
    mask = mask_utils.decode(rle).astype(bool)
    if mask.shape != (height, width):
        raise ValueError(f"segmentation decodes to {mask.shape}, image is {(height, width)}")
    return mask


def render_semantic_mask(height: int, width: int, annotations: list[dict]) -> np.ndarray:
    """Paint one image's instances into a uint8 class map (rules in the module docstring)."""
    out = np.zeros((height, width), dtype=np.uint8)
    instances = []
    for ann in annotations:
        mask = decode_segmentation(ann["segmentation"], height, width)
        if ann.get("iscrowd", 0):
            out[mask] = IGNORE
        else:
            instances.append((-int(mask.sum()), int(ann.get("id", 0)), mask, CATEGORY_TO_LABEL[ann["category_id"]]))
    # largest first (most negative area), so smaller instances are painted later and win
    for _, _, mask, label in sorted(instances, key=lambda t: (t[0], t[1])):
        out[mask] = label
    return out


def is_complete(path: Path, height: int, width: int) -> bool:
    try:
        with Image.open(path) as im:
            return im.size == (width, height)
    except (OSError, ValueError):
        return False


def _convert_one(task) -> tuple[str, str | None]:
    """Worker: render and save one image's map; returns (file name, error message or None)."""
    out_path, height, width, annotations = task
    try:
        save_image_atomic(out_path, render_semantic_mask(height, width, annotations))
        return Path(out_path).name, None
    except Exception as e:  # one broken annotation must not stop 118k images; reported at the end
        return Path(out_path).name, f"{type(e).__name__}: {e}"


def _entry_problem(entry, keys: tuple[str, ...], int_keys: tuple[str, ...]) -> str | None:
    if not isinstance(entry, dict):
        return f"is a {type(entry).__name__}, not an object"
    missing = [k for k in keys if k not in entry]
    if missing:
        return f"lacks {', '.join(repr(k) for k in missing)}"
    bad = [k for k in int_keys if not isinstance(entry[k], int) or isinstance(entry[k], bool)]
    return f"has a non-integer {', '.join(repr(k) for k in bad)}" if bad else None


def load_instances(path: Path) -> tuple[list[dict], dict[int, list[dict]]]:
    """The images of an instances JSON and its annotations grouped by image id (only what we need).

    A file that cannot be read, is not JSON or lacks the fields used here stops the run with one
    line naming it (and the first bad entry); a malformed segmentation is found per image later.
    """
    try:
        data = json.loads(path.read_bytes())
    except OSError as e:
        die(f"{path}: cannot read ({e.strerror or e})")
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        die(f"{path}: not valid JSON, truncated or not an annotation file ({e})")
    if not isinstance(data, dict) or not isinstance(data.get("images"), list) \
            or not isinstance(data.get("annotations"), list):
        die(f"{path}: not a COCO instances file (needs the lists 'images' and 'annotations')")
    for kind, keys, int_keys in (("images", ("id", "height", "width"), ("id", "height", "width")),
                                 ("annotations", ("image_id", "category_id", "segmentation"),
                                  ("image_id", "category_id"))):
        for i, entry in enumerate(data[kind]):
            problem = _entry_problem(entry, keys, int_keys)
            if problem:
                die(f"{path}: {kind}[{i}] {problem}")
    unknown = {a["category_id"] for a in data["annotations"]} - set(CATEGORY_TO_LABEL)
    if unknown:
        die(f"{path}: category ids {sorted(unknown)} are not among COCO's 80 thing classes")
    by_image: dict[int, list[dict]] = {}
    for ann in data["annotations"]:
        by_image.setdefault(ann["image_id"], []).append(
            {k: ann[k] for k in ("id", "category_id", "segmentation", "iscrowd") if k in ann})
    return data["images"], by_image


def image_folder(root: Path, split: str) -> Path | None:
    """Where the other stages will read this split's images, by the rule of dataset/coco_semantic.py."""
    for folder in (root / IMAGES_DIR / split, root / split):
        if folder.is_dir():
            return folder
    return None


def convert_split(instances_json: Path, out_dir: Path, num_workers: int, overwrite: bool) -> dict:
    images, by_image = load_instances(instances_json)
    tasks, skipped = [], 0
    for image in images:
        out_path = out_dir / f"{int(image['id']):012d}.png"
        h, w = int(image["height"]), int(image["width"])
        if not overwrite and out_path.exists() and is_complete(out_path, h, w):
            skipped += 1
            continue
        tasks.append((str(out_path), h, w, by_image.get(image["id"], [])))
    out_dir.mkdir(parents=True, exist_ok=True)
    failures = {}
    bar = tqdm(total=len(tasks), desc=out_dir.name, unit="img")
    if num_workers > 0 and len(tasks) > 1:
        with multiprocessing.get_context("spawn").Pool(num_workers) as pool:
            for name, err in pool.imap_unordered(_convert_one, tasks, chunksize=16):
                if err:
                    failures[name] = err
                bar.update()
    else:
        for task in tasks:
            name, err = _convert_one(task)
            if err:
                failures[name] = err
            bar.update()
    bar.close()
    return {"images": len(images), "written": len(tasks) - len(failures), "skipped": skipped,
            "failures": failures}


def main(argv=None) -> int:
    cfg = parse_config(PrepareCocoConfig, argv, description=__doc__)
    root = Path(cfg.data_root)
    ann_dir = Path(cfg.annotations_dir) if cfg.annotations_dir else root / "annotations"
    out_root = Path(cfg.out_dir) if cfg.out_dir else root / "semantic_80"
    inputs = [ann_dir / f"instances_{split}.json" for split in cfg.splits]
    for path in inputs:
        if not path.is_file():
            die(f"{path}: not found (download annotations_trainval2017.zip from cocodataset.org)")
    failed = 0
    for split, path in zip(cfg.splits, inputs):
        summary = convert_split(path, out_root / split, cfg.num_workers, cfg.overwrite)
        images = image_folder(root, split)
        print(f"{split}: {summary['images']} images, {summary['written']} written, "
              f"{summary['skipped']} already done, {len(summary['failures'])} failed -> {out_root / split}; "
              + (f"images in {images}" if images else
                 f"no image folder {root / 'images' / split} or {root / split} yet"))
        for name, err in sorted(summary["failures"].items()):
            print(f"error: {out_root / split / name}: {err}", file=sys.stderr)
        failed += len(summary["failures"])
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
