"""DiffuMask noise learning: score every synthetic pair by k-fold cross-validation, keep the best.

    python -m inference.diffumask_noise_filter --data_dir data/diffumask/toy --keep_fraction 0.7

A segmenter trained on the other folds predicts each held-out pair; the score is the IoU between
the pair's mask and that prediction. Writes into ``data_dir`` (nothing is deleted):
``scores.jsonl`` (name, score, fold, kept), ``kept.txt`` (names of the kept pairs, usable as an
mmseg ``ann_file``) and ``noise_filter/`` (config, log).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from models.diffumask.data import load_pair, read_synthetic
from models.diffumask.noise import keep_best, kfold_agreement, make_small_segmenter
from utils.config import die, parse_config
from utils.io import RunDir, atomic_write_text


@dataclass
class NoiseFilterConfig:
    """Cross-validated noise filtering of a synthetic set (DiffuMask's noise learning)."""

    data_dir: str = field(default="data/diffumask/voc", metadata={"help": "a finished synthetic set"})
    keep_fraction: float = field(default=0.7, metadata={"help": "fraction of pairs kept (best scores)"})
    folds: int = field(default=3, metadata={"help": "cross-validation folds"})
    epochs: int = field(default=30, metadata={"help": "segmenter training epochs per fold"})
    batch_size: int = field(default=16, metadata={"help": "segmenter batch size"})
    lr: float = field(default=3e-3, metadata={"help": "segmenter peak learning rate (one-cycle)"})
    train_size: int = field(default=64, metadata={"help": "side the segmenter works at (px)"})
    width: int = field(default=32, metadata={"help": "segmenter channels"})
    seed: int = field(default=0, metadata={"help": "fold split and training seed"})
    device: str = field(default="auto", metadata={"help": "'auto', 'cpu' or 'cuda'"})


def main(argv=None) -> dict:
    cfg = parse_config(NoiseFilterConfig, argv, description=__doc__)
    import torch

    data = Path(cfg.data_dir)
    try:
        meta, rows = read_synthetic(data)
    except ValueError as e:
        die(str(e))
    run = RunDir(data / "noise_filter", name="diffumask_noise")
    run.save_config(cfg)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
    pairs = [load_pair(data, r) for r in rows]
    fit = make_small_segmenter(cfg.epochs, cfg.batch_size, cfg.lr, cfg.train_size, cfg.width,
                               int(meta.get("ignore_index", 255)), device)
    try:
        scores, fold = kfold_agreement([p[0] for p in pairs], [p[1] for p in pairs], len(meta["classes"]),
                                       fit, cfg.folds, cfg.seed, int(meta.get("ignore_index", 255)), run.log)
        kept = set(keep_best(scores, cfg.keep_fraction).tolist())
    except ValueError as e:
        die(f"{data}: {e}")
    lines = [json.dumps({"name": r["name"], "score": round(float(s), 6), "fold": int(f), "kept": i in kept})
             for i, (r, s, f) in enumerate(zip(rows, scores, fold))]
    atomic_write_text(data / "scores.jsonl", "\n".join(lines) + "\n")
    atomic_write_text(data / "kept.txt", "".join(rows[i]["name"] + "\n" for i in sorted(kept)))
    summary = {"pairs": len(rows), "kept": len(kept), "mean_score": float(scores.mean()),
               "mean_score_kept": float(scores[sorted(kept)].mean())}
    run.log_metrics(**summary)
    run.log(f"kept {len(kept)} of {len(rows)} pairs; mean IoU {summary['mean_score']:.4f} -> "
            f"{summary['mean_score_kept']:.4f}")
    run.close()
    return summary


if __name__ == "__main__":
    main()
