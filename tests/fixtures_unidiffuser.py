"""A tiny UniDiffuser-v1 pipeline folder, written with diffusers' and transformers' own classes.

The folder names are those ``UniDiffuserPipeline.save_pretrained`` writes (vae/, text_encoder/,
image_encoder/, clip_image_processor/, clip_tokenizer/, text_decoder/, unet/, scheduler/, plus
model_index.json). The caption decoder is a ``.bin`` (its GPT-2 ties two tensors, which
safetensors refuses), the rest safetensors. The GPT-2 ``text_tokenizer/`` is left out: it needs
vocabulary files, and only the caption decoder's ``encode_prefix`` / ``decode_prefix`` matter for
the JoDiffusion U-ViT. Every U-ViT and caption-decoder parameter is perturbed after
construction so that it differs from any fresh initialisation (UniDiffuser's own init leaves
``data_type_pos_embed_token`` at zero), as the released, trained weights do.
"""
from __future__ import annotations

import json
from pathlib import Path

import diffusers
import torch
from diffusers import AutoencoderKL, DPMSolverMultistepScheduler
from diffusers.pipelines.deprecated.unidiffuser.modeling_text_decoder import UniDiffuserTextDecoder
from diffusers.pipelines.deprecated.unidiffuser.modeling_uvit import UniDiffuserModel
from transformers import (CLIPImageProcessor, CLIPTextConfig, CLIPTextModel, CLIPVisionConfig,
                          CLIPVisionModelWithProjection)

from models.toy_unidiffuser import MODEL_INDEX as TOY_MODEL_INDEX
from models.tiny_kit import build_tokenizer

WORDS = ["a", "photo", "of", "circle", "square", "triangle", "star", "ring", "and", "on", "background"]
CLIP_TEXT_WIDTH = 32  # UniDiffuser-v1: 768 (CLIP ViT-L/14)
SIZE = 16  # px; the VAE downsamples by 2 -> 8 x 8 latents
# UniDiffuser-v1's settings at tiny sizes; text_dim is the caption-decoder prefix width (v1: 64)
TINY_UNIDIFFUSER_CONFIG = dict(
    text_dim=8, clip_img_dim=16, num_text_tokens=8, num_attention_heads=2, attention_head_dim=8,
    in_channels=4, out_channels=4, num_layers=3, dropout=0.0, norm_num_groups=32, cross_attention_dim=None,
    attention_bias=False, sample_size=8, num_vector_embeds=None, patch_size=2, activation_fn="gelu",
    num_embeds_ada_norm=None, use_linear_projection=False, only_cross_attention=False, upcast_attention=False,
    norm_type="layer_norm", block_type="unidiffuser", pre_layer_norm=False, use_timestep_embedding=False,
    norm_elementwise_affine=True, use_patch_pos_embed=False, ff_final_dropout=True, use_data_type_embedding=True,
)
MODEL_INDEX = dict(TOY_MODEL_INDEX)  # the component names and classes diffusers' UniDiffuserPipeline saves


def _perturb(module: torch.nn.Module, generator: torch.Generator) -> None:
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * 0.05)


def write_tiny_unidiffuser_folder(path: str | Path, seed: int = 0) -> Path:
    """Write the folder at ``path`` (U-ViT: ``TINY_UNIDIFFUSER_CONFIG``) and return it."""
    path = Path(path)
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed + 1)
    cfg = TINY_UNIDIFFUSER_CONFIG

    tokenizer = build_tokenizer(WORDS, max_length=cfg["num_text_tokens"])
    tokenizer.save_pretrained(str(path / "clip_tokenizer"))
    CLIPTextModel(CLIPTextConfig(vocab_size=len(tokenizer.get_vocab()), hidden_size=CLIP_TEXT_WIDTH,
                                 intermediate_size=2 * CLIP_TEXT_WIDTH, num_hidden_layers=1, num_attention_heads=2,
                                 max_position_embeddings=cfg["num_text_tokens"], bos_token_id=tokenizer.bos_token_id,
                                 eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id),
                  ).save_pretrained(str(path / "text_encoder"), safe_serialization=True)
    AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, latent_channels=cfg["in_channels"],
                  norm_num_groups=8, sample_size=SIZE).save_pretrained(str(path / "vae"), safe_serialization=True)
    CLIPVisionModelWithProjection(CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                                   num_attention_heads=2, image_size=SIZE, patch_size=8,
                                                   projection_dim=cfg["clip_img_dim"]),
                                  ).save_pretrained(str(path / "image_encoder"), safe_serialization=True)
    CLIPImageProcessor(size={"shortest_edge": SIZE}, crop_size={"height": SIZE, "width": SIZE}).save_pretrained(
        str(path / "clip_image_processor"))

    # the caption decoder: CLIP text (32) -> encode_prefix -> 8 -> decode_prefix -> GPT-2 width (32)
    text_decoder = UniDiffuserTextDecoder(prefix_length=cfg["num_text_tokens"], prefix_inner_dim=CLIP_TEXT_WIDTH,
                                          prefix_hidden_dim=cfg["text_dim"], vocab_size=64, n_positions=32,
                                          n_embd=CLIP_TEXT_WIDTH, n_layer=1, n_head=2)
    _perturb(text_decoder, generator)
    # GPT-2 ties lm_head to wte, which safetensors refuses: diffusers can only save it as a .bin
    text_decoder.save_pretrained(str(path / "text_decoder"), safe_serialization=False)
    unet = UniDiffuserModel(**cfg)
    _perturb(unet, generator)
    unet.save_pretrained(str(path / "unet"), safe_serialization=True)

    DPMSolverMultistepScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                algorithm_type="dpmsolver++", solver_order=2).save_pretrained(str(path / "scheduler"))
    index = dict(MODEL_INDEX, _diffusers_version=diffusers.__version__)
    (path / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return path
