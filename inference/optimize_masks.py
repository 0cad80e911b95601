"""Stage 4: remove small noisy blobs from generated masks, one sibling dataset per threshold.

    python -m inference.optimize_masks --input data/gen/toy --thresholds 20 50 100 --reference_size 512

Writes ``data/gen/toy_optim20``, ``_optim50``, ``_optim100`` (next to the input, or under
``--output_root``) in the same layout as the input: images hard-linked (copied where links
are impossible), masks replaced, manifest/captions/dataset.json carried over, plus
``mask_optimization.json`` (pixels and components changed) and ``preview.png`` (the same sheet
in each: image | input mask | the mask after each threshold | overlay). The input is
never modified. Thresholds are in pixels at ``reference_size``² and scale with the mask area;
every threshold is computed from one labelling of each mask (``utils.mask_optimization``).
A rerun skips masks already done (each output's ``optim_parts.jsonl`` gets a mask's record
after its files are in place).

Bad input stops the run before any mask is written, with one line naming the file: no
``dataset.json`` or ``manifest.jsonl``, a manifest shorter than ``dataset.json`` says, a listed
mask or image missing, a header that does not read, a colour mask, a mask whose size differs
from its image. A mask that turns out corrupt when decoded (truncated, labels outside the
dataset's classes other than its ignore value) is named, skipped and counted: its pair is left
out of the outputs (manifest, captions and ``mask_optimization.json`` say which), and the run
goes on unless more than ``--max_bad_fraction`` of the masks are bad.
"""
from __future__ import annotations

import contextlib
import functools
import json
import multiprocessing as mp
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
from PIL import Image
from tqdm import tqdm

from dataset.synthetic import link_or_copy
from utils.config import die, parse_config, save_config
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


@dataclass
class OptimizeMasksConfig:
    """Relabel small connected components of generated masks (METHOD.md §5)."""

    input: str = field(default="", metadata={"help": "generated dataset folder (inference.generate output)"})
    thresholds: list[int] = field(default_factory=lambda: [20, 50, 100], metadata={
        "help": "area thresholds in pixels at reference_size² (paper: 20 50 100 at 512²)"})
    reference_size: int = field(default=512, metadata={"help": "side the thresholds refer to"})
    output_root: str | None = field(default=None, metadata={"help": "where <input name>_optim<T> go (default: beside the input)"})
    num_workers: int = field(default=0, metadata={"help": "processes (0 = all CPU cores)"})
    link_images: bool = field(default=True, metadata={"help": "hard-link images instead of copying"})
    stop_after: int | None = field(default=None, metadata={"help": "stop after this many masks (split a long job)"})
    max_bad_fraction: float = field(default=0.01, metadata={
        "help": "share of masks that may turn out corrupt (skipped) before the run stops; at least one"})


def _decode_mask(path: Path) -> np.ndarray:
    """A mask's class indices; ValueError("<path>: <problem>") if its data is corrupt."""
    mask = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)  # twice as fast as PIL for grey PNGs
    if mask is None or mask.ndim != 2:  # a palette PNG (OpenCV gives its colours) or bad data
        try:
            with Image.open(path) as im:
                mask = np.asarray(im)
        except (OSError, ValueError, SyntaxError) as e:  # truncated or damaged data
            raise ValueError(f"{path}: cannot decode mask ({e})") from None
    return mask


def _read_mask(path: Path, num_labels: int | None, ignore_index: int) -> np.ndarray:
    """Decode a mask in full and check its labels; ValueError("<path>: <problem>") if it is corrupt."""
    mask = _decode_mask(path)
    if num_labels is not None:
        present = np.flatnonzero(np.bincount(mask.ravel()))
        bad = present[(present >= num_labels) & (present != ignore_index)]
        if bad.size:
            raise ValueError(f"{path}: labels {bad.tolist()} outside 0..{num_labels - 1} "
                             f"(ignore {ignore_index})")
    return mask


def _encode_png(mask: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", mask, PNG_PARAMS)
    if not ok:
        raise ValueError("PNG encoding failed")
    return buf.tobytes()


def _write_atomic(path: Path, data: bytes) -> None:
    """Write through a temporary name (a leftover is removed by ``_remove_temporaries``)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp{path.suffix}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _process(task: tuple[str, list[int]], src: str, outs: list[str], thresholds: list[int], reference_size: int,
             ignore_index: int, num_labels: int | None, split: str, img_suffix: str,
             link: bool) -> tuple[str, str, list[tuple[int, dict]]]:
    """One mask for the outputs ``task[1]`` (indices into ``outs``), every threshold from one labelling.

    Returns ``(name, problem, records)``: ``problem`` is "" when done, "<path>: <problem>" when
    the mask is skipped; ``records`` pairs each output index with the mask's stats record, which
    the main process appends to that output's PARTS once the files are in place.
    """
    name, which = task
    src_p = Path(src)
    try:
        mask = _read_mask(src_p / "ann_dir" / split / f"{name}.png", num_labels, ignore_index)
    except ValueError as e:
        return name, str(e), []
    scaled = [scaled_threshold(thresholds[i], mask.shape[0], mask.shape[1], reference_size) for i in which]
    records = []
    for i, t, (new, stats) in zip(which, scaled, optimize_mask_thresholds(mask, scaled, ignore_index)):
        out_p = Path(outs[i])
        _write_atomic(out_p / "ann_dir" / split / f"{name}.png", _encode_png(new))
        link_or_copy(src_p / "img_dir" / split / f"{name}{img_suffix}",
                     out_p / "img_dir" / split / f"{name}{img_suffix}", link)
        records.append((i, {"name": name, **stats, "pixels": int(mask.size), "scaled_threshold": t}))
    return name, "", records


def _load_parts(out: Path) -> dict[str, dict]:
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


def _remove_temporaries(folder: Path) -> None:
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


def _finalize(src: Path, out: Path, names: list[str], parts: dict[str, dict], skipped: dict[str, str], meta: dict,
              thr: int, cfg: OptimizeMasksConfig) -> dict:
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
    report = {"source": str(src), "threshold": thr, "reference_size": cfg.reference_size,
              "num_masks": len(names), "masks_changed": masks_changed, "pixels": pixels,
              "changed_pixel_fraction": round(totals["changed_pixels"] / max(pixels, 1), 8), **totals,
              "skipped_masks": len(skipped), "skipped": dict(sorted(skipped.items()))}
    keep = set(names)
    for rel in ["manifest.jsonl"] + [str(p.relative_to(src)) for p in sorted((src / "captions").glob("*.json"))]:
        _copy_listing(src, out, rel, keep, skipped)
    atomic_write_json(out / "dataset.json", {
        **meta, "num_pairs": len(names),
        "mask_optimization": {"threshold": thr, "reference_size": cfg.reference_size, "source": str(src)}})
    atomic_write_json(out / "mask_optimization.json", report)
    return report


def _tile_size(h: int, w: int) -> tuple[int, int]:
    s = min(1.0, PREVIEW_TILE / max(h, w))
    return max(1, round(w * s)), max(1, round(h * s))


def _write_previews(src: Path, outs: list[Path], names: list[str], meta: dict, split: str, img_suffix: str) -> None:
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
        masks = [cv2.resize(_decode_mask(folder / "ann_dir" / split / f"{name}.png"), size,
                            interpolation=cv2.INTER_NEAREST) for folder in [src, *outs]]
        rows.append([image, *(colorize(m, palette, ignore) for m in masks),
                     overlay(image, masks[-1], palette, ignore_index=ignore)])
    if rows:
        sheet = cv2.imencode(".png", make_grid(rows)[..., ::-1])[1].tobytes()
        for out in outs:
            atomic_write_bytes(out / "preview.png", sheet)


def _load_source(src: Path) -> tuple[dict, list[str]]:
    """``dataset.json`` and the pair names of ``manifest.jsonl``; one line naming the file if either is bad."""
    meta_path, manifest = src / "dataset.json", src / "manifest.jsonl"
    if not meta_path.is_file():
        die(f"{src}: not a generated dataset (no dataset.json); run inference.generate first")
    try:
        meta = json.loads(meta_path.read_bytes())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        die(f"{meta_path}: cannot read ({e})")
    if not isinstance(meta, dict):
        die(f"{meta_path}: not a JSON object")
    if not manifest.is_file():
        die(f"{manifest}: missing; the generation run did not finish (rerun it to finalize {src})")
    rows = read_jsonl(manifest)  # stops at a line cut short
    expected = meta.get("num_pairs")
    if isinstance(expected, int) and len(rows) < expected:
        die(f"{manifest}: {len(rows)} readable records but {meta_path.name} says {expected} pairs (cut short?)")
    for i, r in enumerate(rows):
        if not isinstance(r, dict) or not isinstance(r.get("name"), str):
            die(f"{manifest}: record {i + 1} has no pair name")
    if not rows:
        die(f"{manifest}: no pairs listed")
    return meta, [r["name"] for r in rows]


def _header(path: Path, kind: str) -> tuple[tuple[int, int], str]:
    try:
        with Image.open(path) as im:
            return im.size, im.mode
    except (OSError, ValueError, SyntaxError) as e:
        die(f"{path}: cannot read the {kind} ({e})")


def _check_pairs(src: Path, names: list[str], split: str, img_suffix: str) -> None:
    """Before any work (header reads only): each listed mask and image exists and reads, sizes agree."""
    ann_dir, img_dir = src / "ann_dir" / split, src / "img_dir" / split
    for folder in (ann_dir, img_dir):
        if not folder.is_dir():
            die(f"{folder}: folder missing")
    have = {e.name for e in os.scandir(ann_dir)} | {f"img:{e.name}" for e in os.scandir(img_dir)}
    for name in names:
        mask_path, img_path = ann_dir / f"{name}.png", img_dir / f"{name}{img_suffix}"
        if mask_path.name not in have:
            die(f"{mask_path}: mask missing (listed in {src / 'manifest.jsonl'})")
        if f"img:{img_path.name}" not in have:
            die(f"{img_path}: image missing (its mask is {mask_path})")
        (mw, mh), mode = _header(mask_path, "mask")
        (iw, ih), _ = _header(img_path, "image")
        if mode in COLOUR_MODES:
            die(f"{mask_path}: mask has mode {mode}; masks must be single-channel class indices")
        if (mw, mh) != (iw, ih):
            die(f"{mask_path}: mask is {mw}x{mh} but its image {img_path} is {iw}x{ih}")


def _run(todo: list[tuple[str, list[int]]], work, workers: int, outs: list[Path], parts: list[dict],
         max_bad_fraction: float, num_masks: int, mask_dir: Path) -> dict[str, str]:
    """Process ``todo`` here or in a pool; append each finished mask's records to its outputs'
    PARTS; return the bad masks ({name: problem}), stopping with one line once more than
    ``max_bad_fraction`` of the ``num_masks`` (at least one) are bad."""
    bad: dict[str, str] = {}
    allowed_bad = max(1, int(max_bad_fraction * num_masks))
    bar = tqdm(total=len(todo), unit="mask", desc="optimize masks", dynamic_ncols=True)
    with contextlib.ExitStack() as stack:
        logs = [stack.enter_context(open(out / PARTS, "a")) for out in outs]
        if workers == 1 or len(todo) <= 1:
            results = map(work, todo)
        else:
            pool = stack.enter_context(mp.get_context("spawn").Pool(
                min(workers, len(todo)), initializer=cv2.setNumThreads, initargs=(1,)))
            results = pool.imap_unordered(work, todo, chunksize=max(1, min(64, len(todo) // (4 * workers))))
        for name, problem, records in results:
            for i, rec in records:
                logs[i].write(json.dumps(rec, sort_keys=True) + "\n")
                logs[i].flush()
                parts[i][name] = rec
            bar.update()
            if problem:
                bad[name] = problem
                tqdm.write(f"skipped: {problem}", file=sys.stderr)
                if len(bad) > allowed_bad:
                    bar.close()
                    die(f"{mask_dir}: {len(bad)} of {num_masks} masks bad, more than the allowed share "
                        f"(max_bad_fraction={max_bad_fraction}); latest {problem}")
    bar.close()
    return bad


def main(argv=None) -> None:
    cfg = parse_config(OptimizeMasksConfig, argv, description=__doc__)
    if not cfg.input:
        die("--input: not given; pass the generated dataset folder")
    src = Path(cfg.input)
    meta, names = _load_source(src)
    if "mask_optimization" in meta:
        print(f"note: {src} is itself an optimized dataset; optimizing again", file=sys.stderr)
    split, img_suffix = meta.get("split", "train"), meta.get("img_suffix", ".png")
    ignore_index = int(meta.get("ignore_index", 255))
    num_labels = len(meta["classes"]) if isinstance(meta.get("classes"), list) else None
    if not cfg.thresholds or any(t <= 0 for t in cfg.thresholds) or cfg.reference_size <= 0:
        die("--thresholds and --reference_size must be positive")
    if not 0.0 <= cfg.max_bad_fraction <= 1.0:
        die(f"--max_bad_fraction must be in [0, 1], got {cfg.max_bad_fraction}")

    root = Path(cfg.output_root) if cfg.output_root else src.resolve().parent
    thresholds = list(dict.fromkeys(cfg.thresholds))
    outs = [root / f"{src.resolve().name}_optim{t}" for t in thresholds]
    for out in outs:
        if out.resolve() == src.resolve():
            die(f"{out}: output would overwrite the input; pass another --output_root")
    parts = [_load_parts(out) for out in outs]
    todo = [(n, [i for i, p in enumerate(parts) if n not in p]) for n in names]
    todo = [t for t in todo if t[1]][: cfg.stop_after]
    _check_pairs(src, [n for n, _ in todo], split, img_suffix)
    for out in outs:
        for d in ("img_dir/" + split, "ann_dir/" + split):
            (out / d).mkdir(parents=True, exist_ok=True)
        _remove_temporaries(out)
        save_config(cfg, out / "config.yaml")

    workers = cfg.num_workers or os.cpu_count() or 1
    cv2.setNumThreads(1)  # one thread per process: --num_workers sets the parallelism
    work = functools.partial(_process, src=str(src), outs=[str(o) for o in outs], thresholds=thresholds,
                             reference_size=cfg.reference_size, ignore_index=ignore_index, num_labels=num_labels,
                             split=split, img_suffix=img_suffix, link=cfg.link_images)
    print(f"{len(names)} masks, {len(todo)} to do, thresholds {thresholds} at {cfg.reference_size}², "
          f"{workers} process(es)", file=sys.stderr)
    bad = _run(todo, work, workers, outs, parts, cfg.max_bad_fraction, len(names), src / "ann_dir" / split)

    done = [n for n in names if all(n in p for p in parts)]
    if len(done) + len(bad) < len(names):
        print("stopped before the end; rerun the same command to finish", file=sys.stderr)
        return
    if bad:
        print(f"{len(bad)} bad mask(s) skipped and left out of the outputs: "
              f"{', '.join(sorted(bad))} (listed in mask_optimization.json)", file=sys.stderr)
    for out, thr, out_parts in zip(outs, thresholds, parts):
        r = _finalize(src, out, done, out_parts, bad, meta, thr, cfg)
        print(f"threshold {thr}: {r['changed_components']} of {r['components']} components and "
              f"{r['changed_pixels']} pixels ({100 * r['changed_pixel_fraction']:.3f}%) changed in "
              f"{r['masks_changed']} of {r['num_masks']} masks -> {out}", file=sys.stderr)
    if "palette" in meta:
        _write_previews(src, outs, done, meta, split, img_suffix)


if __name__ == "__main__":
    main()
