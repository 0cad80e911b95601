"""Make the built-in toy dataset ("shapes"): the default dataset of every stage, no download.

    python -m utils.make_toy_dataset --out data/toy --size 32 --num_train 4000 --num_val 500

Writes the layout of ``dataset/toy_semantic.py`` (img_dir/, ann_dir/, captions/) plus
``toy.json`` (the settings) and ``preview.png`` (images over their coloured masks). Rerunning
the same command finishes an interrupted run and otherwise changes nothing.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from utils.config import die, parse_config


@dataclass
class MakeToyConfig:
    """Make the procedural toy segmentation dataset."""

    out: str = field(default="data/toy", metadata={"help": "output folder (toy data_root)"})
    size: int = field(default=32, metadata={"help": "image side in pixels (the benchmark uses 32)"})
    num_train: int = field(default=4000, metadata={"help": "training images"})
    num_val: int = field(default=500, metadata={"help": "validation images"})
    seed: int = field(default=0, metadata={"help": "base seed; train and val seeds never overlap"})
    max_shapes: int = field(default=2, metadata={"help": "at most this many shapes per image"})
    preview: int = field(default=8, metadata={"help": "training samples shown in preview.png"})
    progress: bool = field(default=True, metadata={"help": "show a progress bar"})


def save_preview(out: Path, count: int) -> list[tuple[str, str]]:
    """A sheet of the first ``count`` training pairs (image row over mask row); returns captions."""
    import json

    from dataset.segmentation import read_image, read_mask
    from dataset.toy_semantic import INFO
    from utils.visualize import colorize, save_grid

    spec = INFO.splits["train"]
    captions = json.loads((out / spec.caption_file).read_text())
    names = sorted(captions)[:count]
    images = [read_image(out / spec.img_dir / (n + INFO.img_suffix)) for n in names]
    masks = [colorize(read_mask(out / spec.ann_dir / (n + INFO.seg_map_suffix), INFO), INFO.palette)
             for n in names]
    side = images[0].shape[0]
    save_grid(out / "preview.png", [images, masks], scale=max(1, 128 // side))
    return [(n, captions[n]) for n in names]


def main(argv=None) -> None:
    cfg = parse_config(MakeToyConfig, argv, description=__doc__)
    if cfg.size < 8:
        die(f"--size {cfg.size}: toy images need at least 8 pixels")
    if cfg.num_train < 1 or cfg.num_val < 0:
        die("--num_train must be >= 1 and --num_val >= 0")
    if cfg.max_shapes < 1:
        die(f"--max_shapes {cfg.max_shapes}: need at least 1")
    if cfg.seed < 0:
        die(f"--seed {cfg.seed}: must be >= 0")

    from dataset.toy_shapes import write_toy_dataset

    out = Path(cfg.out)
    start = time.perf_counter()
    try:
        report = write_toy_dataset(out, cfg.size, cfg.num_train, cfg.num_val, seed=cfg.seed,
                                   max_shapes=cfg.max_shapes, progress=cfg.progress)
    except ValueError as e:
        die(str(e))
    seconds = time.perf_counter() - start
    for split, r in report.items():
        print(f"{split}: {r['written']} pairs written, {r['skipped']} already there")
    wrote = sum(r["written"] for r in report.values())
    if cfg.preview > 0 and (wrote or not (out / "preview.png").exists()):
        for name, caption in save_preview(out, cfg.preview):
            print(f"  {name}: {caption}")
        print(f"preview: {out / 'preview.png'}")
    total = cfg.num_train + cfg.num_val
    print(f"toy dataset ({total} pairs, {cfg.size}px) in {out} ({seconds:.1f} s); "
          f"use it with --data_root {out} or the default data/toy")


if __name__ == "__main__":
    main()
