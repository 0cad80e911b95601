"""The authors' U-ViT (models/joint_uvit.py): layout vs METHOD.md §8, loading their folders, token order."""
import inspect
import json
import math
import os

import pytest
import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from diffusers.pipelines.deprecated.unidiffuser.modeling_uvit import UniDiffuserModel
from safetensors.torch import load_file

from models.joint_uvit import PAPER_UVIT_CONFIG, JoDiffusionUViT, check_joint_uvit_weights, num_tokens
from tests.fixtures_uvit import (TINY_UVIT_CONFIG, authors_key_shapes, write_authors_unet_folder,
                                 write_config, write_weights)

T = TINY_UVIT_CONFIG["num_text_tokens"]
N = (TINY_UVIT_CONFIG["sample_size"] // TINY_UVIT_CONFIG["patch_size"]) ** 2  # patches per latent
P = TINY_UVIT_CONFIG["patch_size"]
C = TINY_UVIT_CONFIG["out_channels"]


def tiny_model(seed=0, **overrides):
    torch.manual_seed(seed)
    return JoDiffusionUViT(**{**TINY_UVIT_CONFIG, **overrides}).eval()


def tiny_inputs(batch=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    cfg = TINY_UVIT_CONFIG
    side = cfg["sample_size"]
    return dict(
        prompt_embeds=torch.randn(batch, T, cfg["text_dim"], generator=g),
        image_latents=torch.randn(batch, cfg["in_channels"], side, side, generator=g),
        image_embeds=torch.randn(batch, 1, cfg["clip_img_dim"], generator=g),
        label_latents=torch.randn(batch, cfg["in_channels"], side, side, generator=g),
    )


def transformer_input(model, inputs, **kwargs):
    """The token sequence the U-ViT body receives."""
    seen = {}

    def grab(module, args, kwargs):
        seen["x"] = args[0] if args else kwargs["hidden_states"]

    handle = model.transformer.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            model(**inputs, **kwargs)
    finally:
        handle.remove()
    return seen["x"]


# ---------------------------------------------------------------- the real configuration, on `meta`

def paper_parameter_count_by_hand():
    """Sum over the modules §8 lists, from their documented shapes."""
    d, text, inner_text, clip, t, p, c = 1536, 768, 64, 512, 77, 2, 4
    n = (64 // p) ** 2
    linear = lambda i, o: i * o + o  # noqa: E731
    block = 3 * d * d + linear(d, d) + 2 * (2 * d) + linear(d, 4 * d) + linear(4 * d, d)  # attn, norm1/3, ff
    patch_embed = c * d * p * p + d
    return (linear(text, inner_text) + linear(inner_text, d) + 2 * patch_embed + linear(clip, d)
            + (2 + t + 1 + 2 * n) * d + 2 * d + d  # pos_embed, data-type embedding and its position
            + 31 * block + 15 * (linear(2 * d, d) + 2 * d) + 2 * d + patch_embed  # body: blocks, skips, norm_out
            + linear(d, inner_text) + linear(inner_text, text) + 2 * linear(d, p * p * c) + linear(d, clip))


def test_real_config_size_and_token_count():
    with torch.device("meta"):
        model = JoDiffusionUViT(**PAPER_UVIT_CONFIG)
    count = sum(p.numel() for p in model.parameters())
    assert count == paper_parameter_count_by_hand()
    assert 0.94e9 < count < 0.96e9  # "~0.95B parameters"
    assert num_tokens(PAPER_UVIT_CONFIG) == 3 + 77 + 1 + 1024 + 1024 == model.num_tokens
    assert tuple(model.pos_embed.shape) == (1, 2128, 1536)


def test_real_config_keys_are_exactly_the_authors_layout():
    with torch.device("meta"):
        model = JoDiffusionUViT()  # the defaults are the paper's configuration
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert ours == authors_key_shapes(PAPER_UVIT_CONFIG)

    families = ["pre_text.", "text_in.", "vae_img_in.proj.", "clip_img_in.", "vae_label_in.proj.", "pos_embed",
                "data_type_token_embedding.", "data_type_pos_embed_token", "transformer.transformer_in_blocks.",
                "transformer.transformer_mid_block.", "transformer.transformer_out_blocks.",
                "transformer.norm_out.", "transformer.pos_embed.proj.", "text_out.", "post_text.",
                "vae_img_out.", "clip_img_out.", "label_out."]
    for family in families:
        assert any(k.startswith(family) for k in ours), family
    assert all(any(k.startswith(f) for f in families) for k in ours)
    blocks = {int(k.split(".")[2]) for k in ours if k.startswith("transformer.transformer_in_blocks.")}
    assert blocks == set(range(15))
    out_parts = {k.split(".")[3] for k in ours if k.startswith("transformer.transformer_out_blocks.")}
    assert out_parts == {"skip", "block"}
    assert ours["transformer.transformer_in_blocks.0.attn1.to_q.weight"] == (1536, 1536)
    assert "transformer.transformer_in_blocks.0.attn1.to_q.bias" not in ours
    assert ours["vae_img_out.weight"] == ours["label_out.weight"] == (16, 1536)


def test_config_keys_are_unidiffusers_plus_inner_text_dim():
    with torch.device("meta"):
        model = JoDiffusionUViT()
    uni_keys = set(inspect.signature(UniDiffuserModel.__init__).parameters) - {"self"}
    ours = {k for k in model.config if not k.startswith("_")}
    assert ours == uni_keys | {"inner_text_dim"}
    assert {k: model.config[k] for k in PAPER_UVIT_CONFIG} == PAPER_UVIT_CONFIG
    assert set(PAPER_UVIT_CONFIG) == ours


# ---------------------------------------------------------------- loading the authors' folders

@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_authors_folder_loads_every_tensor(tmp_path, fmt):
    written = write_authors_unet_folder(tmp_path / "unet", seed=3, fmt=fmt)
    model, info = JoDiffusionUViT.from_pretrained(tmp_path / "unet", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    loaded = model.state_dict()
    assert set(loaded) == set(written)
    for key, tensor in written.items():
        assert torch.equal(loaded[key], tensor), key
    assert model.config.inner_text_dim == TINY_UVIT_CONFIG["inner_text_dim"]


def test_authors_folder_loads_from_subfolder(tmp_path):
    written = write_authors_unet_folder(tmp_path / "unet", seed=4)
    model = JoDiffusionUViT.from_pretrained(tmp_path, subfolder="unet")
    assert torch.equal(model.label_out.weight, written["label_out.weight"])


def _rewrite(folder, edit, fmt="safetensors"):
    path = os.path.join(folder, "diffusion_pytorch_model.safetensors")
    state = load_file(path)
    edit(state)
    write_weights(folder, state, fmt)


def test_renamed_key_is_named(tmp_path):
    folder = tmp_path / "unet"
    write_authors_unet_folder(folder)
    _rewrite(folder, lambda s: s.__setitem__("label_head.weight", s.pop("label_out.weight")))
    with pytest.raises(ValueError, match=r"'label_out\.weight' is missing \(and 1 more key differs\)"):
        JoDiffusionUViT.from_pretrained(folder)
    with pytest.raises(ValueError, match="diffusion_pytorch_model.safetensors"):
        check_joint_uvit_weights(folder)


def test_wrong_shape_is_named(tmp_path):
    folder = tmp_path / "unet"
    write_authors_unet_folder(folder)
    _rewrite(folder, lambda s: s.__setitem__("vae_label_in.proj.weight", torch.zeros(16, 4, 1, 1)))
    with pytest.raises(ValueError, match=r"'vae_label_in\.proj\.weight' has shape \[16, 4, 1, 1\]"):
        JoDiffusionUViT.from_pretrained(folder)


def test_unidiffuser_folder_is_refused_with_a_count(tmp_path):
    """A plain UniDiffuser U-ViT lacks the label stream and the text bottleneck."""
    folder = tmp_path / "unet"
    write_authors_unet_folder(folder)
    _rewrite(folder, lambda s: [s.pop(k) for k in ("pre_text.weight", "label_out.bias", "label_out.weight")])
    with pytest.raises(ValueError, match=r"is missing \(and 2 more keys differ\); this is not a JoDiffusion"):
        check_joint_uvit_weights(folder)


def test_bin_that_is_not_a_plain_tensor_dict_is_refused(tmp_path):
    folder = tmp_path / "unet"
    write_config(folder)
    torch.save({"state_dict": {"a": torch.zeros(1)}}, folder / "diffusion_pytorch_model.bin")
    with pytest.raises(ValueError, match="not a plain dict of tensors"):
        JoDiffusionUViT.from_pretrained(folder)


def test_config_of_another_size_is_refused(tmp_path):
    folder = tmp_path / "unet"
    write_authors_unet_folder(folder)
    write_config(folder, {**TINY_UVIT_CONFIG, "num_layers": 5})  # weights hold 3 layers
    with pytest.raises(ValueError, match=r"'transformer\.transformer_in_blocks\.1\..*' is missing"):
        check_joint_uvit_weights(folder / "diffusion_pytorch_model.safetensors")


def test_save_pretrained_round_trip(tmp_path):
    model = tiny_model(seed=5)
    model.save_pretrained(tmp_path / "saved")
    assert (tmp_path / "saved" / "diffusion_pytorch_model.safetensors").is_file()
    config = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert config["_class_name"] == "JoDiffusionUViT" and config["inner_text_dim"] == 8
    check_joint_uvit_weights(tmp_path / "saved")
    loaded = JoDiffusionUViT.from_pretrained(tmp_path / "saved").eval()
    inputs = tiny_inputs()
    with torch.no_grad():
        for a, b in zip(model(**inputs, timestep_img=10, timestep_text=0),
                        loaded(**inputs, timestep_img=10, timestep_text=0)):
            assert torch.equal(a, b)


# ---------------------------------------------------------------- forward

def test_forward_shapes_and_finite():
    model = tiny_model()
    inputs = tiny_inputs(batch=3)
    with torch.no_grad():
        text, image, clip, label = model(**inputs, timestep_img=500, timestep_text=0)
    assert text.shape == (3, T, TINY_UVIT_CONFIG["text_dim"])
    assert image.shape == label.shape == (3, C, 8, 8)
    assert clip.shape == (3, 1, TINY_UVIT_CONFIG["clip_img_dim"])
    assert all(torch.isfinite(x).all() for x in (text, image, clip, label))
    processors = {type(m.processor) for m in model.modules() if isinstance(m, Attention)}
    assert processors == {AttnProcessor2_0}  # SDPA


def test_timestep_forms_agree():
    model = tiny_model()
    inputs = tiny_inputs(batch=2)
    with torch.no_grad():
        as_int = model(**inputs, timestep_img=250, timestep_text=999)
        as_vector = model(**inputs, timestep_img=torch.tensor([250, 250]), timestep_text=torch.tensor([999, 999]))
        as_scalar = model(**inputs, timestep_img=torch.tensor(250), timestep_text=torch.tensor(999))
        per_sample = model(**inputs, timestep_img=torch.tensor([250, 7]), timestep_text=999)
    for a, b, c in zip(as_int, as_vector, as_scalar):
        assert torch.equal(a, b) and torch.equal(a, c)
    assert torch.allclose(per_sample[1][0], as_int[1][0], atol=1e-6)
    assert not torch.allclose(per_sample[1][1], as_int[1][1])


def test_bad_input_shape_is_a_value_error():
    model = tiny_model()
    inputs = tiny_inputs()
    inputs["label_latents"] = inputs["label_latents"][:, :, :4]
    with pytest.raises(ValueError, match="label_latents has shape"):
        model(**inputs, timestep_img=1, timestep_text=1)


def test_bfloat16_model_runs():
    model = tiny_model().to(torch.bfloat16)
    inputs = {k: v.to(torch.bfloat16) for k, v in tiny_inputs().items()}
    with torch.no_grad():
        outputs = model(**inputs, timestep_img=999, timestep_text=0)
    assert all(x.dtype == torch.bfloat16 and torch.isfinite(x).all() for x in outputs)


def _sinusoid(t, dim):
    """The raw timestep token: [cos | sin] of t * 10000^(-i/half) (flip_sin_to_cos, shift 0)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / half)
    angles = float(t) * freqs
    return torch.cat([torch.cos(angles), torch.sin(angles)])


def _patch_tokens(conv, latent):
    """Row-major patches through the patch-embedding conv, computed patch by patch."""
    rows = []
    side = latent.shape[-1] // P
    for i in range(side):
        for j in range(side):
            patch = latent[:, i * P:(i + 1) * P, j * P:(j + 1) * P]
            rows.append(torch.einsum("ocpq,cpq->o", conv.weight, patch) + conv.bias)
    return torch.stack(rows)


def test_token_order_and_position_rows():
    model = tiny_model(seed=7)
    inputs = tiny_inputs(batch=1)
    x = transformer_input(model, inputs, timestep_img=321, timestep_text=45, data_type=1)[0]
    pos = model.pos_embed[0].detach()
    d = model.inner_dim
    assert x.shape == (3 + T + 1 + 2 * N, d) and pos.shape[0] == x.shape[0] - 1
    with torch.no_grad():
        expected_text = model.text_in(model.pre_text(inputs["prompt_embeds"][0]))
        expected_clip = model.clip_img_in(inputs["image_embeds"][0])
        image = _patch_tokens(model.vae_img_in.proj, inputs["image_latents"][0])
        label = _patch_tokens(model.vae_label_in.proj, inputs["label_latents"][0])
        data_type = model.data_type_token_embedding.weight[1] + model.data_type_pos_embed_token[0, 0]
    tol = dict(atol=1e-5, rtol=1e-5)
    assert torch.allclose(x[0], _sinusoid(321, d) + pos[0], **tol)
    assert torch.allclose(x[1], _sinusoid(45, d) + pos[1], **tol)
    assert torch.allclose(x[2], data_type, **tol)
    assert torch.allclose(x[3:3 + T], expected_text + pos[2:2 + T], **tol)
    assert torch.allclose(x[3 + T], expected_clip[0] + pos[2 + T], **tol)
    first_image = 3 + T + 1
    assert torch.allclose(x[first_image:first_image + N], image + pos[2 + T + 1:2 + T + 1 + N], **tol)
    assert torch.allclose(x[first_image + N:], label + pos[-N:], **tol)


def test_label_latent_moves_only_label_tokens_at_the_input():
    model = tiny_model()
    inputs = tiny_inputs(batch=1)
    before = transformer_input(model, inputs, timestep_img=3, timestep_text=3)
    inputs["label_latents"] = inputs["label_latents"] + 1.0
    after = transformer_input(model, inputs, timestep_img=3, timestep_text=3)
    changed = (before != after).any(-1)[0].nonzero().flatten().tolist()
    assert changed == list(range(3 + T + 1 + N, 3 + T + 1 + 2 * N))


def test_data_type_changes_only_token_two():
    model = tiny_model()
    inputs = tiny_inputs(batch=2)
    one = transformer_input(model, inputs, timestep_img=9, timestep_text=9, data_type=1)
    zero = transformer_input(model, inputs, timestep_img=9, timestep_text=9, data_type=torch.tensor([0, 0]))
    changed = (one != zero).any(-1).any(0).nonzero().flatten().tolist()
    assert changed == [2]
    emb = model.data_type_token_embedding.weight.detach()
    assert torch.allclose(one[:, 2] - zero[:, 2], (emb[1] - emb[0]).expand(2, -1), atol=1e-6)


def test_unpatchify_order():
    """Patch token (h, w) with channels ordered (p, q, c) lands at pixel (h*P + p, w*P + q) of channel c."""
    model = tiny_model(seed=2)
    heads = {}
    for name in ("vae_img_out", "label_out"):
        getattr(model, name).register_forward_hook(lambda m, a, out, name=name: heads.__setitem__(name, out))
    with torch.no_grad():
        _, image, _, label = model(**tiny_inputs(batch=2), timestep_img=100, timestep_text=0)
    side = TINY_UVIT_CONFIG["sample_size"] // P
    for tokens, out in ((heads["vae_img_out"], image), (heads["label_out"], label)):
        expected = torch.empty_like(out)
        for n in range(out.shape[0]):
            for h in range(side):
                for w in range(side):
                    for p in range(P):
                        for q in range(P):
                            for c in range(C):
                                expected[n, c, h * P + p, w * P + q] = tokens[n, h * side + w, (p * P + q) * C + c]
        assert torch.equal(out, expected)


def test_without_data_type_embedding():
    model = tiny_model(use_data_type_embedding=False)
    assert not any(k.startswith("data_type") for k in model.state_dict())
    assert model.pos_embed.shape[1] == 2 + T + 1 + 2 * N
    with torch.no_grad():
        outputs = model(**tiny_inputs(), timestep_img=5, timestep_text=5)
    assert outputs[3].shape == (2, C, 8, 8)
