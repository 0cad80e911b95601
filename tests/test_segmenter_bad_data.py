"""Bad data in the segmenter stage (issue #16, point 7): one line naming the file and a non-zero
exit, never a traceback; a training file found corrupt mid-run is skipped and counted."""
from __future__ import annotations

import glob
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("mmseg")
pytest.importorskip("mmcv._ext")

from dataset.mmseg_datasets import JoDiffusionSegDataset  # noqa: E402
from dataset.segmentation import DatasetError  # noqa: E402
from tests.fixtures_datasets import make_mmseg_folder  # noqa: E402
from train.segmenter import main  # noqa: E402

TOY_CONFIG = "configs/seg/toy_unet_fcn.py"
SYNTHETIC_CONFIG = "configs/seg/toy_unet_fcn_synthetic.py"
PIPELINE = [dict(type="LoadImageFromFile"), dict(type="LoadAnnotations"), dict(type="PackSegInputs")]


@pytest.fixture
def mmseg_scope():
    from mmengine.registry import init_default_scope

    init_default_scope("mmseg")


def _folder(root: Path, n_train: int = 6, n_val: int = 2) -> Path:
    return make_mmseg_folder(root, n_train, n_val)


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # the header survives, the pixel data does not


def _run(config: str, work: Path, train_root: Path, val_root: Path, *extra: str) -> dict:
    main([config, "--work-dir", str(work), "--cfg-options",
          f"train_dataloader.dataset.data_root={train_root}", f"val_dataloader.dataset.data_root={val_root}",
          f"test_dataloader.dataset.data_root={val_root}", "train_dataloader.batch_size=2",
          "train_cfg.max_iters=3", "train_cfg.val_interval=3", "default_hooks.checkpoint.interval=3",
          "default_hooks.logger.interval=1", *extra])
    return json.loads((work / "final_metrics.json").read_text())


def _dies(capsys, *args) -> str:
    with pytest.raises(SystemExit) as e:
        _run(*args)
    assert e.value.code != 0
    err = capsys.readouterr().err
    # mmengine/mmseg log and warn while the Runner starts; the error is the one last line
    assert "Traceback" not in err, err
    errors = [l for l in err.splitlines() if l.startswith("error: ")]
    assert len(errors) == 1 and err.strip().splitlines()[-1] == errors[0], err
    return errors[0]


def test_missing_roots_name_the_folder(tmp_path, capsys):
    good = _folder(tmp_path / "good")
    line = _dies(capsys, TOY_CONFIG, tmp_path / "w1", tmp_path / "no_such_root", good)
    assert f"error: {tmp_path / 'no_such_root'}: " in line and "data_root=" in line
    line = _dies(capsys, SYNTHETIC_CONFIG, tmp_path / "w2", tmp_path / "no_generated_set", good)
    assert f"error: {tmp_path / 'no_generated_set'}: synthetic data folder" in line
    (tmp_path / "half" / "img_dir" / "train").mkdir(parents=True)
    line = _dies(capsys, SYNTHETIC_CONFIG, tmp_path / "w3", tmp_path / "half", good)
    assert f"error: {tmp_path / 'half' / 'ann_dir' / 'train'}: folder" in line


def test_header_problems_stop_before_training(tmp_path, capsys):
    good = _folder(tmp_path / "good")
    cases = {}
    root = _folder(tmp_path / "no_mask")
    (root / "ann_dir/train/002.png").unlink()
    cases["no_mask"] = (root, "img_dir/train/002.png", "image has no mask")
    root = _folder(tmp_path / "size")
    Image.fromarray(np.zeros((16, 32), np.uint8)).save(root / "ann_dir/train/001.png")
    cases["size"] = (root, "img_dir/train/001.png", "is 32x32 but its mask")
    root = _folder(tmp_path / "unreadable")
    (root / "img_dir/train/003.png").write_bytes(b"not an image at all")
    cases["unreadable"] = (root, "img_dir/train/003.png", "cannot read image")
    root = _folder(tmp_path / "colour")
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(root / "ann_dir/train/000.png")
    cases["colour"] = (root, "ann_dir/train/000.png", "mode RGB")
    for name, (root, bad, problem) in cases.items():
        line = _dies(capsys, TOY_CONFIG, tmp_path / f"w_{name}", root, good)
        assert line.startswith(f"error: {root / bad}: ") and problem in line, (name, line)
        assert not glob.glob(str(tmp_path / f"w_{name}" / "*.pth")), "no training step ran"
    # the val split is checked before training too
    val_root = _folder(tmp_path / "val_no_mask")
    (val_root / "ann_dir/val/001.png").unlink()
    line = _dies(capsys, TOY_CONFIG, tmp_path / "w_val", good, val_root)
    assert line.startswith(f"error: {val_root / 'img_dir/val/001.png'}: image has no mask")
    assert not glob.glob(str(tmp_path / "w_val" / "*.pth"))


def test_unfinished_generated_pair_is_named(tmp_path, mmseg_scope):
    root = _folder(tmp_path / "gen", n_val=0)
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(root / "img_dir/train/099.png")
    (root / "img_dir/train/.100.png.abc.tmp.png").write_bytes(b"")  # a writer's temporary: not a pair
    with pytest.raises(DatasetError, match=r"099\.png: image has no mask .*unfinished generation"):
        JoDiffusionSegDataset(dataset_name="toy", source="synthetic", data_root=str(root), pipeline=PIPELINE)
    (root / "img_dir/train/099.png").unlink()
    assert len(JoDiffusionSegDataset(dataset_name="toy", source="synthetic", data_root=str(root),
                                     pipeline=PIPELINE)) == 6


def test_generated_jpg_set_is_read(tmp_path, mmseg_scope):
    """inference.generate --image_format jpg: dataset.json names the suffix."""
    root = _folder(tmp_path / "gen", n_val=0)
    for p in sorted((root / "img_dir/train").glob("*.png")):
        Image.open(p).save(p.with_suffix(".jpg"))
        p.unlink()
    (root / "dataset.json").write_text(json.dumps({"dataset": "toy", "img_suffix": ".jpg"}))
    ds = JoDiffusionSegDataset(dataset_name="toy", source="synthetic", data_root=str(root), pipeline=PIPELINE)
    assert len(ds) == 6 and ds[0]["data_samples"].img_path.endswith(".jpg")


def test_corrupt_file_mid_run_is_skipped_then_counted(tmp_path, mmseg_scope):
    root = _folder(tmp_path / "d", n_train=10)
    _truncate(root / "img_dir/train/003.png")
    Image.fromarray(np.full((32, 32), 7, np.uint8)).save(root / "ann_dir/train/005.png")  # toy has 0..5
    ds = JoDiffusionSegDataset(dataset_name="toy", data_root=str(root), pipeline=PIPELINE,
                               max_bad_fraction=0.2)  # built: headers are fine
    item = ds[3]
    assert item["data_samples"].img_path.endswith("004.png")  # the next good one
    assert item["data_samples"].metainfo["skipped"].startswith(str(root / "img_dir/train/003.png"))
    assert ds[4]["data_samples"].metainfo["skipped"] == ""
    item = ds[5]
    assert item["data_samples"].img_path.endswith("006.png")
    skipped = item["data_samples"].metainfo["skipped"]
    assert skipped.startswith(f"{root / 'ann_dir/train/005.png'}: mask values [7] are outside 0..5")
    assert len(ds.bad_files) == 2
    # one more than the allowed share (2 of 10): a clear error naming the file
    Image.fromarray(np.full((32, 32), 9, np.uint8)).save(root / "ann_dir/train/007.png")
    with pytest.raises(DatasetError, match=r"007\.png: mask values \[9\].* 3 of 10 files bad"):
        ds[7]
    # evaluation does not substitute: a corrupt val file stops it
    val = JoDiffusionSegDataset(dataset_name="toy", data_root=str(root), pipeline=PIPELINE, test_mode=True)
    with pytest.raises(DatasetError, match=r"ann_dir/train/005\.png: mask values"):
        val[5]
    with pytest.raises(DatasetError, match=r"img_dir/train/003\.png: cannot read the pair"):
        val[3]


def test_run_goes_on_past_one_bad_file_and_counts_it(tmp_path):
    root = _folder(tmp_path / "d", n_train=6)
    _truncate(root / "img_dir/train/002.png")
    metrics = _run(TOY_CONFIG, tmp_path / "w", root, root, "train_dataloader.batch_size=6")
    assert metrics["bad_files"] == 1 and metrics["iters"] == 3
    logs = "\n".join(Path(p).read_text() for p in glob.glob(str(tmp_path / "w" / "*" / "*.log")))
    assert f"skipped a corrupt training file: {root / 'img_dir/train/002.png'}" in logs
    # the count is in every train log line (and so in vis_data/scalars.json)
    iters = [l for l in logs.splitlines() if "Iter(train)" in l]
    assert len(iters) == 3 and all(l.endswith("bad_files: 1") for l in iters), iters


def test_too_many_bad_labels_stop_the_run_in_a_worker(tmp_path, capsys):
    root = _folder(tmp_path / "d", n_train=6)
    for i in (0, 1, 2):
        Image.fromarray(np.full((32, 32), 200, np.uint8)).save(root / f"ann_dir/train/{i:03d}.png")
    line = _dies(capsys, TOY_CONFIG, tmp_path / "w", root, root, "train_dataloader.num_workers=1",
                 "train_dataloader.sampler.shuffle=False")
    assert line.startswith(f"error: {root}/ann_dir/train/00") and "mask values [200]" in line
    assert "files bad, more than the allowed share" in line and "DatasetError" not in line
