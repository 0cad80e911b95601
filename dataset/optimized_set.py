"""The files of mask optimization (stage 4): reading and checking a generated set's masks,
writing its optimized sibling set (masks, listings, report, preview), one mask per task.

    from dataset.optimized_set import load_source, check_pairs, optimize_mask_file
    meta, names = load_source(Path("data/gen/toy"))   # ValueError("<file>: <problem>") if bad

``inference.optimize_masks`` runs these over a process pool; the rule itself is
``utils.mask_optimization``. Every problem is a ValueError whose message names the file.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from dataset.synthetic import link_or_copy
from utils.io import atomic_write_bytes, atomic_write_json, atomic_write_text, read_jsonl
from utils.mask_optimization import STAT_KEYS, optimize_mask_thresholds, scaled_threshold
from utils.visualize import colorize, make_grid, overlay

COLOUR_MODES = ("RGB", "RGBA", "LA", "CMYK", "YCbCr")  # a mask in one of these holds colours, not labels
# label maps compress best as runs: no PNG filter and zlib's RLE strategy (lossless; smaller than
# PIL's default and about five times faster to write)
PNG_PARAMS = [cv2.IMWRITE_PNG_STRATEGY, cv2.IMWRITE_PNG_STRATEGY_RLE] + (
    [cv2.IMWRITE_PNG_FILTER, cv2.IMWRITE_PNG_FILTER_NONE] if hasattr(cv2, "IMWRITE_PNG_FILTER") else [])
PARTS = "optim_parts.jsonl"  # per output: one record per finished mask, written after its files
PREVIEW_ROWS, PREVIEW_TILE = 4, 128  # preview.png: the first pairs, tiles at most this many px a side


def decode_mask(path: Path) -> np.ndarray:
    """A mask's class indices; ValueError("<path>: <problem>") if its data is corrupt."""
    mask = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)  # twice as fast as PIL for grey PNGs
    if mask is None or mask.ndim != 2:  # a palette PNG (OpenCV gives its colours) or bad data
        try:
            with Image.open(path) as im:
                mask = np.asarray(im)
        except (OSError, ValueError, SyntaxError) as e:  # truncated or damaged data
            raise ValueError(f"{path}: cannot decode mask ({e})") from None
    return mask


def read_checked_mask(path: Path, num_labels: int | None, ignore_index: int) -> np.ndarray:
    """Decode a mask in full and check its labels; ValueError("<path>: <problem>") if it is corrupt."""
    mask = decode_mask(path)
    if num_labels is not None:
        present = np.flatnonzero(np.bincount(mask.ravel()))
        bad = present[(present >= num_labels) & (present != ignore_index)]
        if bad.size:
            raise ValueError(f"{path}: labels {bad.tolist()} outside 0..{num_labels - 1} "
                             f"(ignore {ignore_index})")
    return mask


def encode_label_png(mask: np.ndarray) -> bytes:
    """A label map as PNG bytes (``PNG_PARAMS``)."""
    ok, buf = cv2.imencode(".png", mask, PNG_PARAMS)
    if not ok:
        raise ValueError("PNG encoding failed")
    return buf.tobytes()


def _write_atomic(path: Path, data: bytes) -> None:
    """Write through a temporary name (a leftover is removed by ``remove_temporaries``)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp{path.suffix}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def optimize_mask_file(task: tuple[str, list[int]], src: str, outs: list[str], thresholds: list[int],
                       reference_size: int, ignore_index: int, num_labels: int | None, split: str,
                       img_suffix: str, link: bool) -> tuple[str, str, list[tuple[int, dict]]]:
    """One mask for the outputs ``task[1]`` (indices into ``outs``), every threshold from one labelling.

    Returns ``(name, problem, records)``: ``problem`` is "" when done, "<path>: <problem>" when
    the mask is skipped; ``records`` pairs each output index with the mask's stats record, which
    the main process appends to that output's PARTS once the files are in place.
    """
    name, which = task
    src_p = Path(src)
    try:
        mask = read_checked_mask(src_p / "ann_dir" / split / f"{name}.png", num_labels, ignore_index)
    except ValueError as e:
        return name, str(e), []
    scaled = [scaled_threshold(thresholds[i], mask.shape[0], mask.shape[1], reference_size) for i in which]
    records = []
    for i, t, (new, stats) in zip(which, scaled, optimize_mask_thresholds(mask, scaled, ignore_index)):
        out_p = Path(outs[i])
        _write_atomic(out_p / "ann_dir" / split / f"{name}.png", encode_label_png(new))
        link_or_copy(src_p / "img_dir" / split / f"{name}{img_suffix}",
                     out_p / "img_dir" / split / f"{name}{img_suffix}", link)
        records.append((i, {"name": name, **stats, "pixels": int(mask.size), "scaled_threshold": t}))
    return name, "", records


def load_parts(out: Path) -> dict[str, dict]:
    """The records of the masks an earlier run finished in ``out``.

    A line cut by a crash is skipped (so is the record a later run appended right after it:
    that mask is simply done again).
    """
    records = {}
    if (out / PARTS).is_file():
        for line in (out / PARTS).read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(rec, dict) and isinstance(rec.get("name"), str):
                records[rec["name"]] = rec
    return records


def remove_temporaries(folder: Path) -> None:
    for root, _, files in os.walk(folder):
        for f in files:
            if f.startswith(".") and ".tmp" in f:
                os.unlink(os.path.join(root, f))


def _copy_listing(src: Path, out: Path, rel: str, keep: set[str], skipped: dict) -> None:
    """Copy the manifest or a caption file, leaving out the skipped pairs (verbatim when none are)."""
    if not (src / rel).is_file():
        return
    text = (src / rel).read_text()
    if not skipped:
        atomic_write_text(out / rel, text)
    elif rel.endswith(".jsonl"):
        atomic_write_text(out / rel, "".join(line + "\n" for line in text.splitlines()
                                             if line.strip() and json.loads(line).get("name") in keep))
    else:
        atomic_write_json(out / rel, {k: v for k, v in json.loads(text).items() if k in keep})


def finalize_output(src: Path, out: Path, names: list[str], parts: dict[str, dict], skipped: dict[str, str], meta: dict,
              thr: int, reference_size: int) -> dict:
    """Write one threshold's finished output: PARTS in manifest order, the listings without the
    skipped pairs, dataset.json and mask_optimization.json; returns the report."""
    totals = dict.fromkeys(STAT_KEYS, 0)
    pixels = masks_changed = 0
    # in manifest order, so the file does not depend on how many processes ran or on resumes
    atomic_write_text(out / PARTS, "".join(json.dumps(parts[n], sort_keys=True) + "\n" for n in names))
    for name in names:
        rec = parts[name]
        for k in STAT_KEYS:
            totals[k] += rec[k]
        pixels += rec["pixels"]
        masks_changed += rec["changed_pixels"] > 0
    report = {"source": str(src), "threshold": thr, "reference_size": reference_size,
              "num_masks": len(names), "masks_changed": masks_changed, "pixels": pixels,
              "changed_pixel_fraction": round(totals["changed_pixels"] / max(pixels, 1), 8), **totals,
              "skipped_masks": len(skipped), "skipped": dict(sorted(skipped.items()))}
    keep = set(names)
    for rel in ["manifest.jsonl"] + [str(p.relative_to(src)) for p in sorted((src / "captions").glob("*.json"))]:
        _copy_listing(src, out, rel, keep, skipped)
    atomic_write_json(out / "dataset.json", {
        **meta, "num_pairs": len(names),
        "mask_optimization": {"threshold": thr, "reference_size": reference_size, "source": str(src)}})
    atomic_write_json(out / "mask_optimization.json", report)
    return report


def _tile_size(h: int, w: int) -> tuple[int, int]:
    s = min(1.0, PREVIEW_TILE / max(h, w))
    return max(1, round(w * s)), max(1, round(h * s))


def write_previews(src: Path, outs: list[Path], names: list[str], meta: dict, split: str, img_suffix: str) -> None:
    """One sheet, written as each output's preview.png: per pair, image | input mask | the mask
    after each threshold (in order) | overlay of the last, for the first PREVIEW_ROWS pairs."""
    palette, ignore = meta["palette"], int(meta.get("ignore_index", 255))
    rows = []
    for name in names[:PREVIEW_ROWS]:
        image = cv2.imread(str(src / "img_dir" / split / f"{name}{img_suffix}"), cv2.IMREAD_COLOR)
        if image is None:
            continue  # unreadable images are the segmenter's to report; a preview is not worth a stop
        size = _tile_size(*image.shape[:2])
        image = np.ascontiguousarray(cv2.resize(image, size, interpolation=cv2.INTER_AREA)[..., ::-1])
        masks = [cv2.resize(decode_mask(folder / "ann_dir" / split / f"{name}.png"), size,
                            interpolation=cv2.INTER_NEAREST) for folder in [src, *outs]]
        rows.append([image, *(colorize(m, palette, ignore) for m in masks),
                     overlay(image, masks[-1], palette, ignore_index=ignore)])
    if rows:
        sheet = cv2.imencode(".png", make_grid(rows)[..., ::-1])[1].tobytes()
        for out in outs:
            atomic_write_bytes(out / "preview.png", sheet)


def load_source(src: Path) -> tuple[dict, list[str]]:
    """``dataset.json`` and the pair names of ``manifest.jsonl``; one line naming the file if either is bad."""
    meta_path, manifest = src / "dataset.json", src / "manifest.jsonl"
    if not meta_path.is_file():
        raise ValueError(f"{src}: not a generated dataset (no dataset.json); run inference.generate first")
    try:
        meta = json.loads(meta_path.read_bytes())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{meta_path}: cannot read ({e})")
    if not isinstance(meta, dict):
        raise ValueError(f"{meta_path}: not a JSON object")
    if not manifest.is_file():
        raise ValueError(f"{manifest}: missing; the generation run did not finish (rerun it to finalize {src})")
    rows = read_jsonl(manifest)  # stops at a line cut short
    expected = meta.get("num_pairs")
    if isinstance(expected, int) and len(rows) < expected:
        raise ValueError(f"{manifest}: {len(rows)} readable records but {meta_path.name} says {expected} pairs (cut short?)")
    for i, r in enumerate(rows):
        if not isinstance(r, dict) or not isinstance(r.get("name"), str):
            raise ValueError(f"{manifest}: record {i + 1} has no pair name")
    if not rows:
        raise ValueError(f"{manifest}: no pairs listed")
    return meta, [r["name"] for r in rows]


def _header(path: Path, kind: str) -> tuple[tuple[int, int], str]:
    try:
        with Image.open(path) as im:
            return im.size, im.mode
    except (OSError, ValueError, SyntaxError) as e:
        raise ValueError(f"{path}: cannot read the {kind} ({e})")


def check_pairs(src: Path, names: list[str], split: str, img_suffix: str) -> None:
    """Before any work (header reads only): each listed mask and image exists and reads, sizes agree."""
    ann_dir, img_dir = src / "ann_dir" / split, src / "img_dir" / split
    for folder in (ann_dir, img_dir):
        if not folder.is_dir():
            raise ValueError(f"{folder}: folder missing")
    have = {e.name for e in os.scandir(ann_dir)} | {f"img:{e.name}" for e in os.scandir(img_dir)}
    for name in names:
        mask_path, img_path = ann_dir / f"{name}.png", img_dir / f"{name}{img_suffix}"
        if mask_path.name not in have:
            raise ValueError(f"{mask_path}: mask missing (listed in {src / 'manifest.jsonl'})")
        if f"img:{img_path.name}" not in have:
            raise ValueError(f"{img_path}: image missing (its mask is {mask_path})")
        (mw, mh), mode = _header(mask_path, "mask")
        (iw, ih), _ = _header(img_path, "image")
        if mode in COLOUR_MODES:
            raise ValueError(f"{mask_path}: mask has mode {mode}; masks must be single-channel class indices")
        if (mw, mh) != (iw, ih):
            raise ValueError(f"{mask_path}: mask is {mw}x{mh} but its image {img_path} is {iw}x{ih}")
