"""A tiny pipeline folder in the authors' U-ViT layout (METHOD.md §8), written without our loaders:
``image_vae/`` (SD AutoencoderKL), ``text_encoder/`` (CLIP text), ``clip_tokenizer/``,
``image_encoder/`` (CLIP vision + projection), ``clip_image_processor/``, ``label_vae/`` (their
LightweightLabelVAE keys), ``unet/`` (their JoDiffusionModel keys), ``scheduler/`` and
``model_index.json`` naming their classes. 16 px images, 8 x 8 latents, factor 2 for both VAEs.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from tests.fixtures_authors_label_vae import write_authors_label_vae_folder
from tests.fixtures_uvit import TINY_UVIT_CONFIG, write_authors_unet_folder

WORDS = ["a", "photo", "of", "circle", "square", "triangle", "star", "ring", "and", "on", "background"]
SIZE = 16  # px; latents 8 x 8 = TINY_UVIT_CONFIG["sample_size"]


def write_authors_pipeline_folder(path: str | Path, num_labels: int = 6, seed: int = 0, fmt: str = "safetensors") -> Path:
    """Write the folder; ``fmt="bin"`` stores the U-ViT as a pickled ``.bin`` (as their step-0 folder)."""
    from diffusers import AutoencoderKL, DPMSolverMultistepScheduler
    from transformers import (CLIPImageProcessor, CLIPTextConfig, CLIPTextModel, CLIPVisionConfig,
                              CLIPVisionModelWithProjection)

    from models.tiny_kit import build_tokenizer

    path = Path(path)
    cfg = TINY_UVIT_CONFIG
    torch.manual_seed(seed)
    tokenizer = build_tokenizer(WORDS, max_length=cfg["num_text_tokens"])
    tokenizer.save_pretrained(str(path / "clip_tokenizer"))
    CLIPTextModel(CLIPTextConfig(vocab_size=len(tokenizer.get_vocab()), hidden_size=cfg["text_dim"],
                                 intermediate_size=4 * cfg["text_dim"], num_hidden_layers=1, num_attention_heads=2,
                                 max_position_embeddings=cfg["num_text_tokens"], bos_token_id=tokenizer.bos_token_id,
                                 eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id),
                  ).save_pretrained(str(path / "text_encoder"), safe_serialization=True)
    AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, latent_channels=4,
                  norm_num_groups=8, sample_size=SIZE).save_pretrained(str(path / "image_vae"), safe_serialization=True)
    CLIPVisionModelWithProjection(CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                                   num_attention_heads=2, image_size=SIZE, patch_size=8,
                                                   projection_dim=cfg["clip_img_dim"]),
                                  ).save_pretrained(str(path / "image_encoder"), safe_serialization=True)
    CLIPImageProcessor(size={"shortest_edge": SIZE}, crop_size={"height": SIZE, "width": SIZE}).save_pretrained(
        str(path / "clip_image_processor"))
    write_authors_label_vae_folder(path / "label_vae", out_channels=num_labels,
                                   in_channels=max(1, (num_labels - 1).bit_length()), seed=seed)
    write_authors_unet_folder(path / "unet", seed=seed, fmt=fmt)
    DPMSolverMultistepScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                algorithm_type="dpmsolver++", solver_order=2).save_pretrained(str(path / "scheduler"))
    index = {"_class_name": "JoDiffusionPipeline", "_diffusers_version": "0.31.0",
             "image_vae": ["diffusers", "AutoencoderKL"], "text_encoder": ["transformers", "CLIPTextModel"],
             "clip_tokenizer": ["transformers", "CLIPTokenizer"],
             "image_encoder": ["transformers", "CLIPVisionModelWithProjection"],
             "clip_image_processor": ["transformers", "CLIPImageProcessor"],
             "label_vae": ["jodiffusion.models", "LightweightLabelVAE"], "unet": ["jodiffusion.models", "JoDiffusionModel"],
             "scheduler": ["diffusers", "DPMSolverMultistepScheduler"]}
    (path / "model_index.json").write_text(json.dumps(index, indent=2))
    return path
