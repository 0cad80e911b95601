"""A tiny Stable-Diffusion-layout model, built offline, for the CPU toy world and for tests.

No pretrained weights can be downloaded here, so the toy default's "base model" is built from
scratch in exactly the layout of a real SD folder (``unet/ vae/ text_encoder/ tokenizer/
scheduler/ model_index.json``); everything downstream loads it through the same
``from_pretrained`` code that loads a real Stable Diffusion folder or hub id.

    from models.tiny_kit import build_tiny_sd
    build_tiny_sd("runs/toy/base_model", words=["circle", "square"], sample_size=8)

The tokenizer is a real CLIP byte-level BPE tokenizer whose vocabulary is written here: every
byte, plus one merge chain per word so each known word is a single token (unknown words fall
back to characters). Note: in transformers 5, ``CLIPTokenizer(vocab_file=..., merges_file=...)``
silently ignores both files; ``CLIPTokenizer(vocab=dict, merges=list)`` and
``CLIPTokenizer.from_pretrained(folder)`` work.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import torch

BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible map from bytes to printable unicode characters."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return dict(zip(printable, map(chr, chars)))


def words_from_texts(texts: Iterable[str]) -> list[str]:
    """Lower-cased words (CLIP's pre-tokenisation: letters, digits, punctuation runs), sorted."""
    out: set[str] = set()
    for t in texts:
        out.update(re.findall(r"[a-z]+|[0-9]|[^\sa-z0-9]+", t.lower()))
    return sorted(out)


def build_vocab(words: Iterable[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Vocabulary and merges so that each of ``words`` encodes to exactly one token."""
    alphabet = list(_bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for tok in alphabet + [a + "</w>" for a in alphabet]:
        vocab.setdefault(tok, len(vocab))
    merges: list[tuple[str, str]] = []
    seen = set()
    b2u = _bytes_to_unicode()
    for word in sorted(set(w.lower() for w in words if w)):
        chars = [b2u[b] for b in word.encode("utf-8")]
        if len(chars) < 2:
            continue
        left = chars[0]
        for i, c in enumerate(chars[1:], start=1):
            right = c + ("</w>" if i == len(chars) - 1 else "")
            pair = (left, right)
            if pair not in seen:
                seen.add(pair)
                merges.append(pair)
            left = left + right
            vocab.setdefault(left, len(vocab))
    vocab.setdefault(BOS, len(vocab))
    vocab.setdefault(EOS, len(vocab))
    return vocab, merges


def build_tokenizer(words: Iterable[str], out_dir: str | Path | None = None, max_length: int = 77):
    from transformers import CLIPTokenizer

    vocab, merges = build_vocab(words)
    tok = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_length)
    if out_dir is not None:
        tok.save_pretrained(str(out_dir))
    return tok


@dataclass
class TinySDSpec:
    """Sizes of the tiny base model. Defaults: 32 px images, factor-4 VAE -> 8x8x4 latents."""

    sample_size: int = 8  # latent side
    unet_channels: Sequence[int] = (32, 64)
    unet_layers_per_block: int = 1
    # cross-attention per UNet level (None: every level but the deepest, as in SD). A toy UNet on
    # 16x16 latents is 2-3x cheaper with the full-resolution level attention-free.
    unet_attention: Sequence[bool] | None = None
    attention_head_dim: int = 8
    vae_channels: Sequence[int] = (32, 64, 64)  # len-1 downsamplings: (32,64,64) -> factor 4
    vae_layers_per_block: int = 1
    latent_channels: int = 4
    text_hidden: int = 32
    # std of the random word embeddings. CLIP's initialisation (0.02, like the position
    # embeddings) leaves a random frozen encoder's output dominated by position: "star" and
    # "square" in the same caption came out at cosine 0.93. At 1.0 the word decides the token's
    # output (0.3-0.7), as in a pretrained CLIP, and the UNet can read the classes off it.
    token_embedding_std: float = 1.0
    text_layers: int = 2
    text_heads: int = 2
    max_length: int = 32
    norm_num_groups: int = 8


def tiny_components(words: Iterable[str], spec: TinySDSpec | None = None, seed: int = 0) -> dict:
    """The five SD components with random weights (deterministic per seed), in memory."""
    from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    spec = spec or TinySDSpec()
    tokenizer = build_tokenizer(words, max_length=spec.max_length)
    torch.manual_seed(seed)
    n = len(spec.unet_channels)
    attn = list(spec.unet_attention) if spec.unet_attention is not None else [True] * (n - 1) + [False]
    if len(attn) != n:
        raise ValueError(f"unet_attention {attn} needs one flag per UNet level ({n})")
    unet = UNet2DConditionModel(
        sample_size=spec.sample_size,
        in_channels=spec.latent_channels,
        out_channels=spec.latent_channels,
        block_out_channels=tuple(spec.unet_channels),
        layers_per_block=spec.unet_layers_per_block,
        down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn),
        up_block_types=tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)),
        cross_attention_dim=spec.text_hidden,
        attention_head_dim=spec.attention_head_dim,
        norm_num_groups=spec.norm_num_groups,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=tuple(spec.vae_channels),
        down_block_types=("DownEncoderBlock2D",) * len(spec.vae_channels),
        up_block_types=("UpDecoderBlock2D",) * len(spec.vae_channels),
        layers_per_block=spec.vae_layers_per_block,
        latent_channels=spec.latent_channels,
        norm_num_groups=spec.norm_num_groups,
        sample_size=spec.sample_size * 2 ** (len(spec.vae_channels) - 1),
    )
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer.get_vocab()),
        hidden_size=spec.text_hidden,
        intermediate_size=spec.text_hidden * 4,
        num_hidden_layers=spec.text_layers,
        num_attention_heads=spec.text_heads,
        max_position_embeddings=spec.max_length,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    ))
    with torch.no_grad():
        text_encoder.get_input_embeddings().weight.normal_(0.0, spec.token_embedding_std)
    # scaled_linear, not cosine: with cosine alpha_bar(999) ~ 2e-9 and a solver started at
    # t=999 amplifies noise-prediction error enormously (measured on the toy prototype).
    scheduler = DPMSolverMultistepScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        algorithm_type="dpmsolver++", solver_order=2, timestep_spacing="trailing", steps_offset=1,
    )
    return dict(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler)


def build_tiny_sd(out_dir: str | Path, words: Iterable[str], spec: TinySDSpec | None = None,
                  seed: int = 0, components: dict | None = None) -> Path:
    """Write a tiny SD-layout folder that ``StableDiffusionPipeline.from_pretrained`` loads."""
    from diffusers import StableDiffusionPipeline

    comps = components or tiny_components(words, spec, seed)
    pipe = StableDiffusionPipeline(**comps, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    out_dir = Path(out_dir)
    pipe.save_pretrained(str(out_dir), safe_serialization=True)
    return out_dir
