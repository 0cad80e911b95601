"""Weight initialisation: a base Stable Diffusion + a trained label VAE -> a JoDiffusion pipeline folder.

    python -m inference.jodiffusion --base_model runs/toy/base_image --label_vae runs/toy/label_vae \
        --output_dir runs/toy/jodiffusion_init

Run once before ``train.joint_diffusion`` (the authors' README has the same step). The UNet is
widened for the label latent (``models.joint_unet.widen_unet_for_labels``: pretrained weights
copied, new input weights zero, so the image half starts exactly as the base model); the image
VAE, text encoder and tokenizer are copied as they are; the scheduler becomes DPM-Solver++
multistep on the base model's training schedule. The folder (``unet/ vae/ label_vae/
text_encoder/ tokenizer/ scheduler/ model_index.json``) loads with
``JoDiffusionPipeline.from_pretrained``. ``--base_model`` is a local SD folder or a hub id.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from utils.config import die, parse_config
from utils.io import RunDir


@dataclass
class InitConfig:
    """Widen a base SD UNet for label latents and write a JoDiffusion pipeline folder."""

    base_model: str = field(default="stable-diffusion-v1-5/stable-diffusion-v1-5",
                            metadata={"help": "SD folder or hub id (the paper: SD 1.5)"})
    label_vae: str = field(default="runs/ade20k/label_vae_run/label_vae",
                           metadata={"help": "trained label VAE folder (what scripts/ae/*.sh write)"})
    output_dir: str = field(default="runs/ade20k/jodiffusion_init", metadata={"help": "pipeline folder to write"})


def main(argv=None) -> None:
    from diffusers import DPMSolverMultistepScheduler

    from models.joint_unet import widen_unet_for_labels
    from models.label_vae import encode_masks, load_label_vae
    from models.pipeline_jodiffusion import JoDiffusionPipeline, load_sd_components, make_scheduler, vae_scale_factor

    cfg = parse_config(InitConfig, argv, description=__doc__)
    src = cfg.base_model
    try:
        vae, text_encoder, tokenizer, unet = load_sd_components(src).values()
        base_scheduler_config = DPMSolverMultistepScheduler.load_config(src, subfolder="scheduler")
    except (OSError, ValueError) as e:
        die(f"{src}: cannot load the base model ({e})")
    try:
        label_vae = load_label_vae(cfg.label_vae)
    except (OSError, ValueError) as e:
        die(f"{cfg.label_vae}: cannot load the label VAE ({e})")

    c = vae.config.latent_channels
    if unet.config.in_channels != c:
        die(f"{src}: the UNet already takes {unet.config.in_channels} channels (not {c}); is it widened already?")
    factor = vae_scale_factor(vae)
    side = factor * 8
    with torch.no_grad():
        probe = encode_masks(label_vae, torch.zeros(1, side, side, dtype=torch.long))
    if probe.shape[-1] != side // factor:
        die(f"{cfg.label_vae}: the label VAE maps {side} px to {probe.shape[-1]} latents, the image VAE to "
            f"{side // factor}: train the label VAE with the image VAE's downsampling factor ({factor})")

    run = RunDir(cfg.output_dir)
    run.save_config(cfg)
    n0 = sum(p.numel() for p in unet.parameters())
    widen_unet_for_labels(unet, label_channels=label_vae.config.latent_channels)
    n1 = sum(p.numel() for p in unet.parameters())
    scheduler = make_scheduler("dpmsolver++", base_scheduler_config)
    pipe = JoDiffusionPipeline(vae=vae, label_vae=label_vae, text_encoder=text_encoder, tokenizer=tokenizer,
                               unet=unet, scheduler=scheduler)
    pipe.save_pretrained(str(run.path), safe_serialization=True)
    run.log(f"widened the UNet {unet.config.in_channels - label_vae.config.latent_channels} -> "
            f"{unet.config.in_channels} channels ({n0 / 1e6:.2f}M -> {n1 / 1e6:.2f}M params, +{n1 - n0}); "
            f"wrote {run.path}")
    run.close()


if __name__ == "__main__":
    main()
