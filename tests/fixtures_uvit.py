"""A tiny stand-in for the authors' released ``unet/`` folder (their ``JoDiffusionModel``).

The key list is built WITHOUT ``models/joint_uvit.py``: from diffusers' own ``UniDiffuserModel``
(the UniDiffuser-v1 layout the authors start from) plus the JoDiffusion extras documented in
METHOD.md §8, so a test that loads this folder checks our class against the documented layout.
"""
import json
import os

import diffusers
import torch
from diffusers.pipelines.deprecated.unidiffuser.modeling_uvit import UniDiffuserModel
from safetensors.torch import save_file

TINY_UVIT_CONFIG = dict(
    text_dim=32, inner_text_dim=8, clip_img_dim=16, num_text_tokens=8, num_attention_heads=2,
    attention_head_dim=8, in_channels=4, out_channels=4, num_layers=3, dropout=0.0, norm_num_groups=32,
    cross_attention_dim=None, attention_bias=False, sample_size=8, num_vector_embeds=None, patch_size=2,
    activation_fn="gelu", num_embeds_ada_norm=None, use_linear_projection=False,
    only_cross_attention=False, upcast_attention=False, norm_type="layer_norm", block_type="unidiffuser",
    pre_layer_norm=False, use_timestep_embedding=False, norm_elementwise_affine=True,
    use_patch_pos_embed=False, ff_final_dropout=True, use_data_type_embedding=True,
)


def authors_key_shapes(config=TINY_UVIT_CONFIG) -> dict:
    """Key -> shape of the authors' JoDiffusionModel state dict for ``config`` (built on `meta`).

    UniDiffuserModel with ``text_dim = inner_text_dim`` gives text_in (64 -> inner) and every other
    UniDiffuser key; then, per §8: pos_embed gains N label rows, text_out maps to inner_text_dim,
    pre_text / post_text wrap the text stream, vae_label_in / label_out copy the image ones.
    """
    uni_config = {k: v for k, v in config.items() if k != "inner_text_dim"}
    uni_config["text_dim"] = config["inner_text_dim"]
    with torch.device("meta"):
        uni = UniDiffuserModel(**uni_config)
    shapes = {k: tuple(v.shape) for k, v in uni.state_dict().items()}
    inner = config["num_attention_heads"] * config["attention_head_dim"]
    n_patches = (config["sample_size"] // config["patch_size"]) ** 2
    shapes["pos_embed"] = (1, 2 + config["num_text_tokens"] + 1 + 2 * n_patches, inner)
    shapes["pre_text.weight"] = (config["inner_text_dim"], config["text_dim"])
    shapes["pre_text.bias"] = (config["inner_text_dim"],)
    shapes["post_text.weight"] = (config["text_dim"], config["inner_text_dim"])
    shapes["post_text.bias"] = (config["text_dim"],)
    for image_key, label_key in [("vae_img_in.proj.weight", "vae_label_in.proj.weight"),
                                 ("vae_img_in.proj.bias", "vae_label_in.proj.bias"),
                                 ("vae_img_out.weight", "label_out.weight"),
                                 ("vae_img_out.bias", "label_out.bias")]:
        shapes[label_key] = shapes[image_key]
    return shapes


def authors_state_dict(config=TINY_UVIT_CONFIG, seed=0) -> dict:
    """Random weights under the authors' key names (normal, std 0.1 — values only need to differ)."""
    generator = torch.Generator().manual_seed(seed)
    return {k: torch.randn(shape, generator=generator) * 0.1
            for k, shape in sorted(authors_key_shapes(config).items())}


def write_config(path, config=TINY_UVIT_CONFIG, class_name="JoDiffusionModel"):
    """config.json as diffusers' save_pretrained writes it (sorted keys, _class_name, _diffusers_version)."""
    os.makedirs(path, exist_ok=True)
    data = {"_class_name": class_name, "_diffusers_version": diffusers.__version__, **config}
    with open(os.path.join(path, "config.json"), "w", encoding="utf-8") as f:
        f.write(json.dumps(data, indent=2, sort_keys=True) + "\n")


def write_weights(path, state_dict, fmt="safetensors"):
    """The weights file diffusers' save_pretrained writes (or a plain torch.save dict for "bin")."""
    if fmt == "safetensors":
        save_file({k: v.contiguous() for k, v in state_dict.items()},
                  os.path.join(path, "diffusion_pytorch_model.safetensors"), metadata={"format": "pt"})
    elif fmt == "bin":
        torch.save(dict(state_dict), os.path.join(path, "diffusion_pytorch_model.bin"))
    else:
        raise ValueError(f"fmt must be 'safetensors' or 'bin', got {fmt!r}")


def write_authors_unet_folder(path, seed=0, config=TINY_UVIT_CONFIG, class_name="JoDiffusionModel",
                              fmt="safetensors") -> dict:
    """Write a tiny authors'-layout ``unet/`` folder at ``path``; return the state dict written."""
    state_dict = authors_state_dict(config, seed)
    write_config(path, config, class_name)
    write_weights(path, state_dict, fmt)
    return state_dict
