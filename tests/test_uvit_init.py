"""Step 0 of the authors' U-ViT from a (tiny) UniDiffuser-v1 folder: every weight comes from
UniDiffuser, the label stream starts as the image stream, and the written folder is a pipeline
that checks, loads and generates; bad inputs are one-line errors naming the part."""
import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from diffusers.pipelines.deprecated.unidiffuser.modeling_text_decoder import UniDiffuserTextDecoder
from diffusers.pipelines.deprecated.unidiffuser.modeling_uvit import UniDiffuserModel

from dataset import get_dataset_info
from inference.uvit_init import main as uvit_init_main
from models.joint_uvit import PAPER_UVIT_CONFIG, JoDiffusionUViT
from models.label_vae import LabelVAE
from models.pipelines import check_pipeline, load_pipeline
from models.uvit_init import uvit_config_from_unidiffuser, uvit_from_unidiffuser, write_uvit_pipeline_folder
from tests.fixtures_authors_label_vae import write_authors_label_vae_folder
from tests.fixtures_unidiffuser import CLIP_TEXT_WIDTH, TINY_UNIDIFFUSER_CONFIG, write_tiny_unidiffuser_folder
from tests.fixtures_uvit import authors_key_shapes
from utils.precision import cpu_generators

NUM_LABELS = 6  # the toy dataset's label VAE


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    root = tmp_path_factory.mktemp("uvit_init")
    unidiffuser = write_tiny_unidiffuser_folder(root / "unidiffuser")
    write_authors_label_vae_folder(root / "run" / "label_vae", out_channels=NUM_LABELS, in_channels=3)
    return root, unidiffuser, root / "run"


@pytest.fixture(scope="module")
def sources(parts):
    _, unidiffuser, _ = parts
    unet = UniDiffuserModel.from_pretrained(unidiffuser / "unet")
    text_decoder = UniDiffuserTextDecoder.from_pretrained(unidiffuser / "text_decoder")
    return unet, text_decoder


@pytest.fixture(scope="module")
def model(sources):
    return uvit_from_unidiffuser(*sources)


@pytest.fixture(scope="module")
def folder(parts):
    root, unidiffuser, label_run = parts
    return write_uvit_pipeline_folder(unidiffuser, label_run, root / "uvit_init")


def expected_weights(unet, text_decoder) -> dict:
    """Each JoDiffusion U-ViT tensor's source, family by family (METHOD.md §8)."""
    uni = unet.state_dict()
    n = (unet.config.sample_size // unet.config.patch_size) ** 2
    shared = {k: v for k, v in uni.items() if k != "pos_embed"}
    text = {"pre_text.weight": text_decoder.encode_prefix.weight, "pre_text.bias": text_decoder.encode_prefix.bias,
            "post_text.weight": text_decoder.decode_prefix.weight, "post_text.bias": text_decoder.decode_prefix.bias}
    label = {"vae_label_in.proj.weight": uni["vae_img_in.proj.weight"],
             "vae_label_in.proj.bias": uni["vae_img_in.proj.bias"],
             "label_out.weight": uni["vae_img_out.weight"], "label_out.bias": uni["vae_img_out.bias"]}
    pos = {"pos_embed": torch.cat([uni["pos_embed"], uni["pos_embed"][:, -n:]], dim=1)}
    return {"shared": shared, "text": text, "label": label, "pos": pos}


def test_config_carries_unidiffuser_settings_and_the_text_widths(sources, model):
    unet, _ = sources
    cfg = model.config
    assert cfg.inner_text_dim == TINY_UNIDIFFUSER_CONFIG["text_dim"] and cfg.text_dim == CLIP_TEXT_WIDTH
    for key, value in TINY_UNIDIFFUSER_CONFIG.items():
        if key != "text_dim":
            assert cfg[key] == value, key


@pytest.mark.parametrize("family", ["shared", "text", "label", "pos"])
def test_every_tensor_of_a_family_equals_its_source(sources, model, family):
    ours = model.state_dict()
    for key, source in expected_weights(*sources)[family].items():
        assert torch.equal(ours[key], source), key


def test_no_parameter_is_left_at_its_random_init(sources, model):
    families = expected_weights(*sources)
    covered = {key for family in families.values() for key in family}
    assert covered == set(model.state_dict())  # every tensor has a UniDiffuser source
    torch.manual_seed(1234)
    fresh = JoDiffusionUViT.from_config(model.config).state_dict()
    for key, value in model.state_dict().items():
        assert not torch.equal(value, fresh[key]), key


def test_pos_embed_rows_are_unidiffusers_then_its_image_rows(sources, model):
    unet, _ = sources
    n, uni_rows = model.num_patches, unet.pos_embed.shape[1]
    assert model.pos_embed.shape[1] == uni_rows + n
    torch.testing.assert_close(model.pos_embed[:, :uni_rows], unet.pos_embed, rtol=0, atol=0)
    torch.testing.assert_close(model.pos_embed[:, -n:], unet.pos_embed[:, -n:], rtol=0, atol=0)


def test_label_tensors_are_copies_not_shared_storage(model):
    assert model.vae_label_in.proj.weight.data_ptr() != model.vae_img_in.proj.weight.data_ptr()
    assert model.label_out.weight.data_ptr() != model.vae_img_out.weight.data_ptr()


@torch.no_grad()
def test_label_prediction_equals_image_prediction_at_step_0(model):
    cfg, g = model.config, torch.Generator().manual_seed(0)
    latent = torch.randn(2, cfg.in_channels, cfg.sample_size, cfg.sample_size, generator=g)
    text = torch.randn(2, cfg.num_text_tokens, cfg.text_dim, generator=g)
    clip = torch.randn(2, 1, cfg.clip_img_dim, generator=g)
    _, image_out, _, label_out = model(text, latent, clip, latent.clone(), timestep_img=500, timestep_text=0)
    torch.testing.assert_close(label_out, image_out, rtol=1e-5, atol=1e-6)
    other = torch.randn(latent.shape, generator=g)
    _, image_out2, _, label_out2 = model(text, latent, clip, other, timestep_img=500, timestep_text=0)
    assert not torch.allclose(label_out2, image_out2, atol=1e-3)  # the two streams are still two


def test_text_stream_is_unidiffusers_caption_bottleneck(sources, model):
    unet, text_decoder = sources
    clip_text = torch.randn(1, model.config.num_text_tokens, model.config.text_dim)
    torch.testing.assert_close(model.text_in(model.pre_text(clip_text)),
                               unet.text_in(text_decoder.encode_prefix(clip_text)))


def test_written_folder_is_a_pipeline_that_generates(folder):
    assert check_pipeline(str(folder), get_dataset_info("toy")) == "uvit"
    index = json.loads((folder / "model_index.json").read_text())
    assert index["unet"] == ["models.joint_uvit", "JoDiffusionUViT"]
    assert list((folder / "unet").glob("*.safetensors")) and not list(folder.rglob("*.bin"))
    pipe = load_pipeline(str(folder), torch.float32, "cpu")
    out = pipe(["a photo of circle", "star and ring"], num_inference_steps=2, generator=cpu_generators([0, 1]))
    assert out.images.shape == (2, 16, 16, 3) and out.images.dtype == np.uint8
    assert out.masks.shape == (2, 16, 16) and np.isin(out.masks, list(range(NUM_LABELS)) + [255]).all()


def test_written_unet_holds_the_step_0_weights(folder, model):
    loaded = JoDiffusionUViT.from_pretrained(folder / "unet")
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_bin_components_become_safetensors_and_foreign_formats_are_left_out(parts, tmp_path):
    _, unidiffuser, label_run = parts
    source = shutil.copytree(unidiffuser, tmp_path / "unidiffuser")
    weights = source / "text_encoder" / "model.safetensors"
    torch.save(load_file(weights), source / "text_encoder" / "pytorch_model.bin")  # as an older hub folder
    weights.unlink()
    (source / "image_encoder" / "flax_model.msgpack").write_bytes(b"not for us")
    (source / "image_encoder" / "pytorch_model.bin").write_bytes(b"the same weights again")
    out = write_uvit_pipeline_folder(source, label_run, tmp_path / "out")
    assert sorted(p.name for p in (out / "text_encoder").iterdir()) == ["config.json", "model.safetensors"]
    assert sorted(p.name for p in (out / "image_encoder").iterdir()) == ["config.json", "model.safetensors"]
    assert load_file(out / "text_encoder" / "model.safetensors").keys() == load_file(
        unidiffuser / "text_encoder" / "model.safetensors").keys()


def test_missing_text_decoder_is_named(parts, tmp_path):
    _, unidiffuser, label_run = parts
    broken = shutil.copytree(unidiffuser, tmp_path / "unidiffuser")
    shutil.rmtree(broken / "text_decoder")
    with pytest.raises(ValueError, match="text_decoder") as err:
        write_uvit_pipeline_folder(broken, label_run, tmp_path / "out")
    assert "\n" not in str(err.value) and not (tmp_path / "out").exists()


def test_label_vae_at_another_factor_is_named(parts, tmp_path):
    _, unidiffuser, _ = parts
    LabelVAE(num_labels=NUM_LABELS, encoder_channels=(8, 8, 8), decoder_channels=(8, 8, 8),
             norm_num_groups=8).save_pretrained(str(tmp_path / "label_vae"))  # factor 4, the image VAE 2
    with pytest.raises(ValueError, match=r"label VAE downsamples by 4 .* image VAE .* by 2") as err:
        write_uvit_pipeline_folder(unidiffuser, tmp_path / "label_vae", tmp_path / "out")
    assert str(tmp_path / "label_vae") in str(err.value) and "\n" not in str(err.value)


def test_label_vae_with_other_latent_channels_is_named(parts, tmp_path):
    _, unidiffuser, _ = parts
    LabelVAE(num_labels=NUM_LABELS, latent_channels=8, encoder_channels=(8, 8), decoder_channels=(8, 8),
             norm_num_groups=8).save_pretrained(str(tmp_path / "label_vae"))
    with pytest.raises(ValueError, match="8 latent channels .* takes 4"):
        write_uvit_pipeline_folder(unidiffuser, tmp_path / "label_vae", tmp_path / "out")


@pytest.mark.parametrize("key, value", [("use_data_type_embedding", False), ("patch_size", 4),
                                        ("pre_layer_norm", True), ("out_channels", 8), ("no_such_setting", 1)])
def test_a_unidiffuser_config_that_does_not_fit_names_the_key(key, value):
    config = dict(TINY_UNIDIFFUSER_CONFIG, _class_name="UniDiffuserModel", **{key: value})
    with pytest.raises(ValueError, match=f"'{key}'") as err:
        uvit_config_from_unidiffuser(config, CLIP_TEXT_WIDTH)
    assert "\n" not in str(err.value)


def test_a_misfit_unet_config_fails_before_any_weight_is_loaded(parts, tmp_path, monkeypatch):
    _, unidiffuser, label_run = parts
    broken = shutil.copytree(unidiffuser, tmp_path / "unidiffuser")
    config = json.loads((broken / "unet" / "config.json").read_text())
    (broken / "unet" / "config.json").write_text(json.dumps(dict(config, patch_size=4)))

    def no_loading(*args, **kwargs):
        raise AssertionError("the 0.95B U-ViT was loaded before its config was checked")

    monkeypatch.setattr(UniDiffuserModel, "from_pretrained", no_loading)
    with pytest.raises(ValueError, match="'patch_size' is 4"):
        write_uvit_pipeline_folder(broken, label_run, tmp_path / "out")


def test_entry_point_writes_the_folder(parts, tmp_path, capsys):
    _, unidiffuser, label_run = parts
    out = uvit_init_main(["--unidiffuser", str(unidiffuser), "--label_vae", str(label_run),
                          "--output_dir", str(tmp_path / "uvit_init"), "--verify", "true"])
    assert out == tmp_path / "uvit_init" and check_pipeline(str(out), get_dataset_info("toy")) == "uvit"
    assert "loads as a pipeline" in capsys.readouterr().out


def test_entry_point_bad_input_is_one_line(parts, tmp_path, capsys):
    _, unidiffuser, _ = parts
    with pytest.raises(SystemExit):
        uvit_init_main(["--unidiffuser", str(unidiffuser), "--label_vae", str(tmp_path / "nothing"),
                        "--output_dir", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "nothing" in err and "\n" not in err


def test_unidiffuser_v1_at_full_size_gives_the_authors_layout():
    """UniDiffuser-v1's own config (text_dim 64) and caption decoder (768 -> 64 -> 768), built on
    `meta`: the result has exactly the key names and shapes of the authors' released model."""
    v1 = {k: v for k, v in PAPER_UVIT_CONFIG.items() if k not in ("text_dim", "inner_text_dim")}
    with torch.device("meta"):
        unet = UniDiffuserModel(**v1, text_dim=64)
        text_decoder = UniDiffuserTextDecoder(prefix_length=77, prefix_inner_dim=768, prefix_hidden_dim=64,
                                              n_layer=1)
    model = uvit_from_unidiffuser(unet, text_decoder)
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == authors_key_shapes(PAPER_UVIT_CONFIG)
    assert model.pos_embed.shape == (1, 2128, 1536) and model.config.text_dim == 768


def test_entry_point_names_a_source_that_is_neither_folder_nor_hub_id(tmp_path, capsys):
    with pytest.raises(SystemExit):
        uvit_init_main(["--unidiffuser", str(tmp_path / "no" / "such"), "--label_vae", str(tmp_path),
                        "--output_dir", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert "no such folder, and not a hub id" in err and "\n" not in err
