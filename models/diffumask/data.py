"""Reading back a synthetic set written by ``dataset/synthetic.py`` (manifest.jsonl + files)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from utils.io import read_jsonl


def read_synthetic(folder: str | Path, list_file: str | None = None) -> tuple[dict, list[dict]]:
    """(dataset.json, manifest records) of a finished synthetic set; ``list_file`` (names, one a
    line, e.g. kept.txt) restricts the records. Raises ValueError naming the missing file."""
    folder = Path(folder)
    meta_path, manifest = folder / "dataset.json", folder / "manifest.jsonl"
    for p in (meta_path, manifest):
        if not p.is_file():
            raise ValueError(f"{p}: missing (is {folder} a finished synthetic set?)")
    meta = json.loads(meta_path.read_text())
    rows = read_jsonl(manifest)
    if list_file:
        lp = Path(list_file) if Path(list_file).is_absolute() or Path(list_file).exists() else folder / list_file
        if not lp.is_file():
            raise ValueError(f"{lp}: list file not found")
        names = set(lp.read_text().split())
        rows = [r for r in rows if r["name"] in names]
    if not rows:
        raise ValueError(f"{manifest}: no pairs")
    return meta, rows


def load_pair(folder: str | Path, record: dict) -> tuple[np.ndarray, np.ndarray]:
    folder = Path(folder)
    with Image.open(folder / record["image"]) as im:
        image = np.array(im.convert("RGB"))
    with Image.open(folder / record["mask"]) as im:
        mask = np.array(im)
    return image, mask
