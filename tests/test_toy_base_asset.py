"""The shipped pretrained toy base (assets/toy_base): what a user loading it would check."""
import hashlib
import json
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
BASE = REPO / "assets" / "toy_base"


@pytest.fixture(scope="module")
def pipe():
    """The shipped base, loaded once for the tests that use it."""
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(str(BASE), safety_checker=None, requires_safety_checker=False)


def test_the_shipped_weights_are_the_hashed_ones_and_fit_the_cap():
    lines = (BASE / "sha256.txt").read_text().split("\n")
    listed = dict(reversed(line.split("  ", 1)) for line in lines if line.strip())
    on_disk = sorted(p.relative_to(BASE).as_posix() for p in BASE.rglob("*.safetensors"))
    assert sorted(listed) == on_disk == ["text_encoder/model.safetensors", "unet/diffusion_pytorch_model.safetensors",
                                         "vae/diffusion_pytorch_model.safetensors"]
    for rel, digest in listed.items():
        assert hashlib.sha256((BASE / rel).read_bytes()).hexdigest() == digest, rel
    assert sum((BASE / rel).stat().st_size for rel in listed) <= 20 * 2**20
    assert not list(BASE.rglob("*.bin")) and not list(BASE.rglob("*.pt*"))  # safetensors only


def test_the_base_loads_like_stable_diffusion_and_its_documents_sit_beside_it(pipe):
    assert pipe.unet.config.sample_size * pipe.vae_scale_factor == 32
    assert pipe.unet.config.block_out_channels == [64, 64, 128]
    # the command that made it, and its curve, come with it
    cfg = (BASE / "config.yaml").read_text()
    assert "python -m train.toy_web_base" in cfg and "seed: 0" in cfg
    steps = [json.loads(line)["step"] for line in (BASE / "metrics.jsonl").read_text().splitlines()
             if "step" in json.loads(line)]
    assert steps == sorted(set(steps)) and steps[-1] == 8000


def test_the_base_denoises_toy_segmentation_pictures_it_never_saw(pipe):
    """Trained weights, not random ones: on toy segmentation pictures (not in its corpus) the UNet
    removes most of the noise at a middle noise level, and its caption helps."""
    import numpy as np

    from dataset.toy_shapes import render_toy_sample

    samples = [render_toy_sample(10_000 + i) for i in range(8)]
    images = torch.tensor(np.stack([s[0] for s in samples]), dtype=torch.float32).permute(0, 3, 1, 2) / 127.5 - 1
    captions = [s[2] for s in samples]
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        latents = pipe.vae.encode(images).latent_dist.mean * pipe.vae.config.scaling_factor
        noise = torch.randn(latents.shape, generator=g)
        t = torch.full((len(samples),), 500, dtype=torch.long)
        noisy = pipe.scheduler.add_noise(latents, noise, t)

        def mse(prompts):
            ids = pipe.tokenizer(prompts, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                                 truncation=True, return_tensors="pt").input_ids
            pred = pipe.unet(noisy, t, encoder_hidden_states=pipe.text_encoder(ids)[0]).sample
            return torch.mean((pred - noise) ** 2).item()

        own, empty = mse(captions), mse([""] * len(captions))
    assert own < 0.2, own  # measured 0.040; an untrained UNet scores ~1 (the noise has unit variance)
    assert own < empty, (own, empty)
