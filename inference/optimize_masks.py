"""Stage 4: remove small noisy blobs from generated masks, one sibling dataset per threshold.

    python -m inference.optimize_masks --input data/gen/toy --thresholds 20 50 100 --reference_size 512

Writes ``data/gen/toy_optim20``, ``_optim50``, ``_optim100`` (next to the input, or under
``--output_root``) in the same layout as the input: images hard-linked (copied where links
are impossible), masks replaced, manifest/captions/dataset.json carried over, plus
``mask_optimization.json`` (pixels and components changed) and ``preview.png``. The input is
never modified. Thresholds are in pixels at ``reference_size``² and scale with the mask area.
A rerun skips masks already done (``optim_parts/<name>.json`` is written last for each).
"""
from __future__ import annotations

import functools
import json
import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from utils.config import die, parse_config, save_config
from utils.io import atomic_path, atomic_write_json, atomic_write_text, read_jsonl, save_image_atomic
from utils.mask_optimization import optimize_mask, scaled_threshold

STAT_KEYS = ("components", "small_components", "changed_components", "changed_pixels")


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


def _place_image(src: Path, dst: Path, link: bool) -> None:
    with atomic_path(dst) as tmp:
        tmp.unlink()
        try:
            if not link:
                raise OSError("copy requested")
            os.link(src, tmp)
        except OSError:  # other filesystem, or links not allowed: copy instead
            shutil.copyfile(src, tmp)


def _process(name: str, src: str, outs: list[str], thresholds: list[int], reference_size: int,
             ignore_index: int, split: str, img_suffix: str, link: bool) -> str:
    """One mask, every threshold; the stats record of each output is written last."""
    src_p = Path(src)
    mask = None
    for out, thr in zip(outs, thresholds):
        out_p = Path(out)
        part = out_p / "optim_parts" / f"{name}.json"
        if part.is_file():
            continue
        if mask is None:
            with Image.open(src_p / "ann_dir" / split / f"{name}.png") as im:
                mask = np.asarray(im)
        t = scaled_threshold(thr, mask.shape[0], mask.shape[1], reference_size)
        new, stats = optimize_mask(mask, t, ignore_index)
        save_image_atomic(out_p / "ann_dir" / split / f"{name}.png", new)
        _place_image(src_p / "img_dir" / split / f"{name}{img_suffix}",
                     out_p / "img_dir" / split / f"{name}{img_suffix}", link)
        atomic_write_json(part, {**stats, "pixels": int(mask.size), "scaled_threshold": t})
    return name


def _remove_temporaries(folder: Path) -> None:
    for root, _, files in os.walk(folder):
        for f in files:
            if f.startswith(".") and ".tmp" in f:
                os.unlink(os.path.join(root, f))


def _finalize(src: Path, out: Path, names: list[str], meta: dict, thr: int, cfg: OptimizeMasksConfig) -> dict:
    totals = dict.fromkeys(STAT_KEYS, 0)
    pixels = masks_changed = 0
    for name in names:
        rec = json.loads((out / "optim_parts" / f"{name}.json").read_text())
        for k in STAT_KEYS:
            totals[k] += rec[k]
        pixels += rec["pixels"]
        masks_changed += rec["changed_pixels"] > 0
    report = {"source": str(src), "threshold": thr, "reference_size": cfg.reference_size,
              "num_masks": len(names), "masks_changed": masks_changed, "pixels": pixels,
              "changed_pixel_fraction": round(totals["changed_pixels"] / max(pixels, 1), 8), **totals}
    for rel in ["manifest.jsonl"] + [str(p.relative_to(src)) for p in sorted((src / "captions").glob("*.json"))]:
        if (src / rel).is_file():
            atomic_write_text(out / rel, (src / rel).read_text())
    atomic_write_json(out / "dataset.json", {
        **meta, "mask_optimization": {"threshold": thr, "reference_size": cfg.reference_size, "source": str(src)}})
    atomic_write_json(out / "mask_optimization.json", report)
    rows = read_jsonl(out / "manifest.jsonl")[:8]
    if rows and "palette" in meta:
        from dataset.synthetic import write_preview

        write_preview(out, rows, meta["palette"], meta.get("ignore_index", 255))
    return report


def main(argv=None) -> None:
    cfg = parse_config(OptimizeMasksConfig, argv, description=__doc__)
    from tqdm import tqdm

    src = Path(cfg.input)
    if not cfg.input or not (src / "dataset.json").is_file():
        die(f"{cfg.input or '--input'}: not a generated dataset (no dataset.json); run inference.generate first")
    meta = json.loads((src / "dataset.json").read_text())
    if "mask_optimization" in meta:
        print(f"note: {src} is itself an optimized dataset; optimizing again", file=sys.stderr)
    split, img_suffix = meta.get("split", "train"), meta.get("img_suffix", ".png")
    ignore_index = int(meta.get("ignore_index", 255))
    if not cfg.thresholds or any(t <= 0 for t in cfg.thresholds) or cfg.reference_size <= 0:
        die("--thresholds and --reference_size must be positive")
    rows = read_jsonl(src / "manifest.jsonl")
    if rows:
        names = [r["name"] for r in rows]
    else:
        names = sorted(p.stem for p in (src / "ann_dir" / split).glob("*.png") if not p.name.startswith("."))
    if not names:
        die(f"{src}: no masks in ann_dir/{split}")

    root = Path(cfg.output_root) if cfg.output_root else src.resolve().parent
    thresholds = list(dict.fromkeys(cfg.thresholds))
    outs = [root / f"{src.resolve().name}_optim{t}" for t in thresholds]
    for out in outs:
        if out.resolve() == src.resolve():
            die(f"{out}: output would overwrite the input; pass another --output_root")
        for d in ("img_dir/" + split, "ann_dir/" + split, "optim_parts"):
            (out / d).mkdir(parents=True, exist_ok=True)
        _remove_temporaries(out)
        save_config(cfg, out / "config.yaml")

    todo = [n for n in names if not all((o / "optim_parts" / f"{n}.json").is_file() for o in outs)]
    if cfg.stop_after is not None:
        todo = todo[: cfg.stop_after]
    workers = cfg.num_workers or os.cpu_count() or 1
    work = functools.partial(_process, src=str(src), outs=[str(o) for o in outs], thresholds=thresholds,
                             reference_size=cfg.reference_size, ignore_index=ignore_index, split=split,
                             img_suffix=img_suffix, link=cfg.link_images)
    print(f"{len(names)} masks, {len(todo)} to do, thresholds {thresholds} at {cfg.reference_size}², "
          f"{workers} process(es)", file=sys.stderr)
    bar = tqdm(total=len(todo), unit="mask", desc="optimize masks", dynamic_ncols=True)
    if workers == 1 or len(todo) <= 1:
        for n in todo:
            work(n)
            bar.update()
    elif todo:
        import multiprocessing as mp

        with mp.get_context("spawn").Pool(min(workers, len(todo))) as pool:
            for _ in pool.imap_unordered(work, todo, chunksize=max(1, min(64, len(todo) // (4 * workers)))):
                bar.update()
    bar.close()

    if not all((o / "optim_parts" / f"{n}.json").is_file() for o in outs for n in names):
        print("stopped before the end; rerun the same command to finish", file=sys.stderr)
        return
    for out, thr in zip(outs, thresholds):
        r = _finalize(src, out, names, meta, thr, cfg)
        print(f"threshold {thr}: {r['changed_components']} of {r['components']} components and "
              f"{r['changed_pixels']} pixels ({100 * r['changed_pixel_fraction']:.3f}%) changed in "
              f"{r['masks_changed']} of {r['num_masks']} masks -> {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
