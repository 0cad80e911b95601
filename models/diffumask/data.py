"""Reading back a synthetic set written by ``dataset/synthetic.py`` (manifest.jsonl + files).

    meta, rows = read_synthetic("data/synthetic/voc/diffumask")    # ValueError "<file>: <problem>"
    check_pairs("data/synthetic/voc/diffumask", rows)                # header reads only: cheap
    image, mask = load_pair("data/synthetic/voc/diffumask", rows[0])

Problems are found in two steps, as in ``dataset/segmentation.py``: ``check_pairs`` reads every
file's header before any work (a missing mask, an unreadable image, sizes that differ), and a
file that only fails when decoded (truncated) is found by whoever decodes it, who names it,
skips it and counts it; ``too_many_bad`` says when the share of such files ends the run.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
from PIL import Image

from utils.io import read_jsonl

MAX_BAD_FRACTION = 0.01  # share of pairs that may turn out corrupt before a run stops (>= 1 file)


def read_synthetic(folder: str | Path, list_file: str | None = None) -> tuple[dict, list[dict]]:
    """(dataset.json, manifest records) of a finished synthetic set; ``list_file`` (names, one a
    line, e.g. kept.txt) restricts the records. Raises ValueError naming the file at fault."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"{folder}: data folder not found")
    meta_path, manifest = folder / "dataset.json", folder / "manifest.jsonl"
    for p in (meta_path, manifest):
        if not p.is_file():
            raise ValueError(f"{p}: missing (is {folder} a finished synthetic set?)")
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{meta_path}: not valid JSON ({e})") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("classes"), list) or not meta["classes"]:
        raise ValueError(f"{meta_path}: no 'classes' list (is {folder} a finished synthetic set?)")
    rows = read_jsonl(manifest)
    for k, r in enumerate(rows):
        if not isinstance(r, dict) or not all(isinstance(r.get(key), str) for key in ("name", "image", "mask")):
            raise ValueError(f"{manifest}: record {k + 1} lacks 'name', 'image' or 'mask'")
    if list_file:
        lp = Path(list_file) if Path(list_file).is_absolute() or Path(list_file).exists() else folder / list_file
        if not lp.is_file():
            raise ValueError(f"{lp}: list file not found")
        names = set(lp.read_text().split())
        rows = [r for r in rows if r["name"] in names]
    if not rows:
        raise ValueError(f"{manifest}: no pairs")
    return meta, rows


def _header(path: Path, what: str) -> tuple[tuple[int, int], str]:
    """((width, height), mode) from the file's header, without decoding the pixels."""
    if not path.is_file():
        raise ValueError(f"{path}: {what} file not found")
    try:
        with Image.open(path) as im:
            return im.size, im.mode
    except (OSError, ValueError, SyntaxError) as e:
        raise ValueError(f"{path}: cannot read {what} ({e})") from None


def check_pairs(folder: str | Path, rows: list[dict]) -> None:
    """Header checks of every pair before any work: both files exist and open, the mask is
    single-channel and has its image's size. Raises ValueError "<file>: <problem>"."""
    folder = Path(folder)
    for r in rows:
        size, _ = _header(folder / r["image"], "image")
        mask_size, mode = _header(folder / r["mask"], "mask")
        if mode not in ("L", "P", "1", "I", "I;16"):
            raise ValueError(f"{folder / r['mask']}: mask has mode {mode}; masks must be single-channel "
                             "class indices")
        if mask_size != size:
            raise ValueError(f"{folder / r['mask']}: mask is {mask_size[0]}x{mask_size[1]}, its image "
                             f"{folder / r['image']} is {size[0]}x{size[1]}")


def image_height(folder: str | Path, record: dict) -> int:
    return _header(Path(folder) / record["image"], "image")[0][1]


def too_many_bad(bad: int, total: int, max_fraction: float = MAX_BAD_FRACTION) -> bool:
    """More than ``max_fraction`` of ``total`` files bad (one bad file is always allowed)?"""
    return bad > max(1, math.floor(max_fraction * total))


def _read(path: Path, convert: str | None = None) -> np.ndarray:
    """Decode now (a truncated file fails here); errors name the file."""
    try:
        with Image.open(path) as im:
            return np.array(im.convert(convert) if convert else im)
    except FileNotFoundError:
        raise ValueError(f"{path}: file not found") from None
    except (OSError, ValueError, SyntaxError) as e:  # PIL raises all three for broken files
        raise ValueError(f"{path}: cannot read ({e})") from None


def load_pair_mask(folder: str | Path, record: dict) -> np.ndarray:
    return _read(Path(folder) / record["mask"])


def load_pair(folder: str | Path, record: dict) -> tuple[np.ndarray, np.ndarray]:
    """(HxWx3 uint8 image, HxW mask); ValueError "<file>: cannot read (...)" for a broken file."""
    folder = Path(folder)
    return _read(folder / record["image"], "RGB"), load_pair_mask(folder, record)
