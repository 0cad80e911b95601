"""The toy world's UniDiffuser base: a tiny UniDiffuser pipeline folder built beside the toy SD base.

    from models.toy_unidiffuser import write_toy_unidiffuser_folder
    write_toy_unidiffuser_folder("runs/toy/base_model", "runs/toy/unidiffuser_base")

The authors start their U-ViT from UniDiffuser-v1 (METHOD.md §8), which cannot be downloaded
here. So, as ``train.toy_base_model`` stands in for Stable Diffusion, this stands in for
UniDiffuser-v1: a folder in diffusers' UniDiffuser layout whose image VAE, CLIP text encoder and
tokenizer are the toy SD base's (copied), with a tiny random frozen CLIP image encoder, a tiny
random frozen caption decoder (only its ``encode_prefix`` / ``decode_prefix``, the text
bottleneck, matter to the U-ViT) and an untrained ``UniDiffuserModel``. ``train.joint_diffusion
--mode image`` then trains that U-ViT with UniDiffuser's objective (``models.uvit_training``), and
``inference.uvit_init`` turns the result into the JoDiffusion U-ViT's step 0.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import diffusers
import torch
from diffusers.pipelines.deprecated.unidiffuser.modeling_text_decoder import UniDiffuserTextDecoder
from diffusers.pipelines.deprecated.unidiffuser.modeling_uvit import UniDiffuserModel
from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

from utils.io import atomic_folder, check_pipeline_folder, read_json_object

# toy SD base folder -> UniDiffuser folder, copied as is
COPIED_FROM_SD_BASE = {"vae": "vae", "text_encoder": "text_encoder", "tokenizer": "clip_tokenizer",
                       "scheduler": "scheduler"}
MODEL_INDEX = {
    "_class_name": "UniDiffuserPipeline",
    "vae": ["diffusers", "AutoencoderKL"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "image_encoder": ["transformers", "CLIPVisionModelWithProjection"],
    "clip_image_processor": ["transformers", "CLIPImageProcessor"],
    "clip_tokenizer": ["transformers", "CLIPTokenizer"],
    "text_decoder": ["unidiffuser", "UniDiffuserTextDecoder"],
    "unet": ["unidiffuser", "UniDiffuserModel"],
    "scheduler": ["diffusers", "DPMSolverMultistepScheduler"],
}


@dataclass
class ToyUniDiffuserSpec:
    """Sizes of the toy UniDiffuser. The rest (latent size and channels, text tokens and width,
    image size) is read from the SD base, so the two bases see the same data."""

    num_attention_heads: int = 4
    attention_head_dim: int = 32  # inner width 128
    num_layers: int = 9  # 4 in-blocks, 1 mid, 4 out-blocks with long skips
    text_prefix_dim: int = 16  # caption-decoder prefix (UniDiffuser-v1: 64)
    clip_img_dim: int = 32  # CLIP image projection (v1: 512)
    vision_hidden: int = 32
    vision_layers: int = 2
    vision_heads: int = 2
    vision_patch: int = 8
    decoder_layers: int = 1  # the caption decoder's GPT-2 (its prefix layers are what counts)


def unidiffuser_config(spec: ToyUniDiffuserSpec, sample_size: int, in_channels: int, num_text_tokens: int) -> dict:
    """``UniDiffuserModel`` kwargs: UniDiffuser-v1's layout (METHOD.md §8) at the spec's sizes."""
    return dict(text_dim=spec.text_prefix_dim, clip_img_dim=spec.clip_img_dim, num_text_tokens=num_text_tokens,
                num_attention_heads=spec.num_attention_heads, attention_head_dim=spec.attention_head_dim,
                in_channels=in_channels, out_channels=in_channels, num_layers=spec.num_layers, dropout=0.0,
                norm_num_groups=32, cross_attention_dim=None, attention_bias=False, sample_size=sample_size,
                num_vector_embeds=None, patch_size=2, activation_fn="gelu", num_embeds_ada_norm=None,
                use_linear_projection=False, only_cross_attention=False, upcast_attention=False,
                norm_type="layer_norm", block_type="unidiffuser", pre_layer_norm=False, use_timestep_embedding=False,
                norm_elementwise_affine=True, use_patch_pos_embed=False, ff_final_dropout=True,
                use_data_type_embedding=True)


def _base_sizes(sd_base: Path) -> dict:
    """Latent side and channels, text tokens and width, image side of the SD base."""
    vae, text = read_json_object(sd_base / "vae" / "config.json"), read_json_object(sd_base / "text_encoder" / "config.json")
    unet = read_json_object(sd_base / "unet" / "config.json")
    try:
        factor = 2 ** (len(vae["block_out_channels"]) - 1)
        sizes = dict(sample_size=int(unet["sample_size"]), in_channels=int(vae["latent_channels"]),
                     num_text_tokens=int(text["max_position_embeddings"]), text_width=int(text["hidden_size"]))
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{sd_base}: the vae/unet/text_encoder configs lack a size ({e})") from None
    return dict(sizes, image_size=sizes["sample_size"] * factor)


def build_toy_unidiffuser(sizes: dict, spec: ToyUniDiffuserSpec, seed: int = 0) -> dict:
    """The new (random) parts in memory: unet, text_decoder, image_encoder, clip_image_processor."""
    torch.manual_seed(seed)
    unet = UniDiffuserModel(**unidiffuser_config(spec, sizes["sample_size"], sizes["in_channels"],
                                                 sizes["num_text_tokens"]))
    # CLIP text (width W) -> encode_prefix -> prefix -> decode_prefix -> GPT-2 width W, as in v1
    text_decoder = UniDiffuserTextDecoder(prefix_length=sizes["num_text_tokens"], prefix_inner_dim=sizes["text_width"],
                                          prefix_hidden_dim=spec.text_prefix_dim, vocab_size=64,
                                          n_positions=2 * sizes["num_text_tokens"], n_embd=sizes["text_width"],
                                          n_layer=spec.decoder_layers, n_head=2)
    image_encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=spec.vision_hidden, intermediate_size=4 * spec.vision_hidden, num_hidden_layers=spec.vision_layers,
        num_attention_heads=spec.vision_heads, image_size=sizes["image_size"], patch_size=spec.vision_patch,
        projection_dim=spec.clip_img_dim))
    side = sizes["image_size"]
    processor = CLIPImageProcessor(size={"shortest_edge": side}, crop_size={"height": side, "width": side})
    return dict(unet=unet.eval(), text_decoder=text_decoder.eval(), image_encoder=image_encoder.eval(),
                clip_image_processor=processor)


def _save_text_decoder(text_decoder, path: Path) -> None:
    """GPT-2 ties lm_head to the word embeddings, which safetensors refuses; the saved head is an
    equal copy (loading ties the two again)."""
    gpt = text_decoder.transformer
    gpt.lm_head.weight = torch.nn.Parameter(gpt.transformer.wte.weight.detach().clone())
    text_decoder.save_pretrained(str(path), safe_serialization=True)


def write_toy_unidiffuser_folder(sd_base: str | Path, output_dir: str | Path, spec: ToyUniDiffuserSpec | None = None,
                                 seed: int = 0) -> Path:
    """Write the untrained toy UniDiffuser folder for the SD base ``sd_base`` and return it.

    Written under a temporary name and renamed once complete; a folder that exists and is not a
    pipeline folder is never replaced. ValueError("<path>: ...") for a base that does not fit.
    """
    sd_base, output = Path(sd_base), Path(output_dir)
    check_pipeline_folder(sd_base, [*COPIED_FROM_SD_BASE, "unet"])
    if output.exists() and (not output.is_dir() or (any(output.iterdir()) and not (output / "model_index.json").is_file())):
        raise ValueError(f"{output}: exists and is not a pipeline folder; refusing to replace it")
    scheduler = read_json_object(sd_base / "scheduler" / "scheduler_config.json")
    if scheduler.get("prediction_type", "epsilon") != "epsilon":
        raise ValueError(f"{sd_base / 'scheduler'}: prediction_type {scheduler['prediction_type']!r}; "
                         "UniDiffuser's objective predicts the noise (epsilon)")
    spec = spec or ToyUniDiffuserSpec()
    sizes = _base_sizes(sd_base)
    if sizes["image_size"] % spec.vision_patch:
        raise ValueError(f"{sd_base}: image side {sizes['image_size']} is not a multiple of the CLIP image "
                         f"patch {spec.vision_patch}")
    parts = build_toy_unidiffuser(sizes, spec, seed)

    with atomic_folder(output) as tmp:
        for theirs, ours in COPIED_FROM_SD_BASE.items():
            shutil.copytree(sd_base / theirs, tmp / ours, ignore=shutil.ignore_patterns(".*"))
        parts["unet"].save_pretrained(str(tmp / "unet"), safe_serialization=True)
        parts["image_encoder"].save_pretrained(str(tmp / "image_encoder"), safe_serialization=True)
        parts["clip_image_processor"].save_pretrained(str(tmp / "clip_image_processor"))
        _save_text_decoder(parts["text_decoder"], tmp / "text_decoder")
        index = dict(MODEL_INDEX, _diffusers_version=diffusers.__version__)
        index["scheduler"] = ["diffusers", scheduler.get("_class_name", "DPMSolverMultistepScheduler")]
        (tmp / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return output
