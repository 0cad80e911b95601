"""A folder shaped like the authors' released label VAE (METHOD.md §8), written without our model.

The weights are a dict of random tensors with the shapes of their ``LightweightLabelVAE`` layout
(flat ``encoder.N`` / ``decoder.N`` keys), so a test can check our ``AuthorsLabelVAE`` against an
independent description of their checkpoint rather than against itself.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

# Their config at the paper's widths (ADE20K defaults besides in/out channels).
PAPER_CONFIG = dict(block_out_channels=[128, 256, 512, 512], intermediate_channels=512, latent_channels=4,
                    norm_num_groups=32, scaling_factor=0.2, num_mid_blocks=0, num_latents=2, num_upscalers=3,
                    upscale_channels=512, act_fn="none")
# Tiny widths: one stride-2 stage (factor 2), intermediate != upscale so the two are not confused.
TINY_CONFIG = dict(PAPER_CONFIG, block_out_channels=[8, 16], intermediate_channels=8, norm_num_groups=4,
                   num_upscalers=1, upscale_channels=16)


def authors_state_dict_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """Every key of their checkpoint and its shape, from the config alone."""
    c, inter, up = config["block_out_channels"], config["intermediate_channels"], config["upscale_channels"]
    lat, out = config["latent_channels"], config["out_channels"]
    shapes: dict[str, tuple[int, ...]] = {}

    def conv(prefix, n_out, n_in, k=3):
        shapes[f"{prefix}.weight"], shapes[f"{prefix}.bias"] = (n_out, n_in, k, k), (n_out,)

    def norm(prefix, n):
        shapes[f"{prefix}.weight"], shapes[f"{prefix}.bias"] = (n,), (n,)

    conv("encoder.0", c[0], config["in_channels"])
    for i in range(len(c) - 1):
        conv(f"encoder.{2 + 3 * i}", c[i + 1], c[i])
        conv(f"encoder.{3 + 3 * i}", c[i + 1], c[i + 1])
    last = 2 + 3 * (len(c) - 1)
    conv(f"encoder.{last}", inter, c[-1])
    norm(f"encoder.{last + 2}", inter)  # last + 1 is the (empty) mid-block slot
    conv(f"encoder.{last + 4}", config["num_latents"] * lat, inter)

    conv("decoder.0", inter, lat)  # decoder.1 is the mid-block slot
    for j in range(config["num_upscalers"]):
        shapes[f"decoder.{2 + 3 * j}.weight"] = (inter if j == 0 else up, up, 2, 2)  # ConvTranspose: in, out
        shapes[f"decoder.{2 + 3 * j}.bias"] = (up,)
        norm(f"decoder.{3 + 3 * j}", up)
    k = 2 + 3 * config["num_upscalers"]
    norm(f"decoder.{k}", up)
    conv(f"decoder.{k + 2}", out, up)
    return shapes


def write_authors_label_vae_folder(path: str | Path, out_channels: int, in_channels: int, tiny: bool = True,
                                   seed: int = 0) -> tuple[dict, dict[str, torch.Tensor]]:
    """Write ``config.json`` (their keys) and ``diffusion_pytorch_model.safetensors`` (random
    weights under their key names) to ``path``; return (config, state dict)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = dict(TINY_CONFIG if tiny else PAPER_CONFIG, in_channels=in_channels, out_channels=out_channels)
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in authors_state_dict_shapes(config).items():
        fan_in = max(1, int(torch.tensor(shape[1:]).prod())) if len(shape) > 1 else 1
        scale = 1.0 / fan_in**0.5 if len(shape) > 1 else 0.2
        value = torch.randn(shape, generator=gen) * scale
        is_norm_weight = len(shape) == 1 and key.endswith(".weight")
        state[key] = (1.0 + value) if is_norm_weight else value  # norm scales near 1, as trained ones are
    save_file(state, str(path / "diffusion_pytorch_model.safetensors"), metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(
        dict(config, _class_name="LightweightLabelVAE", _diffusers_version="0.31.0"), indent=2))
    return config, state
