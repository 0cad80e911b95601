"""Write the toy world's UniDiffuser base (untrained), beside the toy SD base it shares data with.

    python -m train.toy_unidiffuser_base --sd_base runs/toy/base_model --output_dir runs/toy/unidiffuser_base
    python -m train.joint_diffusion --config configs/joint_diffusion/toy_unidiffuser_image.yaml \\
        --pretrained_model runs/toy/unidiffuser_base --output_dir runs/toy/unidiffuser_image
    python -m inference.uvit_init --unidiffuser runs/toy/unidiffuser_image/pipeline \\
        --label_vae runs/toy/label_vae --output_dir runs/toy/uvit_init

The authors' U-ViT starts from UniDiffuser-v1 (METHOD.md §8); no such weights exist here, so the
toy chain makes its own: this writes a folder in diffusers' UniDiffuser layout (the SD base's
image VAE, CLIP text encoder and tokenizer, copied; a tiny random frozen CLIP image encoder and
caption decoder; an untrained ``UniDiffuserModel``), the image-mode run above pretrains its U-ViT
with UniDiffuser's objective, and ``inference.uvit_init`` turns that into the JoDiffusion U-ViT.
Library code: ``models.toy_unidiffuser``.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from models.toy_unidiffuser import ToyUniDiffuserSpec, write_toy_unidiffuser_folder
from utils.config import die, error_line, parse_config

_SPEC = ToyUniDiffuserSpec()


@dataclass
class ToyUniDiffuserBaseConfig:
    """Write an untrained toy UniDiffuser pipeline folder from the toy SD base."""

    sd_base: str = field(default="runs/toy/base_model", metadata={"help": "the toy SD base (train.toy_base_model)"})
    output_dir: str = field(default="runs/toy/unidiffuser_base", metadata={"help": "the UniDiffuser folder to write"})
    num_attention_heads: int = field(default=_SPEC.num_attention_heads, metadata={"help": "U-ViT attention heads"})
    attention_head_dim: int = field(default=_SPEC.attention_head_dim, metadata={"help": "U-ViT head width"})
    num_layers: int = field(default=_SPEC.num_layers, metadata={"help": "U-ViT blocks (odd: in, mid, out)"})
    text_prefix_dim: int = field(default=_SPEC.text_prefix_dim,
                                 metadata={"help": "caption-decoder prefix width (UniDiffuser-v1: 64)"})
    clip_img_dim: int = field(default=_SPEC.clip_img_dim, metadata={"help": "CLIP image embedding width (v1: 512)"})
    vision_hidden: int = field(default=_SPEC.vision_hidden, metadata={"help": "CLIP image encoder width"})
    vision_layers: int = field(default=_SPEC.vision_layers, metadata={"help": "CLIP image encoder layers"})
    vision_patch: int = field(default=_SPEC.vision_patch, metadata={"help": "CLIP image encoder patch size"})
    seed: int = field(default=0, metadata={"help": "seed of the random weights"})


def main(argv=None):
    cfg = parse_config(ToyUniDiffuserBaseConfig, argv, description=__doc__)
    if cfg.num_layers % 2 == 0 or cfg.num_layers < 1:
        die(f"--num_layers {cfg.num_layers}: the U-ViT needs an odd count (in-blocks, one mid block, out-blocks)")
    spec = ToyUniDiffuserSpec(num_attention_heads=cfg.num_attention_heads, attention_head_dim=cfg.attention_head_dim,
                              num_layers=cfg.num_layers, text_prefix_dim=cfg.text_prefix_dim,
                              clip_img_dim=cfg.clip_img_dim, vision_hidden=cfg.vision_hidden,
                              vision_layers=cfg.vision_layers, vision_patch=cfg.vision_patch)
    try:
        out = write_toy_unidiffuser_folder(cfg.sd_base, cfg.output_dir, spec, seed=cfg.seed)
    except ValueError as e:
        die(error_line(e))
    print(f"{out}: untrained toy UniDiffuser from {cfg.sd_base}; pretrain it with "
          f"python -m train.joint_diffusion --mode image --pretrained_model {out}")
    return out


if __name__ == "__main__":
    main()
