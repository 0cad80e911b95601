"""Train or evaluate an mmseg segmenter (stage 5) from a config in configs/seg/.

    python -m train.segmenter configs/seg/toy_unet_fcn.py --work-dir runs/seg/toy_unet_fcn

    # multi-GPU: torchrun --nproc_per_node=4 -m train.segmenter CONFIG --launcher pytorch ...
    # continue the latest checkpoint in --work-dir:        ... --resume
    # evaluate a checkpoint on the config's val/test set:  ... --eval-only --checkpoint FILE
    # any config key:  --cfg-options train_cfg.max_iters=300 train_dataloader.batch_size=8

The command line follows mmseg's ``tools/train.py`` (positional CONFIG, ``--cfg-options
k=v``) rather than our YAML profiles, because the config *is* an mmseg config.

Only checkpoints this project wrote are loaded (``--resume``, ``--checkpoint``): each
checkpoint gets a ``<ckpt>.sha256`` record when saved, a file without a matching record is
refused before anything is unpickled, and loading stays ``weights_only=True`` with a narrow
allow-list of mmengine/numpy classes (see ``models/segmenter.py``).
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

from utils.config import die


def parse_args(argv=None) -> argparse.Namespace:
    from mmengine.config import DictAction

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("config", help="mmseg config (configs/seg/*.py)")
    p.add_argument("--work-dir", required=True, help="run folder: logs, checkpoints, metrics")
    p.add_argument("--resume", action="store_true",
                   help="continue from the latest checkpoint in --work-dir (or --checkpoint)")
    p.add_argument("--eval-only", action="store_true",
                   help="no training: evaluate --checkpoint on the config's test set")
    p.add_argument("--checkpoint", default=None, help="a checkpoint this project wrote (.pth)")
    p.add_argument("--cfg-options", nargs="+", action=DictAction, default=None,
                   help="override config keys, key=value (a.b.c=1, list index: a.0.b=x)")
    p.add_argument("--launcher", choices=["none", "pytorch", "slurm", "mpi"], default="none")
    p.add_argument("--local-rank", "--local_rank", type=int, default=0, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> dict | None:
    args = parse_args(argv)
    if "LOCAL_RANK" not in os.environ:
        os.environ["LOCAL_RANK"] = str(args.local_rank)
    if not Path(args.config).is_file():
        die(f"{args.config}: config file not found")
    if args.eval_only and not args.checkpoint:
        die("--eval-only needs --checkpoint FILE")

    from models.segmenter import (UntrustedCheckpointError, build_runner, load_seg_config,
                                  train_runner, verify_checkpoint)

    try:
        cfg = load_seg_config(args.config, args.cfg_options, args.work_dir)
    except Exception as e:  # syntax errors, bad keys in --cfg-options
        die(f"{args.config}: {e}")
    cfg.launcher = args.launcher
    if args.checkpoint:
        # checked here for a clean message; TrustedRunner checks again when it loads
        try:
            verify_checkpoint(args.checkpoint)
        except UntrustedCheckpointError as e:
            die(str(e))
        cfg.load_from = args.checkpoint
    cfg.resume = bool(args.resume) and not args.eval_only

    try:
        runner = build_runner(cfg)
    except (FileNotFoundError, ValueError) as e:  # missing data folders, bad dataset settings
        die(f"{args.config}: {e}")
    try:
        if args.eval_only:
            return runner.test()
        return train_runner(runner)  # also writes <work-dir>/final_metrics.json
    except UntrustedCheckpointError as e:
        die(str(e))


if __name__ == "__main__":
    main()
