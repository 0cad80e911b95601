"""Stage 2 end to end on a tiny toy world: base model -> image pretraining -> init -> joint training."""
import importlib.util
import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from dataset import latents
from dataset.toy_shapes import write_toy_dataset
from models.label_vae import LabelVAE
from utils.io import read_jsonl

SIZE = 16  # 16 px images, factor-4 VAEs -> 4x4 latents
TINY_BASE = ["--resolution", str(SIZE), "--vae_channels", "8", "16", "16", "--unet_channels", "16", "32",
             "--text_hidden", "16", "--text_layers", "1", "--max_length", "16", "--train_batch_size", "8",
             "--max_train_steps", "3", "--logging_steps", "1"]
CPU_FAST = ["--resolution", str(SIZE), "--mixed_precision", "no", "--use_8bit_adam", "false",
            "--gradient_checkpointing", "false", "--dataloader_num_workers", "0", "--validation_inference_steps", "2",
            "--dataset", "toy"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A 48-image toy dataset, a tiny base model (3 VAE steps) and a tiny label VAE (factor 4)."""
    from train import toy_base_model

    root = tmp_path_factory.mktemp("joint")
    write_toy_dataset(root / "toy", SIZE, 48, 4, seed=0, progress=False)
    toy_base_model.main(["--data_root", str(root / "toy"), "--output_dir", str(root / "base")] + TINY_BASE)
    torch.manual_seed(0)
    LabelVAE(num_labels=6, encoder_channels=(8, 8, 8), decoder_channels=(8, 8, 8),
             norm_num_groups=8).save_pretrained(root / "label_vae")
    return root


def test_base_model_folder_is_a_stable_diffusion_folder(world):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(world / "base", safety_checker=None)
    sf = pipe.vae.config.scaling_factor
    assert sf != 0.18215 and 0.05 < sf < 20  # measured from the latents, not the SD default
    caption = next(iter(json.loads((world / "toy" / "captions" / "train.json").read_text()).values()))
    ids = pipe.tokenizer(caption).input_ids
    assert len(ids) == 2 + len(caption.split())  # every caption word is one token
    assert (world / "base" / "vae_reconstructions.png").is_file()


def test_init_step_writes_a_loadable_jodiffusion_folder(world):
    from diffusers import UNet2DConditionModel

    from inference import jodiffusion
    from models.pipeline_jodiffusion import JoDiffusionPipeline

    jodiffusion.main(["--base_model", str(world / "base"), "--label_vae", str(world / "label_vae"),
                      "--output_dir", str(world / "init")])
    pipe = JoDiffusionPipeline.from_pretrained(world / "init")
    assert pipe.unet.config.in_channels == 8 and pipe.unet.config.out_channels == 8
    assert type(pipe.scheduler).__name__ == "DPMSolverMultistepScheduler"
    assert pipe.scheduler.config.algorithm_type == "dpmsolver++"
    base = UNet2DConditionModel.from_pretrained(world / "base", subfolder="unet").eval()
    x, t, text = torch.randn(2, 4, 4, 4), torch.tensor([10, 900]), torch.randn(2, 16, 16)
    with torch.no_grad():
        joint = pipe.unet.eval()(torch.cat([x, torch.randn(2, 4, 4, 4)], 1), t, text).sample
        assert (joint[:, :4] - base(x, t, text).sample).abs().max() <= 1e-5
    out = pipe(["a red circle on a striped background"], num_inference_steps=2, output_type="np",
               generator=[torch.Generator().manual_seed(0)])
    assert out.images.shape == (1, SIZE, SIZE, 3) and out.masks.shape == (1, SIZE, SIZE)


def test_image_mode_pretrains_a_plain_sd_unet(world):
    from diffusers import StableDiffusionPipeline

    from train import joint_diffusion

    out = world / "image"
    joint_diffusion.main(CPU_FAST + ["--mode", "image", "--data_root", str(world / "toy"), "--pretrained_model",
                                     str(world / "base"), "--output_dir", str(out), "--train_batch_size", "8",
                                     "--max_train_steps", "2", "--logging_steps", "1", "--num_validation_images", "1"])
    pipe = StableDiffusionPipeline.from_pretrained(out / "pipeline", safety_checker=None)
    assert pipe.unet.config.in_channels == 4
    rows = read_jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2] and "label_loss" not in rows[0]
    assert (out / "validation" / "step-2.png").is_file()


def test_min_snr_weighting_only_turns_the_loss_down(world):
    """--snr_gamma weights each sample by min(SNR, gamma) / SNR <= 1: on the same first batch
    (same seed, same weights, same noise) the logged loss is at most the plain one."""
    from train import joint_diffusion

    losses = {}
    for name, extra in (("plain", []), ("snr", ["--snr_gamma", "5"])):
        out = world / f"snr_{name}"
        joint_diffusion.main(CPU_FAST + ["--mode", "image", "--data_root", str(world / "toy"), "--pretrained_model",
                                         str(world / "base"), "--output_dir", str(out), "--train_batch_size", "8",
                                         "--max_train_steps", "1", "--logging_steps", "1", "--num_validation_images",
                                         "0", "--checkpointing_steps", "0"] + extra)
        losses[name] = read_jsonl(out / "metrics.jsonl")[0]["loss"]
    assert 0 < losses["snr"] <= losses["plain"] + 1e-7, losses
    assert "snr_gamma: 5.0" in (world / "snr_snr" / "config.yaml").read_text()


def test_tiny_joint_training_lowers_the_loss(world):
    from models.pipeline_jodiffusion import JoDiffusionPipeline
    from train import joint_diffusion

    out = world / "joint"
    joint_diffusion.main(CPU_FAST + ["--data_root", str(world / "toy"), "--pretrained_model", str(world / "base"),
                                     "--label_vae", str(world / "label_vae"), "--output_dir", str(out),
                                     "--train_batch_size", "8", "--learning_rate", "2e-3", "--max_train_steps", "40",
                                     "--logging_steps", "1", "--checkpointing_steps", "0", "--num_validation_images", "2"])
    rows = read_jsonl(out / "metrics.jsonl")
    assert len(rows) == 40 and all(np.isfinite([r["loss"], r["image_loss"], r["label_loss"]]).all() for r in rows)
    first, last = np.mean([r["loss"] for r in rows[:8]]), np.mean([r["loss"] for r in rows[-8:]])
    assert last < 0.9 * first, (first, last)
    assert (out / "validation" / "step-40.png").is_file() and (out / "config.yaml").is_file()
    pipe = JoDiffusionPipeline.from_pretrained(out / "pipeline")
    res = pipe(["a green square on a noisy background"], num_inference_steps=2, output_type="np",
               generator=[torch.Generator().manual_seed(1)])
    assert res.images.dtype == np.uint8 and res.masks.shape == (1, SIZE, SIZE)


def test_stopped_and_resumed_run_ends_with_the_same_weights(world):
    from train import joint_diffusion

    common = CPU_FAST + ["--data_root", str(world / "toy"), "--pretrained_model", str(world / "init"),
                         "--train_batch_size", "8", "--gradient_accumulation_steps", "2", "--learning_rate", "1e-3",
                         "--cache_latents", "--cache_dir", str(world / "cache"), "--use_ema",
                         "--ema_decay", "0.9", "--checkpointing_steps", "2", "--num_validation_images", "0"]
    whole = world / "whole"
    joint_diffusion.main(common + ["--output_dir", str(whole), "--max_train_steps", "4"])
    assert len(list((world / "cache").glob("shard-*.safetensors"))) == 1
    split = world / "split"
    joint_diffusion.main(common + ["--output_dir", str(split), "--max_train_steps", "2"])  # "stopped" at step 2
    assert (split / "checkpoint-2" / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert (split / "checkpoint-2" / "unet_ema").is_dir()
    joint_diffusion.main(common + ["--output_dir", str(split), "--max_train_steps", "4",
                                   "--resume_from_checkpoint", "latest", "--checkpoints_total_limit", "1"])
    assert "resumed from" in (split / "log.txt").read_text()
    assert sorted(p.name for p in split.glob("checkpoint-*")) == ["checkpoint-4"]
    for sub in ("pipeline/unet", "checkpoint-4/unet"):  # exported EMA weights and the raw training weights
        a = load_file(whole / sub / "diffusion_pytorch_model.safetensors")
        b = load_file(split / sub / "diffusion_pytorch_model.safetensors")
        assert a.keys() == b.keys()
        assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6, sub
    start = load_file(world / "init" / "unet" / "diffusion_pytorch_model.safetensors")
    assert any(not torch.equal(start[k], a[k]) for k in a)  # it did train


def test_mixed_precision_run_exports_the_frozen_components_unrounded(world):
    """Training casts the frozen VAE, text encoder and label VAE to bf16; the exported pipeline must
    still hold the base model's float32 weights, bit for bit."""
    out = world / "bf16"
    args = [a for a in CPU_FAST if a not in ("--mixed_precision", "no")]
    # its own process: accelerate keeps one mixed-precision setting per process (the other tests': no)
    subprocess.run([sys.executable, "-m", "train.joint_diffusion", *args, "--mixed_precision", "bf16",
                    "--data_root", str(world / "toy"), "--pretrained_model", str(world / "base"),
                    "--label_vae", str(world / "label_vae"), "--output_dir", str(out), "--train_batch_size", "8",
                    "--max_train_steps", "2", "--checkpointing_steps", "0", "--num_validation_images", "0"],
                   check=True, env=dict(os.environ, HF_HUB_OFFLINE="1"), capture_output=True)
    assert "mixed precision bf16" in (out / "log.txt").read_text()
    pairs = {"vae/diffusion_pytorch_model.safetensors": world / "base" / "vae" / "diffusion_pytorch_model.safetensors",
             "text_encoder/model.safetensors": world / "base" / "text_encoder" / "model.safetensors",
             "label_vae/diffusion_pytorch_model.safetensors": world / "label_vae" / "diffusion_pytorch_model.safetensors"}
    for exported, source in pairs.items():
        a, b = load_file(out / "pipeline" / exported), load_file(source)
        assert a.keys() == b.keys(), exported
        for k in a:
            assert a[k].dtype == b[k].dtype == torch.float32 and torch.equal(a[k], b[k]), (exported, k)


def _error_line(capsys) -> str:
    """The one ``error:`` line a bad input must give: last on stderr, no traceback."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err and lines and lines[-1].startswith("error: "), err[-2000:]
    assert sum(line.startswith("error:") for line in lines) == 1, err[-2000:]
    return lines[-1]


def test_8bit_adam_without_bitsandbytes_says_how_to_install_it_before_anything_else(world, capsys, monkeypatch):
    from train import joint_diffusion

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else find_spec(name, *a))
    # the paper's default (--use_8bit_adam true); the base model does not exist: the first check must be bitsandbytes'
    with pytest.raises(SystemExit) as e:
        joint_diffusion.main(["--pretrained_model", str(world / "nowhere"), "--output_dir", str(world / "x")])
    line = _error_line(capsys)
    assert e.value.code == 2 and "pip install bitsandbytes" in line and "CUDA" in line and "--use_8bit_adam false" in line
    assert not (world / "x").exists()  # stopped before the run folder, the models or the latent cache


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU-only message")
def test_8bit_adam_on_cpu_is_a_clear_error(world, capsys, monkeypatch):
    from train import joint_diffusion

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: find_spec("numpy") if name == "bitsandbytes" else find_spec(name, *a))
    with pytest.raises(SystemExit) as e:
        joint_diffusion.main(["--pretrained_model", str(world / "init"), "--output_dir", str(world / "x")])
    assert e.value.code == 2 and "needs a CUDA GPU" in _error_line(capsys)


def test_validation_grid_draws_its_noise_on_the_cpu_whatever_the_device(tmp_path):
    # the grid must show what inference.generate would make from the same seeds: it seeds CPU
    # generators, so the validation does too, even when training runs on CUDA
    from types import SimpleNamespace

    from dataset import get_dataset_info
    from utils.training import validation_grid

    calls = []

    class FakePipe:
        def set_progress_bar_config(self, **kw):
            pass

        def __call__(self, prompts, generator, **kw):
            calls.append([(g.device.type, g.initial_seed()) for g in generator])
            n = len(prompts)
            return SimpleNamespace(images=np.zeros((n, 8, 8, 3), np.uint8), masks=np.zeros((n, 8, 8), np.uint8))

    import contextlib

    validation_grid(FakePipe(), ["a red circle", "a blue ring"], [5, 6], tmp_path / "grid.png", contextlib.nullcontext,
                    info=get_dataset_info("toy"), num_inference_steps=2, guidance_scale=8.0)
    assert calls == [[("cpu", 5), ("cpu", 6)]]
    assert (tmp_path / "grid.png").exists()


def test_dihedral_augmentation_caches_eight_views_and_trains_on_all_of_them(world, capsys):
    """--augment_views dihedral (the toy benchmark's joint stage): every item is cached in its 8
    rotations / flips, and training draws from all of them."""
    from train import joint_diffusion
    from dataset.latents import CachedSource, LatentBatches

    common = CPU_FAST + ["--data_root", str(world / "toy"), "--pretrained_model", str(world / "base"),
                         "--label_vae", str(world / "label_vae"), "--train_batch_size", "8", "--cache_latents",
                         "--cache_dir", str(world / "cache_views"), "--checkpointing_steps", "0",
                         "--num_validation_images", "0", "--max_train_steps", "2"]
    joint_diffusion.main(common + ["--output_dir", str(world / "flip")])
    joint_diffusion.main(common + ["--output_dir", str(world / "d4"), "--augment_views", "dihedral"])
    assert "(+ flipped copies)" in (world / "flip" / "log.txt").read_text()
    log = (world / "d4" / "log.txt").read_text()
    assert "(+ 7 rotated / flipped copies)" in log and "reusing" not in log  # the flip-only cache is not reused
    shard = load_file(world / "cache_views" / "shard-00000.safetensors")
    for key in ("image_mean", "image_std", "label"):
        assert [k for k in shard if k.startswith(key + "_")] == [f"{key}_d{k}" for k in range(1, 8)]
        # a quarter turn of the item is a different latent
        assert not torch.allclose(shard[key], shard[key + "_d1"])
    assert shard["label_d2"].shape == shard["label"].shape

    n = 40
    source = CachedSource({}, n, None, [])
    batches = LatentBatches(source, 8, 1, 0, seed=0, views=8)
    rows = torch.cat([b for _, b in zip(range(25), (b for _, b in batches.iterate()))])
    assert set((rows // n).tolist()) == set(range(8)) and set((rows % n).tolist()) == set(range(n))

    with pytest.raises(SystemExit):
        joint_diffusion.main(common + ["--output_dir", str(world / "bad"), "--augment_views", "rot45"])
    assert "'augment_views' is 'rot45', not one of flip, dihedral" in capsys.readouterr().err


def test_steps_skipped_by_fp16_loss_scaling_are_logged(world, monkeypatch):
    """fp16 needs a GPU, so the GradScaler's verdict is faked: optimiser steps 1-3 'overflowed'."""
    from accelerate import Accelerator

    from train import joint_diffusion

    calls = {"n": 0}

    def was_skipped(self):
        calls["n"] += 1
        return calls["n"] <= 3

    monkeypatch.setattr(Accelerator, "optimizer_step_was_skipped", property(was_skipped))
    out = world / "skips"
    joint_diffusion.main(CPU_FAST + ["--data_root", str(world / "toy"), "--pretrained_model", str(world / "base"),
                                     "--label_vae", str(world / "label_vae"), "--output_dir", str(out), "--train_batch_size", "8", "--max_train_steps", "4",
                                     "--logging_steps", "2", "--checkpointing_steps", "0",
                                     "--num_validation_images", "0"])
    assert [r.get("skipped_steps", 0) for r in read_jsonl(out / "metrics.jsonl")] == [2, 1]
    log = (out / "log.txt").read_text()
    assert "step 2: 2 optimiser step(s) since the last log line were skipped" in log
    assert "3 optimiser steps in all were skipped by fp16 loss scaling" in log


# ---- the latent cache is read through memory maps of its shard files -----------------------------

CACHED = CPU_FAST + ["--train_batch_size", "8", "--gradient_accumulation_steps", "2", "--learning_rate", "1e-3",
                     "--cache_latents", "--checkpointing_steps", "0", "--num_validation_images", "0",
                     "--max_train_steps", "3", "--logging_steps", "1"]
SHARD_ITEMS = 20  # 48 items -> shards of 20, 20 and 8: rows are gathered across shards and views


def _in_memory_cache(cache_dir, num_shards: int, suffixes: list[str]) -> dict:
    """The cache as the trainer loaded it before it was memory-mapped (every shard read whole and
    concatenated): the reference the mapped cache must match bit for bit."""
    loaded = [load_file(Path(cache_dir) / f"shard-{k:05d}.safetensors") for k in range(num_shards)]
    tensors = {}
    for key in ("image_mean", "image_std", "label", "input_ids"):
        if key in loaded[0]:
            rows = [part[key] for part in loaded] * len(suffixes) if key == "input_ids" else \
                [part[key + suffix] for suffix in suffixes for part in loaded]
            tensors[key] = torch.cat(rows)
    return tensors


@pytest.fixture(scope="module")
def mapped_run(world):
    """A cached joint run (memory-mapped cache of 3 shards, flipped copies)."""
    from train import joint_diffusion

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(latents, "CACHE_SHARD_ITEMS", SHARD_ITEMS)
        joint_diffusion.main(CACHED + ["--data_root", str(world / "toy"), "--pretrained_model", str(world / "base"),
                                       "--label_vae", str(world / "label_vae"), "--cache_dir", str(world / "cache_mm"),
                                       "--output_dir", str(world / "mapped")])
    return world / "mapped", world / "cache_mm"


def test_latent_cache_is_read_through_memory_maps_of_its_shards(mapped_run, tmp_path):
    from dataset.latents import open_latent_cache

    cache = tmp_path / "cache"
    shutil.copytree(mapped_run[1], cache)
    shards = sorted(cache.glob("shard-*.safetensors"))
    assert len(shards) == 3
    columns = open_latent_cache(cache, 3, ["", "_flip"])
    reference = _in_memory_cache(cache, 3, ["", "_flip"])
    assert set(columns) == set(reference) == {"image_mean", "image_std", "label", "input_ids"}
    every_row = torch.arange(2 * 48).flip(0)
    for key, column in columns.items():
        assert len(column) == 2 * 48 and torch.equal(column[every_row], reference[key][every_row]), key
        for part in column.parts:  # views of read-only maps of the files, not copies in memory
            assert isinstance(part, np.memmap) and Path(part.filename) in shards and not part.flags.writeable
    # file-backed: a value changed in the file on disk shows in the mapped rows at once
    (n,) = struct.unpack("<Q", shards[0].read_bytes()[:8])
    begin = json.loads(shards[0].read_bytes()[8:8 + n])["image_mean"]["data_offsets"][0]
    assert reference["image_mean"].dtype == torch.float32 and columns["image_mean"][[0]].flatten()[0] != 1234.5
    with open(shards[0], "r+b") as f:
        f.seek(8 + n + begin)
        f.write(np.float32(1234.5).tobytes())
    assert columns["image_mean"][[0]].flatten()[0] == 1234.5


def test_memory_mapped_cache_trains_the_same_bytes_as_a_cache_loaded_into_memory(world, mapped_run, monkeypatch):
    from train import joint_diffusion

    monkeypatch.setattr(latents, "CACHE_SHARD_ITEMS", SHARD_ITEMS)
    monkeypatch.setattr(latents, "open_latent_cache", _in_memory_cache)  # the loading it replaced
    out = world / "in_memory"
    joint_diffusion.main(CACHED + ["--data_root", str(world / "toy"), "--pretrained_model", str(world / "base"),
                                   "--label_vae", str(world / "label_vae"), "--cache_dir", str(mapped_run[1]),
                                   "--output_dir", str(out)])
    assert "reusing the latent cache" in (out / "log.txt").read_text()
    keys = ("loss", "image_loss", "label_loss")
    assert [[r[k] for k in keys] for r in read_jsonl(out / "metrics.jsonl")] == \
        [[r[k] for k in keys] for r in read_jsonl(mapped_run[0] / "metrics.jsonl")]
    a = load_file(mapped_run[0] / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors")
    b = load_file(out / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---- bad input: one line naming the file, never a traceback ----------------------------------------

def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize("case", ["no folder", "no unet", "cut unet weights", "cut label VAE weights",
                                  "label VAE of another dataset", "no data root"])
def test_bad_model_or_data_folders_stop_with_one_line(world, tmp_path, capsys, case):
    from train import joint_diffusion

    base, label_vae, data_root = tmp_path / "base", tmp_path / "label_vae", world / "toy"
    shutil.copytree(world / "base", base, ignore=shutil.ignore_patterns("*.png", "*.jsonl", "*.txt"))
    shutil.copytree(world / "label_vae", label_vae)
    named = {"no folder": tmp_path / "nowhere", "no unet": base / "unet",
             "cut unet weights": base / "unet" / "diffusion_pytorch_model.safetensors",
             "cut label VAE weights": label_vae / "diffusion_pytorch_model.safetensors",
             "label VAE of another dataset": label_vae, "no data root": tmp_path / "no_data"}[case]
    if case == "no folder":
        base = named
    elif case == "no unet":
        shutil.rmtree(named)
    elif case.startswith("cut"):
        _truncate(named)
    elif case == "label VAE of another dataset":  # VOC's 21 labels; the toy world has 6
        LabelVAE(num_labels=21, encoder_channels=(8, 8, 8), decoder_channels=(8, 8, 8),
                 norm_num_groups=8).save_pretrained(label_vae)
    else:
        data_root = named
    with pytest.raises(SystemExit) as e:
        joint_diffusion.main(CPU_FAST + ["--data_root", str(data_root), "--pretrained_model", str(base),
                                         "--label_vae", str(label_vae), "--output_dir", str(tmp_path / "run"),
                                         "--max_train_steps", "1", "--num_validation_images", "0"])
    line = _error_line(capsys)
    assert e.value.code == 2 and f"error: {named}:" in line, line
    if case == "label VAE of another dataset":
        assert "21 labels" in line and "'toy' has 6" in line


def _toy_copy_with_cut_images(world, tmp_path, count: int) -> Path:
    root = tmp_path / "toy"
    shutil.copytree(world / "toy", root)
    for k in range(count):  # the header still reads: found only when the pixels are decoded mid-run
        _truncate(root / "img_dir" / "train" / f"{7 + 10 * k:06d}.png")
    return root


@pytest.mark.parametrize("cached", [False, True])
def test_a_corrupt_image_mid_run_is_named_skipped_and_counted(world, tmp_path, cached):
    from train import joint_diffusion

    root = _toy_copy_with_cut_images(world, tmp_path, 1)
    out = tmp_path / "run"
    joint_diffusion.main(CPU_FAST + ["--data_root", str(root), "--pretrained_model", str(world / "base"),
                                     "--label_vae", str(world / "label_vae"), "--output_dir", str(out),
                                     "--train_batch_size", "8", "--max_train_steps", "6", "--logging_steps", "3",
                                     "--checkpointing_steps", "0", "--num_validation_images", "0"]
                         + (["--cache_latents"] if cached else []))
    log = (out / "log.txt").read_text()
    bad = root / "img_dir" / "train" / "000007.png"
    # one epoch reads every item once: the cut file once, while caching (step 0) or in a step's batch
    assert f"skipped 1 bad training file(s), each replaced by the next good one: {bad}: " in log
    assert "1 bad training file(s) skipped, 1 time(s) in all" in log and (out / "pipeline").is_dir()
    counted = sum(r.get("bad_files", 0) for r in read_jsonl(out / "metrics.jsonl"))
    assert counted == (0 if cached else 1)


def test_too_many_corrupt_images_stop_the_run_with_one_line(world, tmp_path, capsys):
    from train import joint_diffusion

    root = _toy_copy_with_cut_images(world, tmp_path, 3)  # 3 of 48: more than --max_bad_fraction 0.01 allows
    with pytest.raises(SystemExit) as e:  # read in a DataLoader worker, which wraps the error in its traceback
        joint_diffusion.main(CPU_FAST + ["--dataloader_num_workers", "1", "--data_root", str(root),
                                         "--pretrained_model", str(world / "base"), "--label_vae", str(world / "label_vae"),
                                         "--output_dir", str(tmp_path / "run"), "--train_batch_size", "8",
                                         "--max_train_steps", "6", "--checkpointing_steps", "0", "--num_validation_images", "0"])
    line = _error_line(capsys)
    assert e.value.code == 2 and line.startswith(f"error: {root / 'img_dir' / 'train'}: 2 of 48 files bad"), line
    assert "max_bad_fraction=0.01" in line
