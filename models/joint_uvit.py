"""The authors' joint denoiser: UniDiffuser-v1's U-ViT with a second patch stream for the label latent.

    from models.joint_uvit import JoDiffusionUViT
    model = JoDiffusionUViT.from_pretrained("path/to/JoDiffusion", subfolder="unet")
    text_eps, image_eps, clip_eps, label_eps = model(prompt_embeds, image_latents, image_embeds,
                                                     label_latents, timestep_img=t, timestep_text=0)

One sequence of tokens goes through diffusers' ``UTransformer2DModel`` (15 in-blocks, a mid block,
15 out-blocks with long skips):

    [t_img, t_text, data_type, text x 77, clip_img x 1, image patches x N, label patches x N]

The timestep tokens are raw sinusoids, the text enters through a 768 -> 64 -> 1536 bottleneck
(``pre_text`` / ``text_in``, the UniDiffuser caption-decoder prefix), and label tokens carry no modality
embedding, only their own position rows. Parameter names and shapes are those of the authors'
``JoDiffusionModel`` so their released ``unet/`` folder loads as is (``_class_name`` may say either
class); ``check_joint_uvit_weights`` checks a folder against its ``config.json`` without building the
0.95B-parameter model.
"""
from __future__ import annotations

import json
import os
from types import SimpleNamespace

import safetensors
import torch
import torch.nn as nn
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.pipelines.deprecated.unidiffuser.modeling_uvit import PatchEmbed, UTransformer2DModel

# The authors' released joint model (UniDiffuser-v1's U-ViT at 512 px, plus the label stream).
PAPER_UVIT_CONFIG = dict(
    text_dim=768,  # CLIP ViT-L/14 last hidden state
    inner_text_dim=64,  # UniDiffuser's caption-decoder prefix width
    clip_img_dim=512,  # CLIP ViT-B/32 image embedding
    num_text_tokens=77,
    num_attention_heads=24,
    attention_head_dim=64,  # inner width 1536
    in_channels=4,
    out_channels=4,
    num_layers=30,
    dropout=0.0,
    norm_num_groups=32,
    cross_attention_dim=None,  # no cross-attention: the text is in the token sequence
    attention_bias=False,
    sample_size=64,  # 512 px / 8
    num_vector_embeds=None,
    patch_size=2,
    activation_fn="gelu",
    num_embeds_ada_norm=None,
    use_linear_projection=False,
    only_cross_attention=False,
    upcast_attention=False,
    norm_type="layer_norm",
    block_type="unidiffuser",  # LayerNorms on the residual stream
    pre_layer_norm=False,  # post-LN, as UniDiffuser
    use_timestep_embedding=False,  # the timestep token is the raw sinusoid
    norm_elementwise_affine=True,
    use_patch_pos_embed=False,
    ff_final_dropout=True,
    use_data_type_embedding=True,  # UniDiffuser-v1's data-type token
)

WEIGHTS_NAME = "diffusion_pytorch_model"
_NOT_OURS = "this is not a JoDiffusion U-ViT checkpoint"


def num_patches(config) -> int:
    """Patches per latent (image or label): (sample_size / patch_size)^2."""
    side = config["sample_size"] // config["patch_size"]
    return side * side


def num_tokens(config) -> int:
    """Length of the token sequence: 2 timesteps, data type, text, clip, image and label patches."""
    data_type = 1 if config.get("use_data_type_embedding", True) else 0
    return 2 + data_type + config["num_text_tokens"] + 1 + 2 * num_patches(config)


def _batched(value, batch_size: int, device: torch.device) -> torch.Tensor:
    """An int/float, a 0-d tensor or a (B,) tensor as a (B,) tensor."""
    if not torch.is_tensor(value):
        value = torch.tensor([value], device=device)
    if value.ndim > 1 or (value.ndim == 1 and value.shape[0] not in (1, batch_size)):
        raise ValueError(f"JoDiffusionUViT: a timestep/data_type of shape {tuple(value.shape)} does not "
                         f"broadcast to the batch of {batch_size}")
    return value.to(device) * torch.ones(batch_size, dtype=value.dtype, device=device)


class JoDiffusionUViT(ModelMixin, ConfigMixin):
    """The authors' ``JoDiffusionModel``: joint ε-prediction for text, image latent, CLIP image and label latent.

    Defaults are the authors' released configuration (``PAPER_UVIT_CONFIG``, ~0.95B parameters).
    The config keys are those of diffusers' ``UniDiffuserModel`` plus ``inner_text_dim``.
    """

    # each transformer block is recomputed in the backward pass when enabled (the authors' code
    # crashes with it on; diffusers' UTransformer2DModel has no switch of its own)
    _supports_gradient_checkpointing = True

    @register_to_config
    def __init__(
        self,
        text_dim: int = 768,
        clip_img_dim: int = 512,
        num_text_tokens: int = 77,
        num_attention_heads: int = 24,
        attention_head_dim: int = 64,
        in_channels: int = 4,
        out_channels: int = 4,
        num_layers: int = 30,
        dropout: float = 0.0,
        norm_num_groups: int = 32,
        cross_attention_dim: int | None = None,
        attention_bias: bool = False,
        sample_size: int = 64,
        num_vector_embeds: int | None = None,
        patch_size: int = 2,
        activation_fn: str = "gelu",
        num_embeds_ada_norm: int | None = None,
        use_linear_projection: bool = False,
        only_cross_attention: bool = False,
        upcast_attention: bool = False,
        norm_type: str = "layer_norm",
        block_type: str = "unidiffuser",
        pre_layer_norm: bool = False,
        use_timestep_embedding: bool = False,
        norm_elementwise_affine: bool = True,
        use_patch_pos_embed: bool = False,
        ff_final_dropout: bool = True,
        use_data_type_embedding: bool = True,
        inner_text_dim: int = 64,
    ):
        super().__init__()
        c = SimpleNamespace(**{k: v for k, v in locals().items() if k not in ("self", "__class__")})
        c.out_channels = in_channels if out_channels is None else out_channels
        self.gradient_checkpointing = False
        self.inner_dim = num_attention_heads * attention_head_dim
        self.patch_size, self.out_channels = patch_size, c.out_channels
        self.num_patches = num_patches(dict(sample_size=sample_size, patch_size=patch_size))
        self.num_tokens = num_tokens(dict(sample_size=sample_size, patch_size=patch_size,
                                          num_text_tokens=num_text_tokens,
                                          use_data_type_embedding=use_data_type_embedding))
        self.use_data_type_embedding = use_data_type_embedding
        self._build_inputs(c)
        self._build_body(c)
        self._build_heads(c)

    def _build_inputs(self, c) -> None:
        """1. One token stream per modality, the timestep tokens, the position rows."""
        inner = self.inner_dim
        self.pre_text = nn.Linear(c.text_dim, c.inner_text_dim)
        self.text_in = nn.Linear(c.inner_text_dim, inner)

        def patch_embed():
            return PatchEmbed(height=c.sample_size, width=c.sample_size, patch_size=c.patch_size,
                              in_channels=c.in_channels, embed_dim=inner, use_pos_embed=c.use_patch_pos_embed)

        self.vae_img_in = patch_embed()
        self.clip_img_in = nn.Linear(c.clip_img_dim, inner)
        self.vae_label_in = patch_embed()

        self.timestep_img_proj = Timesteps(inner, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.timestep_img_embed = (TimestepEmbedding(inner, 4 * inner, out_dim=inner)
                                   if c.use_timestep_embedding else nn.Identity())
        self.timestep_text_proj = Timesteps(inner, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.timestep_text_embed = (TimestepEmbedding(inner, 4 * inner, out_dim=inner)
                                    if c.use_timestep_embedding else nn.Identity())

        # Every token but the data-type one has a row here; the data-type row is inserted at index 2.
        n_pos = self.num_tokens - 1 if c.use_data_type_embedding else self.num_tokens
        self.pos_embed = nn.Parameter(torch.zeros(1, n_pos, inner))
        self.pos_embed_drop = nn.Dropout(p=c.dropout)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)  # as UniDiffuser
        if c.use_data_type_embedding:
            self.data_type_token_embedding = nn.Embedding(2, inner)
            self.data_type_pos_embed_token = nn.Parameter(torch.zeros(1, 1, inner))

    def _build_body(self, c) -> None:
        """2. The U-ViT body, built exactly as UniDiffuserModel builds it."""
        self.transformer = UTransformer2DModel(
            num_attention_heads=c.num_attention_heads, attention_head_dim=c.attention_head_dim,
            in_channels=c.in_channels, out_channels=c.out_channels, num_layers=c.num_layers, dropout=c.dropout,
            norm_num_groups=c.norm_num_groups, cross_attention_dim=c.cross_attention_dim,
            attention_bias=c.attention_bias, sample_size=c.sample_size, num_vector_embeds=c.num_vector_embeds,
            patch_size=c.patch_size, activation_fn=c.activation_fn, num_embeds_ada_norm=c.num_embeds_ada_norm,
            use_linear_projection=c.use_linear_projection, only_cross_attention=c.only_cross_attention,
            upcast_attention=c.upcast_attention, norm_type=c.norm_type, block_type=c.block_type,
            pre_layer_norm=c.pre_layer_norm, norm_elementwise_affine=c.norm_elementwise_affine,
            use_patch_pos_embed=c.use_patch_pos_embed, ff_final_dropout=c.ff_final_dropout,
        )
        # the body's own patch embedding (`transformer.pos_embed`) is in every checkpoint but never
        # called (tokens come in embedded): frozen, or multi-GPU training (DDP) stops on parameters
        # that get no gradient
        self.transformer.pos_embed.requires_grad_(False)

    def _build_heads(self, c) -> None:
        """3. Output heads, one per modality."""
        patch_dim = c.patch_size * c.patch_size * c.out_channels
        self.text_out = nn.Linear(self.inner_dim, c.inner_text_dim)
        self.post_text = nn.Linear(c.inner_text_dim, c.text_dim)
        self.vae_img_out = nn.Linear(self.inner_dim, patch_dim)
        self.clip_img_out = nn.Linear(self.inner_dim, c.clip_img_dim)
        self.label_out = nn.Linear(self.inner_dim, patch_dim)

    def _check_inputs(self, prompt_embeds, image_latents, image_embeds, label_latents):
        c = self.config
        b = image_latents.shape[0]
        side = c.sample_size
        expected = {
            "prompt_embeds": (prompt_embeds, (b, c.num_text_tokens, c.text_dim)),
            "image_latents": (image_latents, (b, c.in_channels, side, side)),
            "image_embeds": (image_embeds, (b, 1, c.clip_img_dim)),
            "label_latents": (label_latents, (b, c.in_channels, side, side)),
        }
        for name, (tensor, shape) in expected.items():
            if tuple(tensor.shape) != shape:
                raise ValueError(f"JoDiffusionUViT.forward: {name} has shape {tuple(tensor.shape)}, "
                                 f"expected {shape}")

    def _unpatchify(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, h*w, p*p*C) patch predictions -> (B, C, h*p, w*p), the authors' `nhwpqc -> nchpwq`."""
        side = int(round(tokens.shape[1] ** 0.5))
        p, c = self.patch_size, self.out_channels
        x = tokens.reshape(-1, side, side, p, p, c)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(-1, c, side * p, side * p)

    def forward(self, prompt_embeds, image_latents, image_embeds, label_latents,
                timestep_img, timestep_text, data_type=1):
        """Predict the noise of every stream.

        prompt_embeds (B, num_text_tokens, text_dim); image_latents and label_latents
        (B, in_channels, sample_size, sample_size); image_embeds (B, 1, clip_img_dim);
        timestep_img (shared by image, CLIP image and label) and timestep_text: int, 0-d or (B,);
        data_type: 1 (UniDiffuser-v1's default, used by the authors) or 0.

        Returns ``(text_out, img_vae_out, img_clip_out, label_out)`` with the input shapes
        (out_channels for the latents).
        """
        self._check_inputs(prompt_embeds, image_latents, image_embeds, label_latents)
        batch_size, device = image_latents.shape[0], image_latents.device

        text_tokens = self.text_in(self.pre_text(prompt_embeds))
        clip_tokens = self.clip_img_in(image_embeds)
        image_tokens = self.vae_img_in(image_latents)
        label_tokens = self.vae_label_in(label_latents)
        n_text, n_patch = text_tokens.shape[1], image_tokens.shape[1]

        # The sinusoids are computed in fp32; cast them to the model's dtype (fp16 training).
        t_img = self.timestep_img_proj(_batched(timestep_img, batch_size, device))
        t_img = self.timestep_img_embed(t_img.to(self.dtype)).unsqueeze(1)
        t_text = self.timestep_text_proj(_batched(timestep_text, batch_size, device))
        t_text = self.timestep_text_embed(t_text.to(self.dtype)).unsqueeze(1)

        if self.use_data_type_embedding:
            data_type = _batched(data_type, batch_size, device).long()
            data_type_token = self.data_type_token_embedding(data_type).unsqueeze(1)
            tokens = [t_img, t_text, data_type_token, text_tokens, clip_tokens, image_tokens, label_tokens]
            pos_embed = torch.cat([self.pos_embed[:, :2], self.data_type_pos_embed_token,
                                   self.pos_embed[:, 2:]], dim=1)
            lead = 3
        else:
            tokens = [t_img, t_text, text_tokens, clip_tokens, image_tokens, label_tokens]
            pos_embed = self.pos_embed
            lead = 2
        hidden_states = self.pos_embed_drop(torch.cat(tokens, dim=1) + pos_embed)

        if self.gradient_checkpointing and torch.is_grad_enabled():
            hidden_states = self._checkpointed_transformer(hidden_states)
        else:
            hidden_states = self.transformer(hidden_states, hidden_states_is_embedding=True,
                                             unpatchify=False, return_dict=False)[0]

        _, text_out, img_clip_out, img_vae_out, label_out = hidden_states.split(
            (lead, n_text, 1, n_patch, n_patch), dim=1)
        text_out = self.post_text(self.text_out(text_out))
        img_clip_out = self.clip_img_out(img_clip_out)
        img_vae_out = self._unpatchify(self.vae_img_out(img_vae_out))
        label_out = self._unpatchify(self.label_out(label_out))
        return text_out, img_vae_out, img_clip_out, label_out

    def _checkpointed_transformer(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """``UTransformer2DModel.forward`` on embedded tokens (in blocks, mid block, out blocks with
        their long skips, final norm) with every block recomputed in the backward pass."""
        body, run = self.transformer, self._gradient_checkpointing_func
        skips = []
        for block in body.transformer_in_blocks:
            hidden_states = run(block, hidden_states)
            skips.append(hidden_states)
        hidden_states = run(body.transformer_mid_block, hidden_states)
        for out_block in body.transformer_out_blocks:
            hidden_states = run(out_block["block"], out_block["skip"](hidden_states, skips.pop()))
        return body.norm_out(hidden_states)

    @classmethod
    def from_unidiffuser(cls, unidiffuser, text_decoder=None) -> "JoDiffusionUViT":
        """The authors' step 0 from UniDiffuser-v1 (``models.uvit_init.uvit_from_unidiffuser``):
        ``unidiffuser`` is its pipeline folder (``unet/`` and ``text_decoder/`` are read), or its
        loaded ``UniDiffuserModel`` with ``text_decoder`` its ``UniDiffuserTextDecoder``."""
        from diffusers.pipelines.deprecated.unidiffuser import UniDiffuserModel, UniDiffuserTextDecoder

        from models.uvit_init import uvit_from_unidiffuser  # built on this module: imported on use

        if text_decoder is None:
            folder = os.fspath(unidiffuser)
            unidiffuser = UniDiffuserModel.from_pretrained(folder, subfolder="unet")
            text_decoder = UniDiffuserTextDecoder.from_pretrained(folder, subfolder="text_decoder")
        return uvit_from_unidiffuser(unidiffuser, text_decoder)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """diffusers' ``from_pretrained``, after ``check_joint_uvit_weights`` on a local folder.

        The check turns a foreign checkpoint (a UniDiffuser or SD UNet folder, a renamed key, another
        size) into one ValueError naming the first key that differs, instead of a half-loaded model.
        A name that is not a local folder (a Hub id) goes to diffusers unchecked.
        """
        folder = os.fspath(pretrained_model_name_or_path)
        if kwargs.get("subfolder"):
            folder = os.path.join(folder, kwargs["subfolder"])
        if os.path.isdir(folder):
            check_joint_uvit_weights(folder, variant=kwargs.get("variant"),
                                     use_safetensors=kwargs.get("use_safetensors"))
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)


def _weights_file(folder: str, variant: str | None, use_safetensors: bool | None) -> str:
    """The weights file diffusers would load from ``folder`` (safetensors first, then .bin)."""
    stem = WEIGHTS_NAME if not variant else f"{WEIGHTS_NAME}.{variant}"
    candidates = []
    if use_safetensors is not False:
        candidates += [f"{stem}.safetensors", f"{stem}.safetensors.index.json"]
    if use_safetensors is not True:
        candidates += [f"{stem}.bin", f"{stem}.bin.index.json"]
    for name in candidates:
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            return path
    raise ValueError(f"{folder}: no weights file (looked for {', '.join(candidates)})")


def _read_shapes(path: str) -> dict[str, tuple[int, ...]]:
    """Key -> shape of a weights file, reading only the safetensors header / loading .bin on `meta`."""
    if path.endswith(".index.json"):
        try:
            with open(path, encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{path}: unreadable shard index ({e})") from e
        shapes = {}
        folder = os.path.dirname(path)
        for shard in dict.fromkeys(weight_map.values()):
            shapes.update(_read_shapes(os.path.join(folder, shard)))
        return shapes
    if path.endswith(".safetensors"):
        try:
            with safetensors.safe_open(path, framework="pt") as f:
                return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        except Exception as e:  # safetensors raises its own error types for a bad header
            raise ValueError(f"{path}: unreadable safetensors file ({e})") from e
    try:
        state = torch.load(path, map_location="meta", weights_only=True)
    except Exception as e:  # pickled modules / optimiser objects are refused by weights_only
        raise ValueError(f"{path}: cannot be read with torch.load(weights_only=True) ({e}); "
                         "only plain tensor dicts are accepted") from e
    if not isinstance(state, dict) or not all(isinstance(k, str) and torch.is_tensor(v)
                                              for k, v in state.items()):
        raise ValueError(f"{path}: not a plain dict of tensors; {_NOT_OURS}")
    return {k: tuple(v.shape) for k, v in state.items()}


def check_joint_uvit_weights(folder_or_file, variant: str | None = None,
                             use_safetensors: bool | None = None) -> dict:
    """Check that a weights folder (or file) matches the JoDiffusion U-ViT its ``config.json`` describes.

    Compares key names and shapes only: the safetensors header is read, the model is built on the
    ``meta`` device, no weights are loaded. Raises ValueError naming the first missing key,
    unexpected key or shape mismatch and how many others differ. Returns the config dict.
    """
    path = os.fspath(folder_or_file)
    if os.path.isdir(path):
        folder, weights = path, _weights_file(path, variant, use_safetensors)
    elif os.path.isfile(path):
        folder, weights = os.path.dirname(path) or ".", path
    else:
        raise ValueError(f"{path}: no such folder or file")

    config_path = os.path.join(folder, "config.json")
    try:
        with open(config_path, encoding="utf-8") as f:
            config = json.load(f)
    except OSError as e:
        raise ValueError(f"{config_path}: missing or unreadable ({e})") from e
    except ValueError as e:
        raise ValueError(f"{config_path}: not valid JSON ({e})") from e
    if not isinstance(config, dict):
        raise ValueError(f"{config_path}: not a JSON object")

    with torch.device("meta"):
        try:
            model = JoDiffusionUViT.from_config(config)
        except (TypeError, ValueError, AssertionError, ZeroDivisionError) as e:
            raise ValueError(f"{config_path}: does not describe a JoDiffusion U-ViT ({e})") from e
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    found = _read_shapes(weights)

    problems = []
    for key, shape in expected.items():
        if key not in found:
            problems.append(f"key '{key}' is missing")
        elif found[key] != shape:
            problems.append(f"key '{key}' has shape {list(found[key])} but {config_path} "
                            f"implies {list(shape)}")
    problems += [f"key '{key}' is unexpected" for key in found if key not in expected]
    if problems:
        more = len(problems) - 1
        tail = f" (and {more} more key{'s differ' if more > 1 else ' differs'})" if more else ""
        raise ValueError(f"{weights}: {problems[0]}{tail}; {_NOT_OURS}")
    return config
