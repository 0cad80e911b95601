"""Bad data costs one clear line, never a traceback (issue #16, point 7, the dataset library).

Before training, ``SegmentationDataset`` reads headers only: a missing root, an image without
its mask, a mask of another size, an unreadable header or a broken caption file stop it with
``DatasetError("<path>: <problem>")``. During a run, a file that turns out corrupt is skipped:
the next good item takes its place and names the bad file in ``item["skipped"]``, until more
than ``max_bad_fraction`` of the items are bad.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from dataset import get_dataset_info
from dataset.segmentation import DatasetError, SegmentationDataset
from dataset.toy_shapes import write_toy_dataset
from tests.fixtures_datasets import make_fixture, save_png
from train import toy_base_model
from utils.config import error_line
from utils.io import read_jsonl

TINY_BASE = ["--resolution", "16", "--vae_channels", "8", "16", "--unet_channels", "16", "32",
             "--text_hidden", "16", "--text_layers", "1", "--max_length", "16", "--train_batch_size", "4",
             "--max_train_steps", "1", "--logging_steps", "1"]


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # the header survives, the pixel data does not


def _one_line(exc) -> str:
    msg = str(exc)
    assert "\n" not in msg and "Traceback" not in msg
    return msg


# --- before training: cheap checks when the dataset is built -----------------------------------

def test_missing_data_root_names_it_and_how_to_set_it(tmp_path):
    for name in ("toy", "voc", "ade20k", "coco"):
        info = get_dataset_info(name, data_root=str(tmp_path / "nowhere"))
        with pytest.raises(DatasetError) as e:
            SegmentationDataset(info, "train")
        msg = _one_line(e.value)
        assert msg.startswith(f"{tmp_path / 'nowhere'}: data_root") and "--data_root" in msg
    with pytest.raises(DatasetError, match="make_toy_dataset"):
        SegmentationDataset(get_dataset_info("toy", str(tmp_path / "nowhere")), "train")


def test_image_without_its_mask(tmp_path):
    fx = make_fixture("ade20k", tmp_path)
    ds = SegmentationDataset(fx.info, "train")
    ds.mask_path(1).unlink()
    with pytest.raises(DatasetError) as e:
        SegmentationDataset(fx.info, "train")
    assert _one_line(e.value).startswith(f"{ds.image_path(1)}: image has no mask {ds.mask_path(1)}")


@pytest.mark.parametrize("name", ["voc", "coco"])
def test_mask_of_another_size(tmp_path, name):
    fx = make_fixture(name, tmp_path)
    ds = SegmentationDataset(fx.info, "train", size=8)
    save_png(ds.mask_path(0), np.zeros((5, 7), np.uint8))
    with pytest.raises(DatasetError) as e:  # with or without resizing: a mask must fit its image
        SegmentationDataset(fx.info, "train", size=8)
    msg = _one_line(e.value)
    assert msg.startswith(f"{ds.image_path(0)}: image is") and f"its mask {ds.mask_path(0)} is 7x5" in msg


@pytest.mark.parametrize("which", ["image", "mask"])
def test_unreadable_header(tmp_path, which):
    fx = make_fixture("voc", tmp_path)
    ds = SegmentationDataset(fx.info, "train")
    path = ds.image_path(2) if which == "image" else ds.mask_path(2)
    path.write_bytes(b"")  # an empty file: e.g. a download cut at the start
    with pytest.raises(DatasetError) as e:
        SegmentationDataset(fx.info, "train")
    assert _one_line(e.value).startswith(f"{path}: cannot read {which}")


@pytest.mark.parametrize("content,problem", [
    ("", "not valid JSON"), ("{\"a\": ", "not valid JSON"), ("[\"a caption\"]", "must be a JSON object"),
    ("{\"ADE_train_00000001\": 7}", "must be a JSON object"), (b"\xff\xfe{}", "not valid JSON")])
def test_broken_caption_file(tmp_path, content, problem):
    fx = make_fixture("ade20k", tmp_path)
    path = fx.info.root() / fx.info.splits["train"].caption_file
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    for mode in ("auto", "file"):
        with pytest.raises(DatasetError) as e:
            SegmentationDataset(fx.info, "train", captions=mode)
        assert _one_line(e.value).startswith(f"{path}: caption file") and problem in str(e.value)
    SegmentationDataset(fx.info, "train", captions="class_names")  # does not read the file


def test_header_checks_do_not_decode(tmp_path):
    """A truncated file with an intact header passes the cheap checks (and is caught when read)."""
    fx = make_fixture("coco", tmp_path, hw=(48, 48))
    ds = SegmentationDataset(fx.info, "train")
    _truncate(ds.image_path(1))
    SegmentationDataset(fx.info, "train")
    with pytest.raises(DatasetError, match="cannot read image"):
        ds.load(1)


# --- during a run: corrupt files are named, skipped and counted -------------------------------

def test_truncated_image_is_skipped_named_and_deterministic(tmp_path):
    fx = make_fixture("coco", tmp_path, n_train=4, hw=(48, 48))
    ds = SegmentationDataset(fx.info, "train", size=16, max_bad_fraction=0.5)
    expected = ds[2]
    _truncate(ds.image_path(1))
    item = ds[1]
    assert item["skipped"].startswith(f"{ds.image_path(1)}: cannot read image")
    assert item["name"] == ds.ids[2] and torch.equal(item["mask"], expected["mask"])
    assert all(ds[i]["skipped"] == "" for i in (0, 2, 3))
    again = ds[1]  # the same substitute every time, without reading the bad file again
    assert again["skipped"] == item["skipped"] and torch.equal(again["image"], item["image"])
    assert ds.bad_files == {ds.ids[1]: item["skipped"]}


def test_labels_outside_the_classes_are_skipped_ignore_value_is_not(tmp_path):
    fx = make_fixture("voc", tmp_path, n_train=4)
    ds = SegmentationDataset(fx.info, "train", max_bad_fraction=0.5)
    ok = fx.masks["train"][ds.ids[0]].copy()
    ok[0, :] = 255  # VOC's ignore value: fine
    save_png(ds.mask_path(0), ok)
    bad = fx.masks["train"][ds.ids[3]].copy()
    bad[1, 1] = 21  # VOC: 0..20 and 255
    save_png(ds.mask_path(3), bad)
    assert ds[0]["skipped"] == "" and (ds[0]["mask"] == 255).any()
    item = ds[3]
    assert item["skipped"].startswith(f"{ds.mask_path(3)}: mask values [21] are outside 0..20")
    assert item["name"] == ds.ids[0]  # the last item wraps around to the first


def test_too_many_bad_files_stop_the_run(tmp_path):
    fx = make_fixture("ade20k", tmp_path, n_train=5)
    ds = SegmentationDataset(fx.info, "train", size=8)  # default share 0.01: one file allowed
    _truncate(ds.image_path(0))
    _truncate(ds.image_path(3))
    assert ds[0]["skipped"]
    assert ds[1]["skipped"] == "" and ds[2]["skipped"] == ""
    with pytest.raises(DatasetError) as e:
        ds[3]
    msg = _one_line(e.value)
    assert msg.startswith(f"{ds.img_dir}: 2 of 5 files bad, more than the allowed share "
                          "(max_bad_fraction=0.01)") and str(ds.image_path(3)) in msg
    # a larger share lets the run go on
    lenient = SegmentationDataset(fx.info, "train", size=8, max_bad_fraction=0.4)
    assert [bool(lenient[i]["skipped"]) for i in range(5)] == [True, False, False, True, False]
    assert DatasetError(msg).args == (msg,)  # rebuilt from its message alone, as workers do


def test_dataloader_workers_pass_skips_and_the_final_error_through(tmp_path):
    fx = make_fixture("ade20k", tmp_path, n_train=6)
    ds = SegmentationDataset(fx.info, "train", size=8)
    _truncate(ds.image_path(4))
    loader = torch.utils.data.DataLoader(ds, batch_size=3, num_workers=2)
    skipped = [s for batch in loader for s in batch["skipped"] if s]
    assert len(skipped) == 1 and skipped[0].startswith(str(ds.image_path(4)))
    _truncate(ds.image_path(5))  # two bad files in the second worker's batch: too many
    with pytest.raises(DatasetError) as e:
        list(torch.utils.data.DataLoader(ds, batch_size=3, num_workers=2))
    line = error_line(e.value)  # the worker wrapped the message in its traceback
    assert "\n" in str(e.value) and line.startswith(f"{ds.img_dir}: 2 of 6 files bad")


# --- an entry point: counts what it skipped, dies in one line on too many ---------------------

@pytest.fixture(scope="module")
def toy_world(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad_toy") / "toy"
    write_toy_dataset(root, 16, 12, 2, seed=0, progress=False)
    return root


def test_toy_base_model_counts_skipped_files_and_dies_on_too_many(toy_world, tmp_path, capsys):
    info = get_dataset_info("toy", str(toy_world))
    ds = SegmentationDataset(info, "train")
    _truncate(ds.image_path(5))
    cfg = toy_base_model.ToyBaseModelConfig(data_root=str(toy_world), resolution=16)
    images, _, skipped = toy_base_model.load_images(cfg, info)
    assert len(images) == 12 and len(skipped) == 1 and skipped[0].startswith(str(ds.image_path(5)))
    _truncate(ds.image_path(8))
    with pytest.raises(SystemExit) as e:
        toy_base_model.main(["--data_root", str(toy_world), "--output_dir", str(tmp_path / "b2")] + TINY_BASE)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code != 0 and len(err) == 1
    assert err[0].startswith(f"error: {ds.img_dir}: 2 of 12 files bad") and str(ds.image_path(8)) in err[0]
    assert not (tmp_path / "b2").exists()  # stopped before writing anything


@pytest.mark.slow
def test_toy_base_model_run_logs_the_skipped_file(tmp_path):
    root = tmp_path / "toy"
    write_toy_dataset(root, 16, 12, 2, seed=0, progress=False)
    ds = SegmentationDataset(get_dataset_info("toy", str(root)), "train")
    _truncate(ds.image_path(5))
    out = tmp_path / "base"
    toy_base_model.main(["--data_root", str(root), "--output_dir", str(out)] + TINY_BASE)
    log = (out / "log.txt").read_text()
    assert f"skipped a bad file: {ds.image_path(5)}" in log and "1 bad file(s) skipped in all" in log
    assert [r["bad_files"] for r in read_jsonl(out / "metrics.jsonl") if "bad_files" in r] == [1]
    assert (out / "model_index.json").is_file()
