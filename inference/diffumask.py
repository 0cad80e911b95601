"""DiffuMask baseline: a synthetic segmentation set from Stable Diffusion's cross-attention maps.

    python -m inference.diffumask --config configs/diffumask/toy.yaml --base_model runs/toy/base_model \\
        --output_dir data/diffumask/toy

Writes the same layout and manifest as JoDiffusion's generator (``dataset/synthetic.py``), plus
``attention/`` (the class maps), ``config.yaml``, ``log.txt``, ``metrics.jsonl`` and
``summary.json`` (pairs/s). Multi-GPU: ``accelerate launch -m inference.diffumask ...``; each
process refines its masks in ``--crf_workers`` CPU processes beside generation.
Rerunning the same command resumes.

Bad input stops the run before anything is loaded, with one line naming the file: a base-model
folder without ``model_index.json`` or a component, a truncated weights file, an empty or broken
sub-class file, an unknown class or dataset.
"""
from __future__ import annotations

from pathlib import Path

from models.diffumask.attention import ClassWordError
from models.diffumask.generate import DiffuMaskConfig, check_inputs, generate_diffumask_dataset
from utils.config import die, parse_config
from utils.io import RunDir, atomic_write_json


def main(argv=None) -> dict:
    cfg = parse_config(DiffuMaskConfig, argv, description=__doc__)
    try:
        check_inputs(cfg)
    except ValueError as e:
        die(str(e))
    from accelerate import PartialState

    run = RunDir(cfg.output_dir, is_main=PartialState().is_main_process, name="diffumask")
    run.save_config(cfg)
    run.log(f"diffumask: dataset {cfg.dataset}, base model {cfg.base_model}")
    try:
        summary = generate_diffumask_dataset(cfg, run=run)
    except ClassWordError as e:  # the sub-class file or template gives a prompt without the class word
        die(f"{cfg.subclass_file or 'prompt_template'}: {e}")
    except ValueError as e:  # the base model does not load; pairs missing at the end
        die(str(e))
    if run.is_main:
        atomic_write_json(Path(cfg.output_dir) / "summary.json", {k: v for k, v in summary.items()
                                                                   if k != "dataset_json"})
    run.close()
    return summary


if __name__ == "__main__":
    main()
