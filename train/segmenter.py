"""Train or evaluate an mmseg segmenter (stage 5) from a config in configs/seg/.

    python -m train.segmenter configs/seg/toy_unet_fcn.py --work-dir runs/seg/toy_unet_fcn

    # multi-GPU: torchrun --nproc_per_node=4 -m train.segmenter CONFIG --launcher pytorch ...
    # continue the latest checkpoint in --work-dir:        ... --resume
    # evaluate a checkpoint on the config's val/test set:  ... --eval-only --checkpoint FILE
    # any config key:  --cfg-options train_cfg.max_iters=300 train_dataloader.batch_size=8

The command line follows mmseg's ``tools/train.py`` (positional CONFIG, ``--cfg-options
k=v``) rather than our YAML profiles, because the config *is* an mmseg config.

The real configs start from ImageNet-pretrained backbones (MMSegmentation's checkpoints),
fetched before anything is built: from torch hub's cache, else downloaded there; offline and
not cached, the run stops with one line. Two overrides (see ``models/segmenter.py``):

    --cfg-options model.backbone.init_cfg.checkpoint=/path/resnet50_v1c.pth   # a local copy
    --cfg-options model.backbone.init_cfg=None                                # from scratch

Bad data stops the run with one line naming the file (``dataset/mmseg_datasets.py``); a
training file found corrupt mid-run is skipped and counted (log, ``final_metrics.json``).

Only checkpoints this project wrote are loaded (``--resume``, ``--checkpoint``): each
checkpoint gets a ``<ckpt>.sha256`` record when saved, a file without a matching record is
refused before anything is unpickled, and loading stays ``weights_only=True`` with a narrow
allow-list of mmengine/numpy classes (see ``models/segmenter.py``).
"""
from __future__ import annotations

import argparse
import os
import re
from pathlib import Path

from utils.config import die, error_line

# mmengine's registry re-raises a build error as "class `X` in pkg/module.py: <message>"
_REGISTRY_PREFIX = re.compile(r"^(?:class `\w+` in \S+\.py: )+")


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

    from dataset.segmentation import DatasetError
    from models.segmenter import (PretrainedUnavailableError, UntrustedCheckpointError, build_runner,
                                  load_seg_config, prepare_pretrained, train_runner, verify_checkpoint)

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
    if not args.eval_only:  # evaluation takes every weight from --checkpoint
        try:
            prepare_pretrained(cfg)  # before any dataset or model is built
        except PretrainedUnavailableError as e:
            die(str(e))

    try:
        runner = build_runner(cfg)
    except (FileNotFoundError, ValueError) as e:  # bad settings the Runner checks
        die(f"{args.config}: {e}")
    try:
        if args.eval_only:
            return runner.test()
        return train_runner(runner)  # also writes <work-dir>/final_metrics.json
    except UntrustedCheckpointError as e:
        die(str(e))
    except DatasetError as e:  # datasets are built (and checked) when the loops start
        die(_REGISTRY_PREFIX.sub("", error_line(e)))


if __name__ == "__main__":
    main()
