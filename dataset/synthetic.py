"""The writer every generator uses (JoDiffusion and DiffuMask), so synthetic sets share one layout.

    python -m inference.generate --pipeline runs/toy/jodiffusion --dataset toy --num_pairs 2000 \\
        --output_dir data/gen/toy

    out/img_dir/train/{index:06d}.png    image (or .jpg)
    out/ann_dir/train/{index:06d}.png    single-channel uint8 class indices (255 = ignore)
    out/parts/{index:06d}.json           per-pair manifest record, written LAST = "this pair is done"
    out/manifest.jsonl                   all records, sorted by index (written by finalize)
    out/captions/train.json              {name: prompt}
    out/dataset.json                     {"dataset": ..., "num_pairs": ..., "generator": ..., ...}
    out/preview.png                      a sheet of pairs: image | mask | overlay

Reproducibility rules (why the helpers below exist):

* a pair's noise comes only from ``pair_seed(seed, index)``, never from a shared generator, so
  the bytes do not depend on how many processes ran or in which order;
* ``batches(indices, batch_size)`` cuts the *global* index list into fixed batches and
  ``shard`` deals whole batches to processes, so the batch a pair is computed in is the same
  whatever the process count (floating-point kernels may differ with batch shape);
* every file is written to a temporary name and renamed; the record in ``parts/`` is written
  last, so a killed run never leaves a pair that looks finished. ``finalize`` removes
  leftover temporaries (their names start with "." and would otherwise sit in img_dir/).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Sequence, TypeVar

import numpy as np

from utils.io import atomic_write_json, atomic_write_text, save_image_atomic

T = TypeVar("T")

IMAGE_SUFFIXES = (".png", ".jpg")


def pair_seed(base_seed: int, index: int) -> int:
    """The seed of pair ``index`` in a run seeded ``base_seed`` (a 63-bit hash of both).

    Hashing rather than ``base_seed + index`` keeps runs with nearby base seeds from sharing
    pairs (seed 0 pair 1 would otherwise equal seed 1 pair 0).
    """
    digest = hashlib.sha256(f"jodiffusion-pair:{int(base_seed)}:{int(index)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def batches(indices: Sequence[int], batch_size: int) -> list[list[int]]:
    """Consecutive fixed-size chunks of ``indices`` (the last may be shorter)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    indices = list(indices)
    return [indices[i:i + batch_size] for i in range(0, len(indices), batch_size)]


def shard(items: Sequence[T], rank: int, world_size: int) -> list[T]:
    """Items ``rank, rank + world_size, ...``: a round-robin share for one process."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside 0..{world_size - 1}")
    return list(items)[rank::world_size]


def repeat_shuffled(items: Sequence[T], n: int, seed: int) -> list[T]:
    """``n`` items: ``items`` repeated as often as needed, each repetition shuffled with ``seed``.

    The authors' prompt list: the training captions, repeated and shuffled with a fixed seed.
    Each pass is a permutation, so every caption is used equally often (to within one).
    """
    if not items:
        raise ValueError("no items to draw prompts from")
    rng = np.random.default_rng(seed)
    out: list[T] = []
    while len(out) < n:
        out.extend(items[int(j)] for j in rng.permutation(len(items)))
    return out[:n]


PROMPT_SOURCES = ("captions", "class_names", "file")


def prompt_pool(info, source: str, prompt_file: str | None = None, caption_split: str = "train") -> list[str]:
    """The distinct prompts a generator draws from: a split's training captions (sorted by name),
    one class name per prompt, or the lines of ``prompt_file``. ValueError naming the file or the
    option when there are none."""
    from dataset.segmentation import load_captions  # here: it imports torch, which the writer's users need not

    if source == "captions":
        if not info.root().is_dir():
            raise ValueError(f"{info.root()}: data root of dataset '{info.name}' not found (its captions are "
                             "the prompts); pass --data_root or use --prompt_source class_names")
        captions = load_captions(info, caption_split)  # DatasetError (a ValueError) for a broken file
        if not captions:
            raise ValueError(f"{info.root()}: dataset '{info.name}' has no {caption_split} captions; make "
                             "them (utils/prepare_captions.py) or use --prompt_source class_names")
        return [captions[k] for k in sorted(captions)]
    if source == "class_names":
        return [info.class_name_caption([label]) for label in range(1, info.num_labels)]
    if source == "file":
        if not prompt_file or not Path(prompt_file).is_file():
            raise ValueError(f"{prompt_file}: prompt file not found (needed by --prompt_source file)")
        try:
            text = Path(prompt_file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"{prompt_file}: unreadable prompt file ({e})") from None
        pool = [line.strip() for line in text.splitlines() if line.strip()]
        if not pool:
            raise ValueError(f"{prompt_file}: no prompts in the file")
        return pool
    raise ValueError(f"--prompt_source must be captions, class_names or file, got {source!r}")


class SyntheticWriter:
    """Writes pairs into the layout above; safe to share between processes (one file per pair)."""

    def __init__(self, out_dir: str | Path, dataset_name: str, split: str = "train",
                 img_suffix: str = ".png", jpeg_quality: int = 95):
        if img_suffix not in IMAGE_SUFFIXES:
            raise ValueError(f"img_suffix must be one of {', '.join(IMAGE_SUFFIXES)}, got {img_suffix!r}")
        self.out = Path(out_dir)
        self.dataset_name = dataset_name
        self.split = split
        self.img_suffix = img_suffix
        self.jpeg_quality = jpeg_quality
        self.img_dir = self.out / "img_dir" / split
        self.ann_dir = self.out / "ann_dir" / split
        self.parts_dir = self.out / "parts"
        for d in (self.img_dir, self.ann_dir, self.parts_dir):
            d.mkdir(parents=True, exist_ok=True)

    @staticmethod
    def name(index: int) -> str:
        return f"{index:06d}"

    def part_path(self, index: int) -> Path:
        return self.parts_dir / f"{self.name(index)}.json"

    def is_done(self, index: int) -> bool:
        return self.part_path(index).is_file()

    def write_pair(self, index: int, image: np.ndarray, mask: np.ndarray, record: dict[str, Any]) -> dict:
        """Write one pair; the manifest record goes last, so its presence means the pair is complete."""
        image = np.asarray(image)
        mask = np.asarray(mask)
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"pair {index}: image must be HxWx3 uint8, got {image.dtype} {image.shape}")
        if mask.dtype != np.uint8 or mask.shape != image.shape[:2]:
            raise ValueError(f"pair {index}: mask must be uint8 {image.shape[:2]}, got {mask.dtype} {mask.shape}")
        name = self.name(index)
        img_path = self.img_dir / f"{name}{self.img_suffix}"
        ann_path = self.ann_dir / f"{name}.png"
        kw = {"quality": self.jpeg_quality} if self.img_suffix == ".jpg" else {}
        save_image_atomic(img_path, image, **kw)
        save_image_atomic(ann_path, mask)
        full = {"index": int(index), "name": name,
                "image": str(img_path.relative_to(self.out)), "mask": str(ann_path.relative_to(self.out)),
                **record}
        atomic_write_json(self.part_path(index), full)
        return full

    def records(self) -> list[dict]:
        """Every committed record, sorted by index."""
        rows = []
        for p in sorted(self.parts_dir.glob("[0-9]*.json")):
            rows.append(json.loads(p.read_text()))
        return sorted(rows, key=lambda r: r["index"])

    def check_settings(self, settings: dict[str, Any]) -> None:
        """ValueError if pairs already written here were made with other ``settings`` (a rerun
        resumes only the same job)."""
        done = self.records()
        if done and {k: done[0]["settings"].get(k) for k in settings} != settings:
            old = done[0]["settings"]
            diff = ", ".join(f"{k}={old.get(k)!r} (now {v!r})" for k, v in settings.items() if old.get(k) != v)
            raise ValueError(f"{self.out}: holds pairs made with other settings ({diff}); use another --output_dir")

    def remove_temporaries(self) -> int:
        """Delete leftovers of interrupted atomic writes (hidden ``.name.XXXX.tmp*`` files)."""
        n = 0
        for d in (self.img_dir, self.ann_dir, self.parts_dir, self.out, self.out / "captions"):
            if not d.is_dir():
                continue
            for e in os.scandir(d):
                if e.is_file() and e.name.startswith(".") and ".tmp" in e.name:
                    os.unlink(e.path)
                    n += 1
        return n

    def finalize(self, info, generator_name: str, settings: dict[str, Any],
                 expected: int | None = None, preview_count: int = 8) -> dict:
        """Merge records into manifest.jsonl, write captions, dataset.json and the preview sheet.

        Call once, on one process, after every process has finished writing. Contents depend
        only on the records, never on timing or process count, so reruns give the same bytes.
        """
        self.remove_temporaries()
        rows = self.records()
        if expected is not None and len(rows) != expected:
            raise RuntimeError(f"{self.out}: {len(rows)} of {expected} pairs are written; "
                               "rerun the same command to finish the missing ones")
        atomic_write_text(self.out / "manifest.jsonl",
                          "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
        atomic_write_json(self.out / "captions" / f"{self.split}.json",
                          {r["name"]: r.get("prompt", "") for r in rows})
        meta = {
            "dataset": self.dataset_name,
            "split": self.split,
            "num_pairs": len(rows),
            "generator": generator_name,
            "classes": list(info.classes),
            "palette": [list(c) for c in info.palette],
            "ignore_index": int(info.ignore_index),
            "img_suffix": self.img_suffix,
            "seg_map_suffix": ".png",
            "settings": settings,
        }
        atomic_write_json(self.out / "dataset.json", meta)
        if rows and preview_count > 0:
            write_preview(self.out, rows[:preview_count], info.palette, info.ignore_index)
        return meta


def link_or_copy(src: str | Path, dst: str | Path, link: bool = True) -> None:
    """Hard-link (or copy) ``src`` to ``dst`` through a temporary name, so ``dst`` is never partial.
    Falls back to a copy across filesystems or where links are not allowed."""
    src, dst = Path(src), Path(dst)
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp{dst.suffix}")
    tmp.unlink(missing_ok=True)
    try:
        if not link:
            raise OSError("copy requested")
        os.link(src, tmp)
    except OSError:
        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def write_subset(src_dir: str | Path, out_dir: str | Path, rows: Sequence[dict], meta: dict,
                 note: dict[str, Any]) -> dict:
    """A finished synthetic set holding only ``rows`` (manifest records of ``src_dir``): images and
    masks hard-linked, manifest, captions and ``dataset.json`` (with ``note`` as ``subset``) rewritten.
    ``dataset.json`` is written last, so a folder that has it is complete; rerunning redoes it."""
    src, out = Path(src_dir), Path(out_dir)
    for r in rows:
        for key in ("image", "mask"):
            (out / r[key]).parent.mkdir(parents=True, exist_ok=True)
            link_or_copy(src / r[key], out / r[key])
    (out / "dataset.json").unlink(missing_ok=True)
    atomic_write_text(out / "manifest.jsonl", "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
    split = meta.get("split", "train")
    atomic_write_json(out / "captions" / f"{split}.json", {r["name"]: r.get("prompt", "") for r in rows})
    sub = {**meta, "num_pairs": len(rows), "subset": {"of": str(src), **note}}
    atomic_write_json(out / "dataset.json", sub)
    return sub


def write_preview(out_dir: str | Path, rows: list[dict], palette, ignore_index: int = 255,
                  tile: int = 128) -> Path:
    """preview.png: one row per pair (image | coloured mask | overlay), tiles at most ``tile`` px."""
    from PIL import Image

    from utils.visualize import colorize, overlay, save_grid

    out_dir = Path(out_dir)
    grid_rows = []
    for r in rows:
        with Image.open(out_dir / r["image"]) as im:
            img = np.asarray(im.convert("RGB"))
        with Image.open(out_dir / r["mask"]) as im:
            mask = np.asarray(im)
        h, w = mask.shape
        s = min(1.0, tile / max(h, w))
        size = (max(1, round(w * s)), max(1, round(h * s)))
        if s < 1.0:
            img = np.asarray(Image.fromarray(img).resize(size, Image.BILINEAR))
            mask = np.asarray(Image.fromarray(mask).resize(size, Image.NEAREST))
        grid_rows.append([img, colorize(mask, palette, ignore_index),
                          overlay(img, mask, palette, ignore_index=ignore_index)])
    # small masks (toy: 32 px) are unreadable at 1:1; enlarge so the sheet is ~tile px per cell
    scale = max(1, tile // max(grid_rows[0][0].shape[:2]))
    path = out_dir / "preview.png"
    save_grid(path, grid_rows, scale=scale)
    return path
