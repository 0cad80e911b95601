"""Fetch a pipeline folder (a hub id or a local folder) as local safetensors: the first of the
three commands from the authors' released weights to a segmentation score.

    python -m inference.fetch_weights --source 0why0/JoDiffusion --output_dir weights/jodiffusion
    python -m inference.fetch_weights --source downloads/step0_bin --output_dir weights/step0   # convert only

A hub id is downloaded with ``huggingface_hub.snapshot_download`` (its cache, ``HF_TOKEN`` from the
environment when the repository needs one); ``--subfolder`` takes one folder of it. Every ``.bin``
is read with ``torch.load(weights_only=True)``, must be a flat dict of tensors, and is rewritten as
safetensors (``utils.weights``); configs and tokenizer files are copied. The result is written
under a temporary name and renamed once complete. With ``--dataset`` the folder is then checked
as a generation pipeline for that dataset (either backbone), as ``inference.generate`` will.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from dataset import DATASET_NAMES, get_dataset_info
from models.pipelines import check_pipeline
from utils.config import die, parse_config
from utils.weights import convert_folder, download_snapshot


@dataclass
class FetchConfig:
    """Fetch and convert a pipeline folder."""

    source: str = field(default="", metadata={"help": "hub id (org/name) or a local folder"})
    output_dir: str = field(default="", metadata={"help": "where the safetensors folder goes"})
    subfolder: str | None = field(default=None, metadata={"help": "take only this folder of the source"})
    revision: str | None = field(default=None, metadata={"help": "hub revision (branch, tag or commit)"})
    dataset: str | None = field(default=None, metadata={"help": "check the result as a pipeline for this dataset",
                                                        "choices": DATASET_NAMES})
    data_root: str | None = field(default=None, metadata={"help": "override the dataset's data_root (for --dataset)"})


def local_source(cfg: FetchConfig) -> Path:
    """The source as a local folder: itself, or its hub snapshot."""
    path = Path(cfg.source)
    if not path.exists():
        if path.is_absolute() or cfg.source.startswith(".") or cfg.source.count("/") != 1:
            die(f"--source {cfg.source}: no such folder, and not a hub id (org/name)")
        try:
            path = download_snapshot(cfg.source, cfg.revision, [f"{cfg.subfolder}/*"] if cfg.subfolder else None)
        except ValueError as e:
            die(f"--source {e}")
    path = path / cfg.subfolder if cfg.subfolder else path
    if not path.is_dir():
        die(f"{path}: not a folder")
    return path


def main(argv=None) -> Path:
    cfg = parse_config(FetchConfig, argv, description=__doc__)
    if not cfg.source or not cfg.output_dir:
        die("--source and --output_dir are required")
    src = local_source(cfg)
    try:
        converted = convert_folder(src, cfg.output_dir)
    except ValueError as e:
        die(str(e))
    print(f"{cfg.output_dir}: {len(converted)} .bin file(s) rewritten as safetensors"
          + (": " + ", ".join(map(str, converted)) if converted else ""))
    if cfg.dataset:
        try:
            backbone = check_pipeline(cfg.output_dir, get_dataset_info(cfg.dataset, cfg.data_root))
        except ValueError as e:
            die(str(e))
        print(f"{cfg.output_dir}: a complete {backbone} pipeline for {cfg.dataset}")
    return Path(cfg.output_dir)


if __name__ == "__main__":
    main()
