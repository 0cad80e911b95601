"""DiffuMask noise learning: score every synthetic pair by k-fold cross-validation, keep the best.

    python -m inference.diffumask_noise_filter --data_dir data/diffumask/toy --keep_fraction 0.7

A segmenter trained on the other folds predicts each held-out pair; the score is the IoU between
the pair's mask and that prediction. Writes into ``data_dir`` (nothing is deleted):
``scores.jsonl`` (name, score, fold, kept, skipped), ``kept.txt`` (names of the kept pairs) and
``noise_filter/`` (config, log); and the kept pairs as a synthetic set of their own,
``<data_dir>_kept`` (``--output_dir``; images and masks hard-linked), which the segmenter scripts
take like any generated set (``SYNTH=data/synthetic/voc/diffumask_kept``).

Memory: the pairs are decoded once, resized to ``train_size`` and kept in memory-mapped files in
``noise_filter/`` (~3 GB for 60k pairs at 64 px; removed at the end), so RAM holds a batch, not
the set. Every file's header is checked first (a missing mask, an unreadable image, sizes that
differ stop the run at once); a file that turns out corrupt when decoded is named, skipped (never
kept) and counted, and the run stops if more than ``max_bad_fraction`` of the pairs are.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from models.diffumask.data import check_pairs, image_height, read_synthetic, too_many_bad
from models.diffumask.noise import PairFiles, ResizedPairs, keep_best, kfold_agreement, make_small_segmenter
from utils.config import die, parse_config
from dataset.synthetic import write_subset
from utils.io import RunDir, atomic_write_text


@dataclass
class NoiseFilterConfig:
    """Cross-validated noise filtering of a synthetic set (DiffuMask's noise learning)."""

    data_dir: str = field(default="data/synthetic/voc/diffumask", metadata={"help": "a finished synthetic set"})
    output_dir: str | None = field(default=None, metadata={
        "help": "where the kept pairs are written as a synthetic set (default: <data_dir>_kept)"})
    keep_fraction: float = field(default=0.7, metadata={"help": "fraction of pairs kept (best scores)"})
    folds: int = field(default=3, metadata={"help": "cross-validation folds"})
    epochs: int = field(default=30, metadata={"help": "segmenter training epochs per fold"})
    batch_size: int = field(default=16, metadata={"help": "segmenter batch size"})
    lr: float = field(default=3e-3, metadata={"help": "segmenter peak learning rate (one-cycle)"})
    train_size: int = field(default=64, metadata={"help": "side the segmenter works at (px)"})
    width: int = field(default=32, metadata={"help": "segmenter channels"})
    seed: int = field(default=0, metadata={"help": "fold split and training seed"})
    device: str = field(default="auto", metadata={"help": "'auto', 'cpu' or 'cuda'"})
    num_workers: int = field(default=4, metadata={"help": "processes decoding the pairs (once, at the start)"})
    max_bad_fraction: float = field(default=0.01, metadata={
        "help": "share of pairs that may turn out corrupt (skipped) before the run stops; >= 1 file"})


def _check(cfg: NoiseFilterConfig) -> None:
    if not 0 < cfg.keep_fraction <= 1 or not 0 <= cfg.max_bad_fraction < 1:
        raise ValueError(f"keep_fraction must be in (0, 1] and max_bad_fraction in [0, 1), got "
                         f"{cfg.keep_fraction} and {cfg.max_bad_fraction}")
    if cfg.folds < 2 or cfg.epochs < 1 or cfg.batch_size < 2 or cfg.train_size < 1 or cfg.num_workers < 0:
        raise ValueError("folds >= 2, epochs >= 1, batch_size >= 2, train_size >= 1 and num_workers >= 0 "
                         "are needed")


def main(argv=None) -> dict:
    cfg = parse_config(NoiseFilterConfig, argv, description=__doc__)
    data = Path(cfg.data_dir)
    try:
        _check(cfg)
    except ValueError as e:
        die(f"noise filter settings: {e}")
    try:
        meta, rows = read_synthetic(data)
        check_pairs(data, rows)
        size = min(cfg.train_size, image_height(data, rows[0]))
    except ValueError as e:
        die(str(e))
    ignore, num_labels = int(meta.get("ignore_index", 255)), len(meta["classes"])
    run = RunDir(data / "noise_filter", name="diffumask_noise")
    run.save_config(cfg)
    workers = min(cfg.num_workers, len(os.sched_getaffinity(0)))
    source = ResizedPairs.build(PairFiles(data, rows, size, num_labels, ignore), run.path,
                                num_workers=workers, log=run.log)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
    bad = [p for p in source.problems if p]
    try:
        if too_many_bad(len(bad), len(rows), cfg.max_bad_fraction):
            raise ValueError(f"{len(bad)} of {len(rows)} pairs bad, more than the allowed share "
                             f"(max_bad_fraction={cfg.max_bad_fraction}); first: {bad[0]}")
        fit = make_small_segmenter(cfg.epochs, cfg.batch_size, cfg.lr, size, cfg.width, ignore, device)
        scores, fold = kfold_agreement(source, num_labels, fit, cfg.folds, cfg.seed, ignore, run.log)
        kept = set(source.good[keep_best(scores[source.good], cfg.keep_fraction)].tolist())
    except ValueError as e:
        die(f"{data}: {e}")
    finally:
        source.remove_files()
    return _write_results(cfg, data, rows, source, scores, fold, kept, run)


def _write_results(cfg, data, rows, source, scores, fold, kept, run) -> dict:
    lines = [json.dumps({"name": r["name"], "score": None if p else round(float(s), 6),
                         "fold": None if p else int(f), "kept": i in kept, "skipped": p})
             for i, (r, s, f, p) in enumerate(zip(rows, scores, fold, source.problems))]
    atomic_write_text(data / "scores.jsonl", "\n".join(lines) + "\n")
    atomic_write_text(data / "kept.txt", "".join(rows[i]["name"] + "\n" for i in sorted(kept)))
    out = Path(cfg.output_dir or f"{data}_kept")
    write_subset(data, out, [rows[i] for i in sorted(kept)], read_synthetic(data)[0],
                 {"by": "inference.diffumask_noise_filter", "keep_fraction": cfg.keep_fraction})
    good = scores[source.good]
    summary = {"pairs": len(rows), "kept": len(kept), "bad_files": len(rows) - len(source.good),
               "mean_score": float(good.mean()), "mean_score_kept": float(scores[sorted(kept)].mean())}
    run.log_metrics(**summary)
    run.log(f"kept {len(kept)} of {len(rows)} pairs ({summary['bad_files']} bad files skipped); "
            f"mean IoU {summary['mean_score']:.4f} -> {summary['mean_score_kept']:.4f}; kept set: {out}")
    run.close()
    return summary


if __name__ == "__main__":
    main()
