"""DiffuMask augmentation: mosaics of 2x1, 2x2, 3x3 synthetic pairs, written as a new synthetic set.

    python -m inference.diffumask_mosaic --data_dir data/diffumask/toy --output_dir data/diffumask/toy_mosaic \\
        --num_mosaics 1000 --layouts 2x1 2x2 3x3

Mosaic i draws its layout and source pairs from ``pair_seed(seed, i)`` alone; the output has the
same layout and manifest as any generator's (``dataset/synthetic.py``), each record naming its
sources. ``--list_file kept.txt`` draws only from the pairs the noise filter kept.

Every source file's header is checked first (a missing mask, an unreadable image, sizes that
differ stop the run at once); a source that turns out corrupt when decoded is named in the log,
replaced by the next readable pair and counted, and the run stops if more than
``max_bad_fraction`` of the sources are bad.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from dataset import get_dataset_info
from dataset.synthetic import SyntheticWriter, pair_seed
from models.diffumask.data import check_pairs, load_pair, read_synthetic, too_many_bad
from models.diffumask.mosaic import make_mosaic, parse_layout
from utils.config import die, parse_config
from utils.io import RunDir


@dataclass
class MosaicConfig:
    """Mosaic augmentation of a synthetic set (DiffuMask)."""

    data_dir: str = field(default="data/synthetic/voc/diffumask", metadata={"help": "a finished synthetic set"})
    output_dir: str = field(default="data/synthetic/voc/diffumask_mosaic", metadata={"help": "new synthetic set"})
    list_file: str = field(default="", metadata={"help": "names to draw from (e.g. kept.txt); empty = all"})
    num_mosaics: int = field(default=1000, metadata={"help": "mosaics to write"})
    layouts: list[str] = field(default_factory=lambda: ["2x1", "2x2", "3x3"], metadata={"help": "COLSxROWS"})
    out_size: int = field(default=0, metadata={"help": "output side in px; 0 = the source size"})
    seed: int = field(default=0, metadata={"help": "base seed"})
    max_bad_fraction: float = field(default=0.01, metadata={
        "help": "share of source pairs that may turn out corrupt (replaced) before the run stops; >= 1 file"})


class _Sources:
    """Source pairs by position; a corrupt one is named, remembered and replaced by the next
    readable pair, so a mosaic's sources depend only on its seed and on which files are bad."""

    def __init__(self, folder, rows, log, max_bad_fraction):
        self.folder, self.rows, self.log, self.max_bad_fraction = folder, rows, log, max_bad_fraction
        self.bad: dict[int, str] = {}

    def get(self, k: int):
        for step in range(len(self.rows)):
            j = (k + step) % len(self.rows)
            if j in self.bad:
                continue
            try:
                return self.rows[j], load_pair(self.folder, self.rows[j])
            except ValueError as e:
                self.bad[j] = str(e)
                self.log(f"skipped {e} ({len(self.bad)} bad source files so far)")
                if too_many_bad(len(self.bad), len(self.rows), self.max_bad_fraction):
                    raise ValueError(f"{len(self.bad)} of {len(self.rows)} source pairs bad, more than the "
                                     f"allowed share (max_bad_fraction={self.max_bad_fraction}); first: "
                                     f"{next(iter(self.bad.values()))}") from None
        raise ValueError(f"{self.folder}: no readable pairs")


def main(argv=None) -> dict:
    cfg = parse_config(MosaicConfig, argv, description=__doc__)
    try:
        meta, rows = read_synthetic(cfg.data_dir, cfg.list_file or None)
        check_pairs(cfg.data_dir, rows)
        layouts = [parse_layout(t) for t in cfg.layouts]
        info = get_dataset_info(meta.get("dataset", ""))
    except ValueError as e:
        die(str(e))
    run = RunDir(cfg.output_dir, name="diffumask_mosaic")
    run.save_config(cfg)
    writer = SyntheticWriter(cfg.output_dir, meta["dataset"], img_suffix=meta.get("img_suffix", ".png"))
    reader = _Sources(cfg.data_dir, rows, run.log, cfg.max_bad_fraction)
    for i in range(cfg.num_mosaics):
        if writer.is_done(i):
            continue
        rng = np.random.default_rng(pair_seed(cfg.seed, i))
        cols, rows_n = layouts[int(rng.integers(len(layouts)))]
        picks = rng.choice(len(rows), size=cols * rows_n, replace=len(rows) < cols * rows_n)
        try:
            sources, pairs = zip(*[reader.get(int(k)) for k in picks])
        except ValueError as e:
            die(str(e))
        size = cfg.out_size or pairs[0][0].shape[0]
        image, mask = make_mosaic(pairs, (cols, rows_n), size)
        writer.write_pair(i, image, mask, {
            "prompt": " | ".join(r.get("prompt", "") for r in sources), "seed": pair_seed(cfg.seed, i),
            "layout": f"{cols}x{rows_n}", "sources": [r["name"] for r in sources],
            "generator": "diffumask_mosaic", "source_dir": str(cfg.data_dir)})
    settings = {k: v for k, v in vars(cfg).items() if k != "output_dir"}
    out = writer.finalize(info, "diffumask_mosaic", settings, expected=cfg.num_mosaics)
    run.log(f"wrote {cfg.num_mosaics} mosaics to {cfg.output_dir}; {len(reader.bad)} bad source files skipped")
    run.close()
    return out


if __name__ == "__main__":
    main()
