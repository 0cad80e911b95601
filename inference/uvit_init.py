"""Write the authors' step-0 JoDiffusion U-ViT pipeline folder: UniDiffuser-v1's U-ViT with the
label stream copied from the image stream, plus a trained label VAE (METHOD.md §8).

    python -m inference.uvit_init --unidiffuser thu-ml/unidiffuser-v1 \\
        --label_vae runs/voc/label_vae_run --output_dir runs/voc/uvit_init

``--unidiffuser`` is a UniDiffuser pipeline folder as diffusers saves it, or a hub id fetched with
``huggingface_hub.snapshot_download`` (only the parts used; ``HF_TOKEN`` from the environment when
needed). ``--label_vae`` is a label VAE folder (ours or the authors') or a training run holding it
as label_vae/. The result (image_vae/ text_encoder/ clip_tokenizer/ image_encoder/
clip_image_processor/ label_vae/ unet/ scheduler/) is written under a temporary name and renamed
once complete. ``--verify true`` then loads it as a generation pipeline (the real U-ViT has 0.95B
parameters: several GB of memory).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from models.pipelines import load_pipeline
from models.uvit_init import FOREIGN_WEIGHTS, UNIDIFFUSER_COMPONENTS, write_uvit_pipeline_folder
from utils.config import die, error_line, parse_config
from utils.weights import download_snapshot


@dataclass
class UViTInitConfig:
    """Write the step-0 U-ViT pipeline folder from UniDiffuser-v1 and a label VAE."""

    unidiffuser: str = field(default="thu-ml/unidiffuser-v1",
                             metadata={"help": "UniDiffuser pipeline folder or hub id (org/name); the authors' start"})
    label_vae: str = field(default="",
                           metadata={"help": "trained label VAE folder, or a run folder holding label_vae/"})
    output_dir: str = field(default="", metadata={"help": "where the pipeline folder goes"})
    revision: str | None = field(default=None, metadata={"help": "hub revision (branch, tag or commit)"})
    verify: bool = field(default=False, metadata={"help": "load the written folder as a pipeline afterwards"})


def local_unidiffuser(cfg: UViTInitConfig) -> Path:
    """The UniDiffuser folder: itself, or the hub snapshot of the parts we use."""
    path = Path(cfg.unidiffuser)
    if path.exists():
        return path
    if path.is_absolute() or cfg.unidiffuser.startswith(".") or cfg.unidiffuser.count("/") != 1:
        die(f"--unidiffuser {cfg.unidiffuser}: no such folder, and not a hub id (org/name)")
    patterns = ["model_index.json", *(f"{name}/*" for name in UNIDIFFUSER_COMPONENTS)]
    try:
        return download_snapshot(cfg.unidiffuser, cfg.revision, patterns, list(FOREIGN_WEIGHTS))
    except ValueError as e:
        die(f"--unidiffuser {e}")


def main(argv=None) -> Path:
    cfg = parse_config(UViTInitConfig, argv, description=__doc__)
    if not cfg.label_vae or not cfg.output_dir:
        die("--label_vae and --output_dir are required")
    source = local_unidiffuser(cfg)
    try:
        out = write_uvit_pipeline_folder(source, cfg.label_vae, cfg.output_dir)
    except ValueError as e:
        die(error_line(e))
    print(f"{out}: step-0 JoDiffusion U-ViT pipeline from {cfg.unidiffuser} and {cfg.label_vae}")
    if cfg.verify:
        try:
            pipe = load_pipeline(str(out), torch.float32, "cpu")
        except ValueError as e:
            die(error_line(e))
        n = sum(p.numel() for p in pipe.unet.parameters())
        print(f"{out}: loads as a pipeline ({n / 1e6:.1f}M U-ViT parameters)")
    return out


if __name__ == "__main__":
    main()
