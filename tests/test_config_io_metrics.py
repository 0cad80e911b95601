"""The shared plumbing every stage relies on: configs, atomic files, run folders, metrics."""
import json
import struct
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from models.tiny_kit import build_tiny_sd
from utils.config import ConfigError, build_config, error_line, parse_config, save_config
from utils.io import (RunDir, atomic_path, check_pipeline_folder, check_weights_file, read_jsonl,
                      save_image_atomic)
from utils.metrics import IoUAccumulator, mean_iou
from utils.visualize import colorize, make_grid, overlay, plot_curves


@dataclass
class _Cfg:
    dataset: str = "ade20k"
    lr: float = 1e-4  # the paper's
    batch_size: int = 32
    fp16: bool = True
    thresholds: list[int] = field(default_factory=lambda: [20, 50, 100])
    data_root: str | None = None


def test_defaults_profile_and_flags_layer_in_order(tmp_path):
    prof = tmp_path / "toy.yaml"
    prof.write_text("dataset: toy\nbatch_size: 8\nlr: 0.001\n")
    cfg = parse_config(_Cfg, ["--config", str(prof), "--batch_size", "4", "--fp16", "false",
                              "--thresholds", "5", "7"])
    assert (cfg.dataset, cfg.lr, cfg.batch_size, cfg.fp16, cfg.thresholds) == ("toy", 1e-3, 4, False, [5, 7])
    assert parse_config(_Cfg, []).lr == 1e-4
    assert parse_config(_Cfg, ["--fp16"]).fp16 is True
    assert parse_config(_Cfg, ["--data_root", "/x"]).data_root == "/x"


def test_unknown_keys_are_errors(tmp_path, capsys):
    with pytest.raises(SystemExit):
        parse_config(_Cfg, ["--learning_rate", "1"])
    prof = tmp_path / "bad.yaml"
    prof.write_text("datset: toy\n")
    with pytest.raises(SystemExit):
        parse_config(_Cfg, ["--config", str(prof)])
    err = capsys.readouterr().err
    assert "datset" in err and "bad.yaml" in err
    with pytest.raises(ConfigError, match="batch_size"):
        build_config(_Cfg, {"batch_size": "many"})


def test_unknown_key_is_one_line_naming_it_and_a_close_match(tmp_path, capsys):
    for argv in (["--learning_rate", "1"], ["--bach_size=4"], ["stray"]):
        with pytest.raises(SystemExit) as e:
            parse_config(_Cfg, argv)
        assert e.value.code != 0
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith("error: ") and "usage" not in err
        assert argv[0].split("=")[0] in err
    with pytest.raises(SystemExit):
        parse_config(_Cfg, ["--bach_size", "4"])
    assert "did you mean --batch_size" in capsys.readouterr().err
    prof = tmp_path / "bad.yaml"
    prof.write_text("batch_size: 4\nthreshold: [1]\n")
    with pytest.raises(SystemExit):
        parse_config(_Cfg, ["--config", str(prof)])
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(prof) in err and "did you mean thresholds" in err


@dataclass
class _Choices:
    mode: str = field(default="joint", metadata={"help": "what to train", "choices": ("joint", "image")})
    views: list[str] = field(default_factory=lambda: ["flip"], metadata={"choices": ("flip", "dihedral")})


def test_a_value_outside_the_declared_choices_is_one_line_naming_the_field(tmp_path, capsys):
    assert parse_config(_Choices, ["--mode", "image"]).mode == "image"
    with pytest.raises(SystemExit):
        parse_config(_Choices, ["--mode", "imgae"])
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "'mode' is 'imgae', not one of joint, image" in err
    prof = tmp_path / "p.yaml"
    prof.write_text("views: [flip, rot45]\n")
    with pytest.raises(SystemExit):
        parse_config(_Choices, ["--config", str(prof)])
    err = capsys.readouterr().err
    assert "p.yaml" in err and "'views' is 'rot45'" in err
    with pytest.raises(SystemExit):
        parse_config(_Choices, ["--help"])
    assert "one of joint, image" in capsys.readouterr().out  # declared once, shown in --help


def test_derive_seed_gives_independent_streams_and_keeps_both_old_widths():
    from utils.precision import derive_seed

    keys = (7, 2, 5, 1)
    word = int(np.random.SeedSequence(list(keys)).generate_state(2, np.uint64)[0])
    assert derive_seed(*keys) == word >> 1 < 2**63  # the latent batches' seeds, as before
    assert derive_seed(*keys, bits=32) == int(np.random.SeedSequence(list(keys)).generate_state(1)[0])  # label VAE's
    assert len({derive_seed(0, e, s) for e in range(5) for s in range(50)}) == 250
    with pytest.raises(ValueError):
        derive_seed(1, bits=16)


def test_error_line_unwraps_a_worker_traceback():
    assert error_line(ValueError("data/x.png: cannot read image")) == "data/x.png: cannot read image"
    wrapped = ("Caught DatasetError in DataLoader worker process 1.\nOriginal Traceback (most recent call "
               "last):\n  File \"x.py\", line 3, in f\n    raise e\n"
               "dataset.segmentation.DatasetError: data/img: 2 of 9 files bad\n")
    assert error_line(ValueError(wrapped)) == "data/img: 2 of 9 files bad"


def _weights(path, n=64):
    save_file({"w": torch.arange(n, dtype=torch.float32), "b": torch.zeros(3)}, str(path))
    return path


def test_check_weights_file_finds_cut_and_foreign_files(tmp_path):
    good = _weights(tmp_path / "good.safetensors")
    check_weights_file(good)  # complete: no error
    data = good.read_bytes()
    cases = {"cut.safetensors": data[:-10], "header_only.safetensors": data[:40],
             "tiny.safetensors": data[:5], "pickle.safetensors": b"\x80\x04" + b"\0" * 200,
             "json_garbage.safetensors": struct.pack("<Q", 4) + b"[1]x"}
    for name, blob in cases.items():
        (tmp_path / name).write_bytes(blob)
        with pytest.raises(ValueError, match="truncated or not a safetensors file") as e:
            check_weights_file(tmp_path / name)
        assert str(e.value).startswith(str(tmp_path / name)) and "\n" not in str(e.value)
    with pytest.raises(ValueError, match="not found"):
        check_weights_file(tmp_path / "absent.safetensors")


def _pipeline(folder):
    index = {"_class_name": "X", "unet": ["diffusers", "UNet2DConditionModel"],
             "scheduler": ["diffusers", "DDPMScheduler"], "safety_checker": [None, None]}
    (folder / "unet").mkdir(parents=True)
    (folder / "scheduler").mkdir()
    (folder / "model_index.json").write_text(json.dumps(index))
    (folder / "unet" / "config.json").write_text("{}")
    (folder / "scheduler" / "scheduler_config.json").write_text("{}")
    _weights(folder / "unet" / "diffusion_pytorch_model.safetensors")
    return folder


def test_check_pipeline_folder_names_the_first_missing_part(tmp_path):
    pipe = _pipeline(tmp_path / "pipe")
    check_pipeline_folder(pipe)
    check_pipeline_folder(pipe, ["unet"])
    with pytest.raises(ValueError, match="component folder 'vae'") as e:
        check_pipeline_folder(pipe, ["unet", "vae"])
    assert str(pipe / "vae") in str(e.value)
    with pytest.raises(ValueError, match="pipeline folder not found"):
        check_pipeline_folder(tmp_path / "nowhere")
    weights = pipe / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1])
    with pytest.raises(ValueError, match="truncated") as e:
        check_pipeline_folder(pipe)
    assert str(weights) in str(e.value)
    weights.unlink()
    with pytest.raises(ValueError, match="no weights file"):
        check_pipeline_folder(pipe)
    (pipe / "scheduler" / "scheduler_config.json").unlink()
    with pytest.raises(ValueError, match="no config file") as e:
        check_pipeline_folder(pipe, ["scheduler"])
    assert str(pipe / "scheduler") in str(e.value)
    (pipe / "model_index.json").unlink()
    with pytest.raises(ValueError, match="model_index.json"):
        check_pipeline_folder(pipe, ["unet"])


def test_check_pipeline_folder_accepts_a_real_tiny_sd_folder(tmp_path):
    build_tiny_sd(tmp_path / "sd", words=["circle"])
    check_pipeline_folder(tmp_path / "sd")


def test_saved_config_reloads_to_the_same_values(tmp_path):
    cfg = parse_config(_Cfg, ["--dataset", "voc", "--lr", "1e-5"])
    save_config(cfg, tmp_path / "config.yaml")
    again = parse_config(_Cfg, ["--config", str(tmp_path / "config.yaml")])
    assert again == cfg


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out" / "a.png"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("crash")
    assert not target.exists() and list(target.parent.iterdir()) == []
    save_image_atomic(target, np.zeros((4, 4), np.uint8))
    assert target.exists() and [p.name for p in target.parent.iterdir()] == ["a.png"]


def test_run_dir_writes_config_log_and_metrics(tmp_path):
    run = RunDir(tmp_path / "run")
    run.save_config(_Cfg())
    run.log("hello")
    run.log_metrics(step=1, loss=0.5)
    run.log_metrics(step=2, loss=0.25)
    run.close()
    assert "hello" in (tmp_path / "run" / "log.txt").read_text()
    assert [r["loss"] for r in read_jsonl(tmp_path / "run" / "metrics.jsonl")] == [0.5, 0.25]
    assert "dataset: ade20k" in (tmp_path / "run" / "config.yaml").read_text()
    assert plot_curves(tmp_path / "run" / "metrics.jsonl", tmp_path / "run" / "loss.png")
    assert (tmp_path / "run" / "loss.png").stat().st_size > 0


def test_miou_matches_hand_computed_values():
    target = np.array([[0, 0, 1, 1], [2, 2, 255, 1]])
    pred = np.array([[0, 1, 1, 1], [2, 255, 0, 1]])
    r = mean_iou(pred, target, num_classes=3)
    # class 0: tp 1, fn 1, fp 0 -> 1/2 ; class 1: tp 3, fp 1 -> 3/4 ; class 2: tp 1, missed 1 -> 1/2
    assert r["per_class_IoU"] == pytest.approx([0.5, 0.75, 0.5])
    assert r["mIoU"] == pytest.approx((0.5 + 0.75 + 0.5) / 3)
    acc = IoUAccumulator(4)
    acc.update(pred, target)
    assert acc.result()["per_class_IoU"][3] is None  # absent class: left out of the mean
    assert mean_iou(target, target, 3)["mIoU"] == 1.0


def test_colorize_and_grid_shapes():
    pal = ((0, 0, 0), (255, 0, 0))
    m = np.array([[0, 1], [255, 1]])
    c = colorize(m, pal)
    assert c.shape == (2, 2, 3) and tuple(c[0, 1]) == (255, 0, 0) and tuple(c[1, 0]) == (255, 255, 255)
    o = overlay(np.zeros((2, 2, 3), np.uint8), m, pal, alpha=0.5)
    assert o[0, 1, 0] == 127
    g = make_grid([[c, c], [c]], pad=1)
    assert g.shape == (2 * 3 + 1, 2 * 3 + 1, 3)
