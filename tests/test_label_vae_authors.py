"""The authors' label VAE (their LightweightLabelVAE folders) loads beside ours and speaks our labels.

Checked against an independent description of their checkpoint (tests/fixtures_authors_label_vae.py)
and a plain-torch reimplementation of their decoder and encoder written here.
"""
import json

import pytest
import torch
import torch.nn.functional as F

from dataset import get_dataset_info
from models.label_vae import (AuthorsLabelVAE, check_label_vae_dataset, decode_latents_to_masks, encode_masks,
                              label_vae_num_labels, load_label_vae)
from tests.fixtures_authors_label_vae import write_authors_label_vae_folder

VOC_LIKE = dict(out_channels=21, in_channels=5)  # their 0 = our background: offset 0
ADE_LIKE = dict(out_channels=7, in_channels=3)  # tiny stand-in for a label space without their class 0


def their_decoder(sd: dict, cfg: dict, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Their decoder and decode rule in plain ops: (argmax classes, max-softmax confidence)."""
    h = F.conv2d(z, sd["decoder.0.weight"], sd["decoder.0.bias"], padding=1)
    for j in range(cfg["num_upscalers"]):
        t, n = 2 + 3 * j, 3 + 3 * j
        h = F.conv_transpose2d(h, sd[f"decoder.{t}.weight"], sd[f"decoder.{t}.bias"], stride=2)
        mean = h.mean(1, keepdim=True)
        var = (h - mean).pow(2).mean(1, keepdim=True)
        h = (h - mean) / torch.sqrt(var + 1e-6)
        h = F.silu(sd[f"decoder.{n}.weight"][:, None, None] * h + sd[f"decoder.{n}.bias"][:, None, None])
    k = 2 + 3 * cfg["num_upscalers"]
    h = F.silu(F.group_norm(h, cfg["norm_num_groups"], sd[f"decoder.{k}.weight"], sd[f"decoder.{k}.bias"]))
    logits = F.conv2d(h, sd[f"decoder.{k + 2}.weight"], sd[f"decoder.{k + 2}.bias"], padding=1)
    return logits.argmax(1), logits.softmax(1).max(1).values


def their_encoder_mean(sd: dict, cfg: dict, x: torch.Tensor) -> torch.Tensor:
    """Their encoder in plain ops: the posterior mean (first half of the moments)."""
    h = F.silu(F.conv2d(x, sd["encoder.0.weight"], sd["encoder.0.bias"], padding=1))
    stages = len(cfg["block_out_channels"]) - 1
    for i in range(stages):
        h = F.conv2d(h, sd[f"encoder.{2 + 3 * i}.weight"], sd[f"encoder.{2 + 3 * i}.bias"], padding=1)
        h = F.silu(F.conv2d(h, sd[f"encoder.{3 + 3 * i}.weight"], sd[f"encoder.{3 + 3 * i}.bias"], stride=2, padding=1))
    last = 2 + 3 * stages
    h = F.conv2d(h, sd[f"encoder.{last}.weight"], sd[f"encoder.{last}.bias"], padding=1)
    h = F.silu(F.group_norm(h, cfg["norm_num_groups"], sd[f"encoder.{last + 2}.weight"],
                            sd[f"encoder.{last + 2}.bias"], eps=1e-6))
    moments = F.conv2d(h, sd[f"encoder.{last + 4}.weight"], sd[f"encoder.{last + 4}.bias"], padding=1)
    return moments[:, : cfg["latent_channels"]]


def bits(value: int, n: int) -> list[float]:
    """Their bit input for one label value: bit i (LSB first) as -1/+1."""
    return [1.0 if (value >> i) & 1 else -1.0 for i in range(n)]


def test_their_folder_loads_with_every_key_and_value(tmp_path):
    cfg, state = write_authors_label_vae_folder(tmp_path / "label_vae", **VOC_LIKE)
    vae = load_label_vae(tmp_path)  # a run folder holding label_vae/ works as for ours
    assert isinstance(vae, AuthorsLabelVAE)
    loaded = vae.state_dict()
    assert set(loaded) == set(state), set(loaded) ^ set(state)
    assert all(torch.equal(loaded[k], state[k]) for k in state)
    as_lists = {k: (list(v) if isinstance(v, (list, tuple)) else v) for k, v in vae.config.items()}
    assert {k: v for k, v in as_lists.items() if not k.startswith("_")} == cfg  # exactly their keys
    assert (vae.num_labels, vae.num_bits, vae.ignore_index, vae.downsample_factor) == (21, 5, 255, 2)


def test_their_folder_is_recognised_by_its_keys_without_the_class_name(tmp_path):
    write_authors_label_vae_folder(tmp_path, **VOC_LIKE)
    config = json.loads((tmp_path / "config.json").read_text())
    del config["_class_name"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert isinstance(load_label_vae(tmp_path), AuthorsLabelVAE)


def test_saved_from_here_it_loads_back_the_same(tmp_path):
    write_authors_label_vae_folder(tmp_path / "theirs", **VOC_LIKE)
    vae = load_label_vae(tmp_path / "theirs")
    vae.save_pretrained(tmp_path / "ours")
    again = load_label_vae(tmp_path / "ours")
    assert isinstance(again, AuthorsLabelVAE)
    assert all(torch.equal(a, b) for a, b in zip(vae.state_dict().values(), again.state_dict().values()))


@pytest.mark.parametrize("offset", [0, 1])
def test_decode_matches_their_decoder_then_maps_to_our_labels(tmp_path, offset):
    cfg, state = write_authors_label_vae_folder(tmp_path, **(VOC_LIKE if offset == 0 else ADE_LIKE))
    vae = load_label_vae(tmp_path).eval()
    vae.label_offset = offset
    z = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(1)) * 3
    ref_classes, ref_conf = their_decoder(state, cfg, z)
    threshold = float(ref_conf.median())  # half the pixels on each side of the rule
    with torch.no_grad():
        masks, conf = decode_latents_to_masks(vae, z * cfg["scaling_factor"], threshold=threshold)
    assert masks.shape == conf.shape == (2, 32, 32)
    torch.testing.assert_close(conf, ref_conf, atol=1e-5, rtol=1e-5)
    confident = (ref_conf - threshold).abs() > 1e-4  # pixels whose side of the threshold is not a rounding matter

    if offset == 0:  # their class c = our label c
        expected = ref_classes.clone()
    else:  # their 0 ("other") -> our 255, their c -> our c - 1
        expected = torch.where(ref_classes == 0, torch.full_like(ref_classes, 255), ref_classes - 1)
    expected[ref_conf < threshold] = 255  # our low-confidence rule (theirs writes 0)
    assert torch.equal(masks[confident], expected[confident])
    # the cases the mapping is about all occur here
    assert ((ref_classes == 0) & (ref_conf >= threshold) & confident).any()
    assert ((ref_classes > 0) & (ref_conf >= threshold) & confident).any()
    assert (ref_conf < threshold).any()
    their_zero = (ref_classes == 0) & (ref_conf >= threshold) & confident
    assert (masks[their_zero] == (0 if offset == 0 else 255)).all()
    assert vae.num_labels == cfg["out_channels"] - offset


def test_encode_gives_their_bit_input_voc_like(tmp_path):
    cfg, state = write_authors_label_vae_folder(tmp_path, **VOC_LIKE)
    vae = load_label_vae(tmp_path).eval()
    mask = torch.tensor([[[0, 255, 1, 20], [7, 0, 255, 13]]]).repeat(1, 2, 1)  # 1 x 4 x 4
    x = vae.masks_to_bits(mask)
    assert x.shape == (1, 5, 4, 4)
    zero = [0.0] * 5
    assert x[0, :, 0, 0].tolist() == zero, "our background is their 0: the all-zero code"
    assert x[0, :, 0, 1].tolist() == zero, "our ignore is their 0: the all-zero code"
    for value, (r, c) in ((1, (0, 2)), (20, (0, 3)), (7, (1, 0)), (13, (1, 3))):
        assert x[0, :, r, c].tolist() == bits(value, 5)
    # encode_masks goes through that input and their encoder (posterior mean, scaled)
    with torch.no_grad():
        z = encode_masks(vae, mask)
    torch.testing.assert_close(z, their_encoder_mean(state, cfg, x) * cfg["scaling_factor"], atol=1e-5, rtol=1e-5)


def test_encode_gives_their_bit_input_ade_like(tmp_path):
    write_authors_label_vae_folder(tmp_path, out_channels=151, in_channels=8)
    vae = load_label_vae(tmp_path)
    vae.label_offset = 1  # our c = their c + 1, our 255 = their 0
    mask = torch.tensor([[[0, 255, 149, 41]]]).repeat(1, 2, 1)  # 1 x 2 x 4
    x = vae.masks_to_bits(mask)
    assert x[0, :, 0, 1].tolist() == [0.0] * 8
    for value, c in ((0, 0), (149, 2), (41, 3)):
        assert x[0, :, 0, c].tolist() == bits(value + 1, 8)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 150\)"):
        vae.masks_to_bits(torch.tensor([[[150, 0]]]))


def test_default_offset_fits_our_datasets_and_their_config_passes_the_dataset_check(tmp_path):
    for name, out_channels, in_channels in (("voc", 21, 5), ("coco", 81, 7), ("ade20k", 151, 8)):
        folder = tmp_path / name
        write_authors_label_vae_folder(folder, out_channels=out_channels, in_channels=in_channels)
        info = get_dataset_info(name)
        config = json.loads((folder / "config.json").read_text())
        assert label_vae_num_labels(config) == info.num_labels
        check_label_vae_dataset(label_vae_num_labels(config), info, folder)
        vae = load_label_vae(folder)
        assert vae.label_offset == 0 and vae.num_labels == info.num_labels
        assert label_vae_num_labels(vae.config) == info.num_labels
    with pytest.raises(ValueError, match="another dataset"):
        check_label_vae_dataset(label_vae_num_labels(config), get_dataset_info("voc"), folder)


def test_label_vae_num_labels_reads_ours_too_and_names_an_unknown_config():
    assert label_vae_num_labels({"_class_name": "LabelVAE", "num_labels": 6}) == 6
    with pytest.raises(ValueError, match="neither num_labels"):
        label_vae_num_labels({"_class_name": "AutoencoderKL", "out_channels": 3})


@pytest.mark.parametrize("key,value", [("num_mid_blocks", 1), ("num_latents", 1), ("num_upscalers", 2),
                                       ("upscale_channels", 10), ("out_channels", 40)])
def test_unsupported_config_values_name_the_key(key, value):
    kw = dict(in_channels=5, out_channels=21, block_out_channels=(8, 16), intermediate_channels=8,
              norm_num_groups=4, num_upscalers=1, upscale_channels=16)
    kw[key] = value
    with pytest.raises(ValueError, match=key):
        AuthorsLabelVAE(**kw)


def test_label_offset_must_be_0_or_1():
    vae = AuthorsLabelVAE(in_channels=3, out_channels=7, block_out_channels=(8, 16), intermediate_channels=8,
                          norm_num_groups=4, num_upscalers=1, upscale_channels=16, label_offset=1)
    assert vae.num_labels == 6 and "label_offset" not in vae.config
    with pytest.raises(ValueError, match="label_offset"):
        vae.label_offset = 2
