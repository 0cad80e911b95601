"""Label VAE: bit encoding, shapes at the paper's sizes, save/load, decode rule, training entry point."""
import json

import pytest
import torch
from safetensors.torch import load_file

from models.label_vae import (LabelAutoencoderKL, LabelVAE, bit_decode, bit_encode, bits_for_labels,
                              build_label_vae, decode_latents_to_masks, encode_masks, load_label_vae)
from utils.io import read_jsonl

TINY = dict(encoder_channels=(8, 16, 16), decoder_channels=(16, 16, 16), norm_num_groups=4)


@pytest.mark.parametrize("num_classes,bits", [(5, 3), (20, 5), (80, 7), (150, 8)])
def test_bit_encoding_round_trips_every_label_and_ignore(num_classes, bits):
    assert bits_for_labels(num_classes + 1) == bits
    labels = torch.tensor(list(range(num_classes + 1)) + [255])
    mask = labels.view(1, 1, -1).repeat(2, 3, 1)
    code = bit_encode(mask, bits)
    assert code.shape == (2, bits, 3, len(labels))
    assert set(code.unique().tolist()) <= {-1.0, 0.0, 1.0}
    assert (code[..., -1] == 0).all(), "ignore must be the all-zero code"
    assert (code[..., :-1] != 0).all(), "no class may produce a zero channel"
    assert torch.equal(bit_decode(code), mask)
    # every class has its own code
    assert len({tuple(c) for c in code[0, :, 0].T.tolist()}) == len(labels)


def test_bit_encode_rejects_labels_that_do_not_fit():
    with pytest.raises(ValueError, match="labels must lie"):
        bit_encode(torch.tensor([[[0, 8]]]), 3)


@pytest.mark.parametrize("num_classes", [150, 20, 80])
def test_paper_config_shapes_and_size(num_classes):
    with torch.device("meta"):
        vae = LabelVAE(num_labels=num_classes + 1)
        x = torch.empty(1, vae.config.num_bits, 512, 512)
        posterior = vae.encode(x).latent_dist
        logits = vae.decode(posterior.mode()).sample
    assert posterior.mode().shape == (1, 4, 64, 64)
    assert logits.shape == (1, num_classes + 1, 512, 512)
    n_params = sum(p.numel() for p in vae.parameters())
    assert 14e6 < n_params < 16.5e6, n_params  # "about 15M" (METHOD.md §2)
    assert vae.config.scaling_factor == 0.2


def test_autoencoder_kl_variant_shapes():
    with torch.device("meta"):
        akl = build_label_vae("autoencoder_kl", 151)
        z = akl.encode(torch.empty(1, 8, 512, 512)).latent_dist.mode()
        logits = akl.decode(z).sample
    assert isinstance(akl, LabelAutoencoderKL)
    assert z.shape == (1, 4, 64, 64) and logits.shape == (1, 151, 512, 512)
    assert akl.config.num_labels == 151 and akl.config.num_bits == 8


@pytest.mark.parametrize("model_type", ["label_vae", "autoencoder_kl"])
def test_save_load_gives_identical_outputs(tmp_path, model_type):
    kw = TINY if model_type == "label_vae" else dict(encoder_channels=(8, 16), norm_num_groups=4, sample_size=16)
    vae = build_label_vae(model_type, 6, **kw).eval()
    masks = torch.randint(0, 6, (2, 16, 16))
    masks[0, :2] = 255
    z = encode_masks(vae, masks)
    vae.save_pretrained(tmp_path / "label_vae")
    assert (tmp_path / "label_vae" / "diffusion_pytorch_model.safetensors").is_file()
    assert not list((tmp_path / "label_vae").glob("*.bin"))
    for where in (tmp_path / "label_vae", tmp_path):  # the export folder or the run folder holding it
        loaded = load_label_vae(where).eval()
        assert type(loaded) is type(vae) and loaded.config.num_labels == 6
        z2 = encode_masks(loaded, masks)
        assert torch.equal(z, z2)
        m1, c1 = decode_latents_to_masks(vae, z)
        m2, c2 = decode_latents_to_masks(loaded, z2)
        assert torch.equal(m1, m2) and torch.equal(c1, c2)


def test_load_label_vae_names_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="no label VAE"):
        load_label_vae(tmp_path)


def test_decode_marks_low_confidence_as_ignore():
    vae = build_label_vae("label_vae", 6, **TINY).eval()
    head = vae.decoder[-1]
    z = torch.randn(2, 4, 4, 4)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()  # every label equally likely: confidence 1/6 everywhere
    masks, conf = decode_latents_to_masks(vae, z)
    assert masks.shape == (2, 16, 16) and masks.dtype == torch.int64
    assert torch.allclose(conf, torch.full_like(conf, 1 / 6))
    assert (masks == 255).all()
    with torch.no_grad():
        head.bias[3] = 2.0  # p(3) = e^2 / (e^2 + 5) = 0.596
    masks, conf = decode_latents_to_masks(vae, z)
    assert (masks == 3).all() and ((conf > 0.5) & (conf < 0.6)).all()
    masks, _ = decode_latents_to_masks(vae, z, threshold=0.7, ignore_index=254)
    assert (masks == 254).all()


def test_encode_masks_mean_is_deterministic_sample_is_seeded():
    vae = build_label_vae("label_vae", 6, **TINY).eval()
    masks = torch.randint(0, 6, (1, 16, 16))
    assert torch.equal(encode_masks(vae, masks), encode_masks(vae, masks))
    a = encode_masks(vae, masks, generator=torch.Generator().manual_seed(1), sample=True)
    b = encode_masks(vae, masks, generator=torch.Generator().manual_seed(1), sample=True)
    assert torch.equal(a, b) and not torch.equal(a, encode_masks(vae, masks))
    with pytest.raises(ValueError, match="not divisible"):
        encode_masks(vae, torch.zeros(1, 18, 18, dtype=torch.long))


# ---- the training entry point on a tiny toy dataset ----

@pytest.fixture(scope="module")
def toy_root(tmp_path_factory):
    from dataset.toy_shapes import write_toy_dataset

    root = tmp_path_factory.mktemp("toy")
    write_toy_dataset(root, size=16, num_train=48, num_val=8, seed=0, progress=False)
    return root


def _argv(root, out, **over):
    opts = dict(dataset="toy", data_root=root, output_dir=out, encoder_channels="8 16 16",
                decoder_channels="16 16 16", norm_num_groups=4, resolution=16, train_batch_size=4,
                total_batch_size=8, learning_rate=1e-2, max_train_steps=10, mixed_precision="no",
                dataloader_num_workers=0, checkpointing_steps=4, validation_steps=5,
                validation_batch_size=8, logging_steps=1, latent_stats_samples=16, scaling_factor="auto")
    opts.update(over)
    argv = []
    for k, v in opts.items():
        argv += [f"--{k}", *str(v).split()]
    return argv


def test_training_run_lowers_loss_and_writes_run_folder(toy_root, tmp_path):
    from train.label_vae import main

    out = tmp_path / "run"
    main(_argv(toy_root, out, max_train_steps=16, checkpoints_total_limit=2))
    losses = [r["loss"] for r in read_jsonl(out / "metrics.jsonl") if "loss" in r]
    assert len(losses) == 16
    assert sum(losses[-4:]) / 4 < 0.8 * sum(losses[:2]) / 2, losses
    for name in ("config.yaml", "log.txt", "latent_stats.json", "label_vae/config.json",
                 "label_vae/diffusion_pytorch_model.safetensors", "validation/step_000005.png"):
        assert (out / name).is_file(), name
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-12", "checkpoint-16"]
    assert (out / "checkpoint-16" / "model.safetensors").is_file()
    val = [r for r in read_jsonl(out / "metrics.jsonl") if "val_mIoU" in r]
    assert [r["step"] for r in val] == [5, 10, 15, 16]
    assert 0.0 <= val[-1]["val_mIoU"] <= 1.0 and len(val[-1]["val_per_class_IoU"]) == 6
    stats = json.loads((out / "latent_stats.json").read_text())
    assert stats["std"] > 0 and stats["unit_variance_scaling_factor"] == pytest.approx(1 / stats["std"])
    vae = load_label_vae(out)
    assert vae.config.scaling_factor == pytest.approx(stats["unit_variance_scaling_factor"])
    # with the stored factor the training latents have unit variance
    from dataset import get_dataset_info
    from dataset.segmentation import SegmentationDataset

    ds = SegmentationDataset(get_dataset_info("toy", str(toy_root)), "train", size=16)
    z = encode_masks(vae, torch.stack([ds[i]["mask"] for i in range(0, 48, 3)]))
    assert z.std().item() == pytest.approx(1.0, rel=0.05)


def test_resumed_run_ends_with_the_same_weights(toy_root, tmp_path):
    from train.label_vae import main

    # 48 masks / batch 4 = 12 batches, accumulation 2 -> 6 steps per epoch: the stop at step 4
    # is mid-epoch and the resumed run crosses into epoch 1
    main(_argv(toy_root, tmp_path / "full", max_train_steps=8, validation_steps=100))
    main(_argv(toy_root, tmp_path / "part", max_train_steps=4, validation_steps=100))
    main(_argv(toy_root, tmp_path / "part", max_train_steps=8, validation_steps=100,
               resume_from_checkpoint="latest"))
    assert "resumed from" in (tmp_path / "part" / "log.txt").read_text()
    full = load_file(tmp_path / "full" / "label_vae" / "diffusion_pytorch_model.safetensors")
    part = load_file(tmp_path / "part" / "label_vae" / "diffusion_pytorch_model.safetensors")
    assert full.keys() == part.keys()
    for k in full:
        torch.testing.assert_close(part[k], full[k], rtol=1e-5, atol=1e-6, msg=k)
    fresh = build_label_vae("label_vae", 6, **TINY).state_dict()
    assert any(not torch.equal(fresh[k], full[k]) for k in full)  # training did change the weights
    loss_full = [r["loss"] for r in read_jsonl(tmp_path / "full" / "metrics.jsonl") if "loss" in r]
    loss_part = [r["loss"] for r in read_jsonl(tmp_path / "part" / "metrics.jsonl") if "loss" in r]
    assert loss_part == pytest.approx(loss_full, rel=1e-5)


def test_resuming_a_run_made_with_other_widths_fails_with_a_message(toy_root, tmp_path, capsys):
    from train.label_vae import main

    main(_argv(toy_root, tmp_path / "run", max_train_steps=4, validation_steps=100))
    with pytest.raises(SystemExit) as e:  # same folder, a profile whose widths changed since
        main(_argv(toy_root, tmp_path / "run", max_train_steps=8, validation_steps=100,
                   encoder_channels="8 16", decoder_channels="16 16", resume_from_checkpoint="latest"))
    err = capsys.readouterr().err
    assert e.value.code == 2 and "checkpoint-4" in err and "cannot resume" in err and "Traceback" not in err


def test_bad_options_exit_with_a_message(toy_root, tmp_path, capsys):
    from train.label_vae import main

    for bad, msg in ((dict(scaling_factor="big"), "scaling_factor"), (dict(model_type="vqgan"), "model_type"),
                     (dict(total_batch_size=6), "total_batch_size")):
        with pytest.raises(SystemExit) as e:
            main(_argv(toy_root, tmp_path / "bad", **bad))
        assert e.value.code == 2 and msg in capsys.readouterr().err


def test_steps_skipped_by_fp16_loss_scaling_are_logged(toy_root, tmp_path, monkeypatch):
    """fp16 needs a GPU, so the GradScaler's verdict is faked: steps 2 and 3 'overflowed'."""
    from accelerate import Accelerator

    from train.label_vae import main

    calls = {"n": 0}

    def was_skipped(self):
        calls["n"] += 1
        return calls["n"] in (2, 3)

    monkeypatch.setattr(Accelerator, "optimizer_step_was_skipped", property(was_skipped))
    out = tmp_path / "run"
    main(_argv(toy_root, out, max_train_steps=6, logging_steps=2))
    rows = [r for r in read_jsonl(out / "metrics.jsonl") if "loss" in r]
    assert {r["step"]: r.get("skipped_steps", 0) for r in rows} == {1: 0, 2: 1, 4: 1, 6: 0}
    log = (out / "log.txt").read_text()
    assert "2 optimiser steps in all were skipped by fp16 loss scaling" in log


def _argv_default_scale(root, out, **over):
    argv = _argv(root, out, **over)
    i = argv.index("--scaling_factor")
    return argv[:i] + argv[i + 2:]


def test_default_scale_is_one_over_the_latent_std_of_a_spread_training_sample(toy_root, tmp_path):
    from dataset import get_dataset_info
    from dataset.segmentation import SegmentationDataset
    from train.label_vae import main

    out = tmp_path / "run"  # no --scaling_factor: the default is measured ('auto')
    main(_argv_default_scale(toy_root, out, max_train_steps=6, validation_steps=100, latent_stats_samples=6))
    vae = load_label_vae(out).eval()
    ds = SegmentationDataset(get_dataset_info("toy", str(toy_root)), "train", size=16)

    def std_over(indices):
        masks = torch.stack([ds[i]["mask"] for i in indices])
        return (encode_masks(vae, masks).double() / vae.config.scaling_factor).std(unbiased=False).item()

    spread = [0, 9, 19, 28, 38, 47]  # 6 masks evenly spaced over the 48
    assert vae.config.scaling_factor == pytest.approx(1 / std_over(spread), rel=1e-4)
    assert json.loads((out / "latent_stats.json").read_text())["num_masks"] == 6
    # the first 6 masks would give another scale: the sample really is spread
    assert abs(1 / std_over(range(6)) - vae.config.scaling_factor) > 1e-3 * vae.config.scaling_factor


def test_the_authors_fixed_scale_stays_available(toy_root, tmp_path, capsys):
    from train.label_vae import main

    with pytest.raises(SystemExit):
        main(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "(default: 'auto')" in help_text and "0.2 is the authors' fixed value" in help_text
    out = tmp_path / "run"
    main(_argv(toy_root, out, max_train_steps=2, validation_steps=100, scaling_factor=0.2))
    assert load_label_vae(out).config.scaling_factor == 0.2
    assert json.loads((out / "latent_stats.json").read_text())["stored_scaling_factor"] == 0.2


def test_autoencoder_kl_layout_trains_saves_reloads_and_decodes(toy_root, tmp_path):
    from train.label_vae import main

    out = tmp_path / "run"
    main(_argv(toy_root, out, model_type="autoencoder_kl", encoder_channels="8 16", decoder_channels="16 16",
               max_train_steps=4, validation_steps=100))
    losses = [r["loss"] for r in read_jsonl(out / "metrics.jsonl") if "loss" in r]
    assert len(losses) == 4 and all(0 < v < 10 for v in losses)
    vae = load_label_vae(out).eval()
    assert isinstance(vae, LabelAutoencoderKL) and list(vae.config.block_out_channels) == [8, 16]
    stats = json.loads((out / "latent_stats.json").read_text())
    assert vae.config.scaling_factor == pytest.approx(stats["unit_variance_scaling_factor"])
    fresh = build_label_vae("autoencoder_kl", 6, encoder_channels=(8, 16), norm_num_groups=4, sample_size=16)
    trained = load_file(out / "label_vae" / "diffusion_pytorch_model.safetensors")
    assert any(not torch.equal(fresh.state_dict()[k], trained[k]) for k in trained)
    masks = torch.randint(0, 6, (2, 16, 16))
    decoded, confidence = decode_latents_to_masks(vae, encode_masks(vae, masks))
    assert decoded.shape == (2, 16, 16) and confidence.shape == (2, 16, 16)
    assert set(decoded.unique().tolist()) <= set(range(6)) | {255}


def _toy_copy_with_truncated_masks(toy_root, dst, names):
    import shutil

    shutil.copytree(toy_root, dst)
    for name in names:
        path = dst / "ann_dir" / "train" / name
        data = path.read_bytes()
        path.write_bytes(data[:data.index(b"IDAT") + 8])  # PNG header readable, pixel data cut off
    return dst


def test_a_mask_truncated_mid_run_is_named_counted_and_skipped(toy_root, tmp_path):
    from train.label_vae import main

    root = _toy_copy_with_truncated_masks(toy_root, tmp_path / "toy", ["000005.png"])
    out = tmp_path / "run"
    main(_argv(root, out, max_train_steps=12, validation_steps=100, logging_steps=4))  # 2 epochs
    assert (out / "label_vae" / "config.json").is_file()
    log = (out / "log.txt").read_text()
    bad = str(root / "ann_dir" / "train" / "000005.png")
    assert "skipped 1 bad training file(s)" in log and bad in log, log
    assert "1 bad training file(s) skipped, 2 time(s) in all" in log, log  # once per epoch
    assert sum(r.get("bad_files", 0) for r in read_jsonl(out / "metrics.jsonl")) == 2


@pytest.mark.parametrize("workers", [0, 1])
def test_too_many_bad_masks_stop_the_run_with_one_line(toy_root, tmp_path, capsys, workers):
    from train.label_vae import main

    root = _toy_copy_with_truncated_masks(toy_root, tmp_path / "toy", ["000003.png", "000017.png", "000030.png"])
    with pytest.raises(SystemExit) as e:
        main(_argv(root, tmp_path / "run", max_train_steps=8, validation_steps=100, dataloader_num_workers=workers))
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and err[-1].startswith("error: "), err
    assert "files bad, more than the allowed share" in err[-1] and "Traceback" not in err[-1]
    assert "000030.png" in err[-1] or "000017.png" in err[-1], err[-1]  # names the latest bad file


def test_an_unknown_config_key_is_one_line(toy_root, tmp_path, capsys):
    from train.label_vae import main

    profile = tmp_path / "profile.yaml"
    profile.write_text("dataset: toy\nlearning_rte: 0.001\n")
    with pytest.raises(SystemExit) as e:
        main(["--config", str(profile), "--data_root", str(toy_root), "--output_dir", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and "learning_rte" in err[0] and str(profile) in err[0], err
    assert not (tmp_path / "run").exists()


def test_resuming_from_a_truncated_checkpoint_is_one_line(toy_root, tmp_path, capsys):
    from train.label_vae import main

    out = tmp_path / "run"
    main(_argv(toy_root, out, max_train_steps=4, validation_steps=100))
    weights = out / "checkpoint-4" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(_argv(toy_root, out, max_train_steps=8, validation_steps=100, resume_from_checkpoint="latest"))
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and err[-1].startswith(f"error: {weights}: truncated"), err
