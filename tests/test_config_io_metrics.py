"""The shared plumbing every stage relies on: configs, atomic files, run folders, metrics."""
from dataclasses import dataclass, field

import numpy as np
import pytest

from utils.config import ConfigError, build_config, parse_config, save_config
from utils.io import RunDir, atomic_path, read_jsonl, save_image_atomic
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
