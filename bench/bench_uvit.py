"""Benchmark: the authors' joint U-ViT next to our widened SD UNet, forward and per generated pair.

    python -m bench.bench_uvit                       # toy size + one 512 px forward each, CPU (~5 min on 2 cores)
    python -m bench.bench_uvit --real false          # toy size only (~1 min)
    python -m bench.bench_uvit --device cuda         # on a GPU: fp16, 512 px forwards timed 5 times

1. **Toy size** (32 px pairs, 16 x 16 latents, the toy world's text encoder and VAEs): one joint
   forward (batch 1, conditional only) and one generated pair (``--steps`` DPM-Solver steps,
   guidance 8: two network passes per step, decoding included) for a toy U-ViT
   (``TOY_UVIT_CONFIG``) and the toy widened UNet (``configs/toy_base_model/toy.yaml``'s widths).
2. **Real size** (``--real``): one forward at 512 px (64 x 64 latents), batch 1, of the real
   JoDiffusion U-ViT (METHOD.md §8, ~0.95B parameters, 2129 tokens) and of the SD 1.5 UNet widened
   to 8 channels, both with random weights (speed does not depend on them). A 512 px pair costs
   about 2 x steps forwards plus decoding; batched GPU generation is not measured here yet.

Times are the fastest of ``--repeats`` calls (other jobs only ever add time); medians are saved
too. Prints and saves ``bench/results/uvit_speed.json`` (``--output``).
"""
from __future__ import annotations

import platform
import statistics
from dataclasses import dataclass, field

import torch

from bench.bench_generation import time_call
from models.joint_unet import widen_unet_for_labels
from models.joint_uvit import PAPER_UVIT_CONFIG, JoDiffusionUViT
from models.label_vae import LabelVAE
from models.pipeline_jodiffusion import build_jodiffusion_pipeline, make_scheduler
from models.pipeline_uvit import JoDiffusionUViTPipeline
from models.tiny_kit import TinySDSpec, tiny_components
from utils.config import parse_config
from utils.io import atomic_write_json
from utils.precision import cpu_generators

# a toy U-ViT for the toy world: 16 x 16 latents, the toy CLIP-layout text encoder (32 wide, 32 tokens)
TOY_UVIT_CONFIG = dict(PAPER_UVIT_CONFIG, text_dim=32, inner_text_dim=16, clip_img_dim=32, num_text_tokens=32,
                       num_attention_heads=4, attention_head_dim=32, num_layers=9, sample_size=16)
SD15_UNET = dict(sample_size=64, cross_attention_dim=768, block_out_channels=(320, 640, 1280, 1280),
                 attention_head_dim=8, layers_per_block=2)
PROMPT = "a photo of circle, square"


@dataclass
class BenchUViTConfig:
    """Joint U-ViT vs widened UNet: forward and generated-pair cost."""

    device: str = field(default="cpu", metadata={"help": "cpu or cuda"})
    real: bool = field(default=True, metadata={"help": "also time one 512 px forward of the real-size models"})
    steps: int = field(default=20, metadata={"help": "sampling steps per generated pair"})
    repeats: int = field(default=5, metadata={"help": "timed calls (fastest kept)"})
    output: str = field(default="bench/results/uvit_speed.json", metadata={"help": "where the JSON goes"})


def timed(fn, repeats: int, device) -> dict:
    fn()  # warm-up
    times = [time_call(fn, device) for _ in range(repeats)]
    return {"best_s": round(min(times), 4), "median_s": round(statistics.median(times), 4)}


def params_m(model) -> float:
    return round(sum(p.numel() for p in model.parameters()) / 1e6, 2)


def toy_pipelines(device):
    """Both toy pipelines on the same toy text encoder, image VAE, label VAE and sampler."""
    from dataset.toy_semantic import CLASSES

    spec = TinySDSpec(sample_size=16, unet_channels=(32, 64, 64), unet_attention=(False, True, False),
                      vae_channels=(32, 64), max_length=32)
    comps = tiny_components(list(CLASSES) + PROMPT.replace(",", "").split(), spec, seed=0)
    label_vae = LabelVAE(num_labels=len(CLASSES), encoder_channels=(32, 64), decoder_channels=(64, 32), norm_num_groups=8)
    unet = build_jodiffusion_pipeline(comps, label_vae, widen_unet_for_labels(comps["unet"], 4))
    uvit = JoDiffusionUViTPipeline(image_vae=comps["vae"], text_encoder=comps["text_encoder"],
                                   clip_tokenizer=comps["tokenizer"], label_vae=label_vae,
                                   unet=JoDiffusionUViT(**TOY_UVIT_CONFIG), scheduler=make_scheduler())
    for p in (unet, uvit):
        p.to(device).set_progress_bar_config(disable=True)
    return unet, uvit


def forward_fns(unet_model, uvit_model, latent: int, text_len: int, text_dim: int, device, dtype):
    """One conditional forward, batch 1, for each model at ``latent`` x ``latent`` latents."""
    text = torch.randn(1, text_len, text_dim, device=device, dtype=dtype)
    z8 = torch.randn(1, 8, latent, latent, device=device, dtype=dtype)
    clip = torch.randn(1, 1, uvit_model.config.clip_img_dim, device=device, dtype=dtype)
    t = torch.tensor([500], device=device)
    return (torch.no_grad()(lambda: unet_model(z8, t, encoder_hidden_states=text)),
            torch.no_grad()(lambda: uvit_model(text, z8[:, :4], clip, z8[:, 4:], t, torch.zeros_like(t))))


def bench_toy(cfg: BenchUViTConfig, device) -> dict:
    unet_pipe, uvit_pipe = toy_pipelines(device)
    unet_fwd, uvit_fwd = forward_fns(unet_pipe.unet, uvit_pipe.unet, 16, 32, 32, device, torch.float32)
    out = {"image_size": 32, "latent_size": 16, "steps": cfg.steps, "guidance_scale": 8.0}
    for name, pipe, fwd in (("widened_unet", unet_pipe, unet_fwd), ("uvit", uvit_pipe, uvit_fwd)):
        pair = lambda p=pipe: p([PROMPT], num_inference_steps=cfg.steps, guidance_scale=8.0,  # noqa: E731
                                generator=cpu_generators([0]))
        out[name] = {"params_M": params_m(pipe.unet), "forward": timed(fwd, cfg.repeats, device),
                     "pair": timed(pair, cfg.repeats, device)}
        print(f"toy {name}: {out[name]['params_M']}M params, forward {out[name]['forward']['best_s'] * 1e3:.1f} ms, "
              f"one pair ({cfg.steps} steps) {out[name]['pair']['best_s']:.3f} s")
    out["uvit_tokens"] = uvit_pipe.unet.num_tokens
    return out


def bench_real(cfg: BenchUViTConfig, device) -> dict:
    from diffusers import UNet2DConditionModel

    dtype = torch.float16 if device.type == "cuda" else torch.float32
    unet = widen_unet_for_labels(UNet2DConditionModel(**SD15_UNET), 4).to(device, dtype).eval()
    uvit = JoDiffusionUViT(**PAPER_UVIT_CONFIG).to(device, dtype).eval()
    unet_fwd, uvit_fwd = forward_fns(unet, uvit, 64, 77, 768, device, dtype)
    repeats = cfg.repeats if device.type == "cuda" else 1  # a CPU forward takes tens of seconds
    out = {"image_size": 512, "latent_size": 64, "dtype": str(dtype).replace("torch.", ""), "batch": 1}
    for name, model, fwd in (("widened_unet", unet, unet_fwd), ("uvit", uvit, uvit_fwd)):
        out[name] = {"params_M": params_m(model), "forward": timed(fwd, repeats, device)}
        print(f"512 px {name}: {out[name]['params_M']}M params, forward {out[name]['forward']['best_s']:.2f} s")
    out["uvit_tokens"] = uvit.num_tokens
    return out


def main(argv=None) -> dict:
    cfg = parse_config(BenchUViTConfig, argv, description=__doc__)
    device = torch.device(cfg.device)
    result = {"device": cfg.device, "torch_threads": torch.get_num_threads(), "machine": platform.processor() or
              platform.machine(), "toy": bench_toy(cfg, device)}
    if cfg.real:
        result["real_512"] = bench_real(cfg, device)
    for part in ("toy", "real_512"):
        if part in result:
            r = result[part]
            r["uvit_over_unet_forward"] = round(r["uvit"]["forward"]["best_s"] / r["widened_unet"]["forward"]["best_s"], 3)
    atomic_write_json(cfg.output, result)
    print(f"saved {cfg.output}")
    return result


if __name__ == "__main__":
    main()
