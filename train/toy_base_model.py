"""Build the toy world's "pretrained" Stable Diffusion: a tiny SD-layout folder trained here.

    python -m train.toy_base_model --config configs/toy_base_model/toy.yaml --output_dir runs/toy/base_model

No pretrained weights can be downloaded here, so the toy chain starts from a base model made
on this machine, in exactly the layout of a real SD folder (``unet/ vae/ text_encoder/
tokenizer/ scheduler/ model_index.json``):

1. a tiny image VAE (diffusers ``AutoencoderKL``; the toy profiles use factor 2: 32 px ->
   16x16x4) trained on the toy images with L1 + MSE reconstruction and a small KL term;
2. its latent std measured on the training images, ``scaling_factor = 1 / std`` (what SD's 0.18215
   is for its VAE), so diffusion sees unit-variance latents;
3. a CLIP tokenizer whose vocabulary holds every word of the toy captions as one token, and a
   small random CLIP text encoder that stays frozen (a fixed random embedding of each word is
   all a conditional UNet needs to tell "ring" from "circle"; the word embeddings are drawn at
   std 1, not CLIP's 0.02, so that the word and not its position decides each token's output,
   see ``TinySDSpec.token_embedding_std``);
4. an untrained UNet of the SD layout; ``train.joint_diffusion --mode image`` pretrains it next.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from dataset import get_dataset_info
from dataset.latents import vocabulary_texts
from dataset.segmentation import DatasetError, SegmentationDataset
from models.tiny_kit import TinySDSpec, build_tiny_sd, tiny_components, words_from_texts
from utils.config import die, error_line, parse_config
from utils.io import RunDir
from utils.visualize import save_grid


@dataclass
class ToyBaseModelConfig:
    """Train the tiny image VAE and write a tiny SD-layout base model folder."""

    output_dir: str = field(default="runs/toy/base_model", metadata={"help": "the SD-layout folder to write"})
    dataset: str = field(default="toy", metadata={"help": "dataset name (dataset/<name>_semantic.py)"})
    data_root: str | None = field(default=None, metadata={"help": "override the dataset's data_root"})
    resolution: int = field(default=32, metadata={"help": "image side in pixels"})
    vae_channels: list[int] = field(default_factory=lambda: [32, 64, 64],
                                    metadata={"help": "VAE block widths; n blocks -> factor 2^(n-1)"})
    unet_channels: list[int] = field(default_factory=lambda: [32, 64], metadata={"help": "UNet block widths"})
    unet_attention: list[bool] | None = field(default=None, metadata={
        "help": "cross-attention per UNet level (default: every level but the deepest)"})
    attention_head_dim: int = field(default=8, metadata={"help": "UNet attention head dim"})
    text_hidden: int = field(default=32, metadata={"help": "text encoder width (= UNet cross-attention dim)"})
    text_layers: int = field(default=2, metadata={"help": "text encoder layers"})
    max_length: int = field(default=32, metadata={"help": "tokenizer max length"})
    vocabulary_file: str | None = field(default=None, metadata={
        "help": "text file whose words also join the tokenizer vocabulary (e.g. captions of another dataset "
                "the model must read)"})
    max_train_steps: int = field(default=1500, metadata={"help": "VAE optimisation steps"})
    train_batch_size: int = field(default=32, metadata={"help": "VAE batch size"})
    learning_rate: float = field(default=5e-4, metadata={"help": "AdamW learning rate (VAE)"})
    l1_weight: float = field(default=1.0, metadata={"help": "weight of the L1 reconstruction term"})
    mse_weight: float = field(default=1.0, metadata={"help": "weight of the MSE reconstruction term"})
    kl_weight: float = field(default=1e-6, metadata={"help": "weight of the KL term (small: keep detail)"})
    max_images: int = field(default=0, metadata={"help": "use at most this many training images (0 = all)"})
    seed: int = field(default=0, metadata={"help": "seed of weights, batches and sampling"})
    logging_steps: int = field(default=50, metadata={"help": "write a metrics line every N steps"})


def load_images(cfg: ToyBaseModelConfig, info) -> tuple[torch.Tensor, list[str], list[str]]:
    """All training images in memory (the toy set is small), every caption of every split, and
    the "<path>: <problem>" of each corrupt file that was skipped (another image took its place)."""
    ds = SegmentationDataset(info, "train", size=cfg.resolution, augment=False, captions="auto")
    n = len(ds) if cfg.max_images <= 0 else min(cfg.max_images, len(ds))
    items = [ds[i] for i in range(n)]
    skipped = [it["skipped"] for it in items if it["skipped"]]
    images = torch.stack([it["image"] for it in items])
    return images, [ds.caption(i) for i in range(len(ds))] + vocabulary_texts(info), skipped


def train_vae(vae, images: torch.Tensor, cfg: ToyBaseModelConfig, run: RunDir) -> None:
    gen = torch.Generator().manual_seed(cfg.seed)
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.learning_rate, weight_decay=0.0)
    vae.train()
    bar = tqdm(range(cfg.max_train_steps), desc="image VAE", dynamic_ncols=True)
    for step in bar:
        idx = torch.randint(len(images), (cfg.train_batch_size,), generator=gen)
        x = images[idx]
        flip = torch.rand(len(x), generator=gen) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        posterior = vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=gen)
        recon = vae.decode(z).sample
        l1, mse = F.l1_loss(recon, x), F.mse_loss(recon, x)
        kl = posterior.kl().mean() / x[0].numel()  # per pixel, so the weight does not depend on size
        loss = cfg.l1_weight * l1 + cfg.mse_weight * mse + cfg.kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        if not math.isfinite(loss.item()):
            die(f"{run.path}: VAE loss became {loss.item()} at step {step}; lower --learning_rate")
        if step % cfg.logging_steps == 0 or step == cfg.max_train_steps - 1:
            bar.set_postfix(loss=f"{loss.item():.4f}")
            run.log_metrics(step=step, loss=loss.item(), l1=l1.item(), mse=mse.item(), kl=kl.item())
    vae.eval()


@torch.no_grad()
def measure_latent_std(vae, images: torch.Tensor, seed: int, limit: int = 1024) -> float:
    """Std of sampled posterior latents over (up to ``limit``) training images."""
    gen = torch.Generator().manual_seed(seed)
    zs = []
    for chunk in images[:limit].split(128):
        post = vae.encode(chunk).latent_dist
        zs.append(post.mean + post.std * torch.randn(post.mean.shape, generator=gen))
    return torch.cat(zs).std().item()


def main(argv=None) -> None:
    cfg = parse_config(ToyBaseModelConfig, argv, description=__doc__)
    try:
        info = get_dataset_info(cfg.dataset, cfg.data_root)
        images, texts, skipped = load_images(cfg, info)
    except (DatasetError, ValueError) as e:
        die(error_line(e))
    if cfg.vocabulary_file:
        try:
            texts += Path(cfg.vocabulary_file).read_text().splitlines()
        except OSError as e:
            die(f"--vocabulary_file {cfg.vocabulary_file}: {e.strerror or e}")
    factor = 2 ** (len(cfg.vae_channels) - 1)
    if cfg.resolution % factor:
        die(f"--resolution {cfg.resolution} is not divisible by the VAE factor {factor}")
    run = RunDir(cfg.output_dir)
    run.save_config(cfg)
    for problem in skipped:
        run.log(f"skipped a bad file: {problem}")
    run.log_metrics(step=0, bad_files=len(skipped))
    torch.manual_seed(cfg.seed)
    spec = TinySDSpec(
        sample_size=cfg.resolution // factor, unet_channels=tuple(cfg.unet_channels),
        unet_attention=tuple(cfg.unet_attention) if cfg.unet_attention is not None else None,
        attention_head_dim=cfg.attention_head_dim, vae_channels=tuple(cfg.vae_channels),
        text_hidden=cfg.text_hidden, text_layers=cfg.text_layers, max_length=cfg.max_length,
    )
    words = words_from_texts(texts)
    comps = tiny_components(words, spec, seed=cfg.seed)
    n_vae = sum(p.numel() for p in comps["vae"].parameters())
    run.log(f"{len(images)} images at {cfg.resolution}px, {len(words)} words; VAE {n_vae / 1e6:.2f}M params "
            f"(factor {factor}: latents {spec.latent_channels}x{spec.sample_size}x{spec.sample_size})")

    t0 = time.time()
    train_vae(comps["vae"], images, cfg, run)
    std = measure_latent_std(comps["vae"], images, cfg.seed)
    comps["vae"].register_to_config(scaling_factor=1.0 / std)
    with torch.no_grad():
        x = images[:8]
        recon = comps["vae"].decode(comps["vae"].encode(x).latent_dist.mean).sample.clamp(-1, 1)
        recon_l1 = (recon - x).abs().mean().item()
    run.log(f"VAE trained in {time.time() - t0:.0f}s; reconstruction L1 {recon_l1:.4f}; latent std {std:.4f} "
            f"-> scaling_factor {1.0 / std:.4f}")
    run.log_metrics(step=cfg.max_train_steps, recon_l1=recon_l1, latent_std=std)
    to_uint8 = lambda t: ((t.permute(1, 2, 0).numpy() + 1) * 127.5).round().clip(0, 255).astype(np.uint8)
    save_grid(run.path / "vae_reconstructions.png", [[to_uint8(t) for t in x], [to_uint8(t) for t in recon]], scale=4)
    build_tiny_sd(run.path, words, spec, components=comps)
    run.log(f"wrote the base model to {run.path} (load with StableDiffusionPipeline.from_pretrained); "
            f"{len(skipped)} bad file(s) skipped in all")
    run.close()


if __name__ == "__main__":
    main()
