"""DiffuMask baseline: a synthetic segmentation set from Stable Diffusion's cross-attention maps.

    python -m inference.diffumask --config configs/diffumask/toy.yaml --base_model runs/toy/base_model \\
        --output_dir data/diffumask/toy

Writes the same layout and manifest as JoDiffusion's generator (``dataset/synthetic.py``), plus
``attention/`` (the class maps), ``config.yaml``, ``log.txt``, ``metrics.jsonl`` and
``summary.json`` (pairs/s). Multi-GPU: ``accelerate launch -m inference.diffumask ...``.
Rerunning the same command resumes.
"""
from __future__ import annotations

from pathlib import Path

from models.diffumask.generate import DiffuMaskConfig, generate_diffumask_dataset
from utils.config import die, parse_config
from utils.io import RunDir, atomic_write_json


def main(argv=None) -> dict:
    cfg = parse_config(DiffuMaskConfig, argv, description=__doc__)
    if Path(cfg.base_model).exists() and not (Path(cfg.base_model) / "model_index.json").is_file():
        die(f"{cfg.base_model}: not a diffusers pipeline folder (no model_index.json)")
    from accelerate import PartialState

    run = RunDir(cfg.output_dir, is_main=PartialState().is_main_process, name="diffumask")
    run.save_config(cfg)
    run.log(f"diffumask: dataset {cfg.dataset}, base model {cfg.base_model}")
    try:
        summary = generate_diffumask_dataset(cfg, run=run)
    except ValueError as e:  # bad settings or prompts (an absent class word, a missing resolution)
        die(f"{cfg.output_dir}: {e}")
    if run.is_main:
        atomic_write_json(Path(cfg.output_dir) / "summary.json", {k: v for k, v in summary.items()
                                                                   if k != "dataset_json"})
    run.close()
    return summary


if __name__ == "__main__":
    main()
