"""DiffuMask augmentation: mosaics of 2x1, 2x2, 3x3 synthetic pairs, written as a new synthetic set.

    python -m inference.diffumask_mosaic --data_dir data/diffumask/toy --output_dir data/diffumask/toy_mosaic \\
        --num_mosaics 1000 --layouts 2x1 2x2 3x3

Mosaic i draws its layout and source pairs from ``pair_seed(seed, i)`` alone; the output has the
same layout and manifest as any generator's (``dataset/synthetic.py``), each record naming its
sources. ``--list_file kept.txt`` draws only from the pairs the noise filter kept.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from dataset import get_dataset_info
from dataset.synthetic import SyntheticWriter, pair_seed
from models.diffumask.data import load_pair, read_synthetic
from models.diffumask.mosaic import make_mosaic, parse_layout
from utils.config import die, parse_config
from utils.io import RunDir


@dataclass
class MosaicConfig:
    """Mosaic augmentation of a synthetic set (DiffuMask)."""

    data_dir: str = field(default="data/diffumask/voc", metadata={"help": "a finished synthetic set"})
    output_dir: str = field(default="data/diffumask/voc_mosaic", metadata={"help": "new synthetic set"})
    list_file: str = field(default="", metadata={"help": "names to draw from (e.g. kept.txt); empty = all"})
    num_mosaics: int = field(default=1000, metadata={"help": "mosaics to write"})
    layouts: list[str] = field(default_factory=lambda: ["2x1", "2x2", "3x3"], metadata={"help": "COLSxROWS"})
    out_size: int = field(default=0, metadata={"help": "output side in px; 0 = the source size"})
    seed: int = field(default=0, metadata={"help": "base seed"})


def main(argv=None) -> dict:
    cfg = parse_config(MosaicConfig, argv, description=__doc__)
    try:
        meta, rows = read_synthetic(cfg.data_dir, cfg.list_file or None)
        layouts = [parse_layout(t) for t in cfg.layouts]
        info = get_dataset_info(meta["dataset"])
    except ValueError as e:
        die(f"{cfg.data_dir}: {e}")
    run = RunDir(cfg.output_dir, name="diffumask_mosaic")
    run.save_config(cfg)
    writer = SyntheticWriter(cfg.output_dir, meta["dataset"], img_suffix=meta.get("img_suffix", ".png"))
    for i in range(cfg.num_mosaics):
        if writer.is_done(i):
            continue
        rng = np.random.default_rng(pair_seed(cfg.seed, i))
        cols, rows_n = layouts[int(rng.integers(len(layouts)))]
        picks = rng.choice(len(rows), size=cols * rows_n, replace=len(rows) < cols * rows_n)
        sources = [rows[int(k)] for k in picks]
        pairs = [load_pair(cfg.data_dir, r) for r in sources]
        size = cfg.out_size or pairs[0][0].shape[0]
        image, mask = make_mosaic(pairs, (cols, rows_n), size)
        writer.write_pair(i, image, mask, {
            "prompt": " | ".join(r.get("prompt", "") for r in sources), "seed": pair_seed(cfg.seed, i),
            "layout": f"{cols}x{rows_n}", "sources": [r["name"] for r in sources],
            "generator": "diffumask_mosaic", "source_dir": str(cfg.data_dir)})
    settings = {k: v for k, v in vars(cfg).items() if k != "output_dir"}
    out = writer.finalize(info, "diffumask_mosaic", settings, expected=cfg.num_mosaics)
    run.log(f"wrote {cfg.num_mosaics} mosaics to {cfg.output_dir}")
    run.close()
    return out


if __name__ == "__main__":
    main()
