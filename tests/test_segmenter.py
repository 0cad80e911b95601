"""The mmseg integration: dataset class, train/evaluate/resume through train.segmenter, safe loading."""
from __future__ import annotations

import glob
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("mmseg")
pytest.importorskip("mmcv._ext")

import torch  # noqa: E402

from dataset import get_dataset_info  # noqa: E402

TOY_CONFIG = "configs/seg/toy_unet_fcn.py"


@pytest.fixture
def mmseg_scope():
    """Pipelines name mmseg transforms; outside a Runner the default scope must say so."""
    from mmengine.registry import init_default_scope

    init_default_scope("mmseg")


def _toy_pair(rng: np.random.Generator, size: int = 32):
    """A striped background with two coloured blocks whose label is their colour's class."""
    info = get_dataset_info("toy")
    img = np.full((size, size, 3), 40, np.uint8)
    img[::4] = 90  # stripes, so background is not one flat colour
    mask = np.zeros((size, size), np.uint8)
    for label in rng.choice(np.arange(1, info.num_labels), size=2, replace=False):
        h, w = rng.integers(6, 14, size=2)
        y, x = rng.integers(0, size - h), rng.integers(0, size - w)
        img[y:y + h, x:x + w] = info.palette[label]
        mask[y:y + h, x:x + w] = label
    return img, mask


def _write_folder(root: Path, split: str, n: int, seed: int, img_ext=".png", layout=("img_dir", "ann_dir")):
    rng = np.random.default_rng(seed)
    (root / layout[0] / split).mkdir(parents=True, exist_ok=True)
    (root / layout[1] / split).mkdir(parents=True, exist_ok=True)
    masks = {}
    for i in range(n):
        img, mask = _toy_pair(rng)
        Image.fromarray(img).save(root / layout[0] / split / f"{i:06d}{img_ext}")
        Image.fromarray(mask).save(root / layout[1] / split / f"{i:06d}.png")
        masks[f"{i:06d}"] = mask
    return masks


@pytest.fixture(scope="module")
def toy_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("toy")
    _write_folder(root, "train", 24, seed=0)
    _write_folder(root, "val", 8, seed=1)
    return root


def _opts(root: Path, iters: int) -> dict:
    return {
        "train_dataloader.dataset.data_root": str(root),
        "val_dataloader.dataset.data_root": str(root),
        "test_dataloader.dataset.data_root": str(root),
        "train_dataloader.batch_size": 4,
        "train_cfg.max_iters": iters,
        "train_cfg.val_interval": 1000,
        "default_hooks.checkpoint.interval": 2,
        "default_hooks.checkpoint.max_keep_ckpts": 10,
        "default_hooks.logger.interval": 1,
    }


def _cli_opts(opts: dict) -> list[str]:
    return ["--cfg-options", *[f"{k}={v}" for k, v in opts.items()]]


def test_dataset_reads_generated_folder(tmp_path, mmseg_scope):
    from dataset.mmseg_datasets import JoDiffusionSegDataset

    masks = _write_folder(tmp_path, "train", 5, seed=3)
    pipeline = [dict(type="LoadImageFromFile"), dict(type="LoadAnnotations"), dict(type="PackSegInputs")]
    ds = JoDiffusionSegDataset(dataset_name="toy", source="synthetic", split="train",
                               data_root=str(tmp_path), pipeline=pipeline)
    info = get_dataset_info("toy")
    assert len(ds) == 5
    assert tuple(ds.metainfo["classes"]) == info.seg_classes
    assert [tuple(c) for c in ds.metainfo["palette"]] == list(info.seg_palette)
    item = ds[2]
    assert tuple(item["inputs"].shape) == (3, 32, 32)
    gt = item["data_samples"].gt_sem_seg.data[0].numpy()
    name = Path(item["data_samples"].img_path).stem
    np.testing.assert_array_equal(gt, masks[name])


def test_dataset_real_layout_reduce_zero_label(tmp_path, mmseg_scope):
    """ADE20K's real layout, with reduce_zero_label taken from dataset/ade20k_semantic.py."""
    from dataset.mmseg_datasets import JoDiffusionSegDataset

    spec = get_dataset_info("ade20k").splits["val"]
    root = tmp_path / "ade"
    for d in (spec.img_dir, spec.ann_dir):
        (root / d).mkdir(parents=True)
    mask = np.zeros((16, 16), np.uint8)
    mask[4:8] = 1
    mask[8:12] = 150
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(root / spec.img_dir / "a.jpg")
    Image.fromarray(mask).save(root / spec.ann_dir / "a.png")
    pipeline = [dict(type="LoadImageFromFile"), dict(type="LoadAnnotations"), dict(type="PackSegInputs")]
    ds = JoDiffusionSegDataset(dataset_name="ade20k", source="real", split="val",
                               data_root=str(root), pipeline=pipeline)
    assert len(ds.metainfo["classes"]) == 150
    gt = ds[0]["data_samples"].gt_sem_seg.data[0].numpy()
    assert gt[0, 0] == 255 and gt[5, 0] == 0 and gt[9, 0] == 149


def test_dataset_missing_folder_names_it(tmp_path):
    from dataset.mmseg_datasets import JoDiffusionSegDataset
    from dataset.segmentation import DatasetError

    with pytest.raises(DatasetError, match="img_dir/train"):
        JoDiffusionSegDataset(dataset_name="toy", source="synthetic", data_root=str(tmp_path))


def test_train_evaluate_resume_predict(toy_root, tmp_path, capsys):
    from models.segmenter import load_trusted_checkpoint, predict, train_and_evaluate
    from train.segmenter import main

    info = get_dataset_info("toy")
    straight = tmp_path / "straight"
    result = train_and_evaluate(TOY_CONFIG, straight, _opts(toy_root, 4))
    assert 0.0 <= result["mIoU"] <= 1.0 and result["iters"] == 4
    assert list(result["per_class_IoU"]) == list(info.seg_classes)
    for it in (2, 4):
        assert (straight / f"iter_{it}.pth").is_file() and (straight / f"iter_{it}.pth.sha256").is_file()

    # a run that stopped after the iteration-2 checkpoint, resumed, ends where the straight run did
    work = tmp_path / "interrupted"
    work.mkdir()
    for name in ("iter_2.pth", "iter_2.pth.sha256"):
        shutil.copy(straight / name, work / name)
    (work / "last_checkpoint").write_text(str(work / "iter_2.pth"))
    main([TOY_CONFIG, "--work-dir", str(work), "--resume", *_cli_opts(_opts(toy_root, 4))])
    logs = "\n".join(Path(p).read_text() for p in glob.glob(str(work / "*" / "*.log")))
    assert "resumed epoch: 0, iter: 2" in logs
    resumed = load_trusted_checkpoint(work / "iter_4.pth")
    uninterrupted = load_trusted_checkpoint(straight / "iter_4.pth")
    assert resumed["meta"]["iter"] == uninterrupted["meta"]["iter"] == 4
    for k, v in uninterrupted["state_dict"].items():
        torch.testing.assert_close(resumed["state_dict"][k], v, msg=f"{k} differs after resume")

    # --eval-only reports mIoU of the checkpoint on the val split
    metrics = main([TOY_CONFIG, "--work-dir", str(tmp_path / "eval"), "--eval-only",
                    "--checkpoint", str(work / "iter_4.pth"), *_cli_opts(_opts(toy_root, 4))])
    assert 0.0 <= metrics["mIoU"] <= 100.0

    # predict() on RGB arrays agrees with mmseg's own evaluation of the same checkpoint
    val_imgs = sorted((toy_root / "img_dir/val").glob("*.png"))
    images = [np.asarray(Image.open(p).convert("RGB")) for p in val_imgs]
    gts = np.stack([np.asarray(Image.open(toy_root / "ann_dir/val" / p.name)) for p in val_imgs])
    masks = predict(TOY_CONFIG, work / "iter_4.pth", images)
    assert masks.shape == (len(images), 32, 32) and masks.dtype == np.uint8
    assert masks.max() < info.num_labels
    ious = []
    for c in range(info.num_labels):
        union = np.logical_or(masks == c, gts == c).sum()
        if union:
            ious.append(np.logical_and(masks == c, gts == c).sum() / union)
    assert abs(float(np.mean(ious)) - metrics["mIoU"] / 100) < 0.01

    # a checkpoint changed after we wrote it is refused
    tampered = tmp_path / "tampered.pth"
    shutil.copy(work / "iter_4.pth", tampered)
    shutil.copy(work / "iter_4.pth.sha256", tampered.with_name("tampered.pth.sha256"))
    with open(tampered, "ab") as f:
        f.write(b"\0")
    with pytest.raises(SystemExit) as e:
        main([TOY_CONFIG, "--work-dir", str(tmp_path / "eval2"), "--eval-only", "--checkpoint", str(tampered)])
    assert e.value.code == 2
    assert "differs from the recorded" in capsys.readouterr().err


class _Payload:
    """Unpickling this creates a marker file: proof that the payload ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_foreign_checkpoint_is_never_unpickled(toy_root, tmp_path, capsys):
    from models.segmenter import UntrustedCheckpointError, load_trusted_checkpoint, record_checkpoint
    from train.segmenter import main

    marker = tmp_path / "payload_ran"
    evil = tmp_path / "iter_100.pth"
    evil.write_bytes(pickle.dumps({"meta": {"iter": 100}, "state_dict": _Payload(marker)}))
    # sanity: a plain unpickler *would* run it (so the checks below can fail)
    pickle.loads(evil.read_bytes())
    assert marker.exists()
    marker.unlink()

    with pytest.raises(UntrustedCheckpointError, match="did not write"):
        load_trusted_checkpoint(evil)
    with pytest.raises(SystemExit) as e:
        main([TOY_CONFIG, "--work-dir", str(tmp_path / "w"), "--eval-only", "--checkpoint", str(evil)])
    assert e.value.code == 2 and "did not write" in capsys.readouterr().err
    # --resume finds it through last_checkpoint, the Runner refuses it too
    (tmp_path / "w2").mkdir()
    (tmp_path / "w2" / "last_checkpoint").write_text(str(evil))
    with pytest.raises(SystemExit) as e:
        main([TOY_CONFIG, "--work-dir", str(tmp_path / "w2"), "--resume", *_cli_opts(_opts(toy_root, 4))])
    assert e.value.code == 2 and "did not write" in capsys.readouterr().err
    # even a forged sha256 record does not get it unpickled: weights_only refuses the global
    evil_zip = tmp_path / "iter_200.pth"  # torch.save's zip format, too
    torch.save({"meta": {"iter": 200}, "state_dict": _Payload(marker)}, evil_zip)
    for path in (evil, evil_zip):
        record_checkpoint(path)
        with pytest.raises(UntrustedCheckpointError, match="weights-only"):
            load_trusted_checkpoint(path)
    assert not marker.exists()


def test_configs_parse_and_match_dataset_info():
    from models.segmenter import load_seg_config

    configs = sorted(glob.glob("configs/seg/*.py"))
    assert len(configs) >= 14
    for path in configs:
        cfg = load_seg_config(path)
        ds = cfg.train_dataloader.dataset
        ds = ds.datasets[0] if ds.type == "ConcatDataset" else ds
        info = get_dataset_info(ds.dataset_name)
        assert cfg.model.decode_head.num_classes == len(info.seg_classes), path
        if "auxiliary_head" in cfg.model:
            assert cfg.model.auxiliary_head.num_classes == len(info.seg_classes), path
        assert cfg.val_dataloader.dataset.source == "real", path
        if Path(path).name.startswith("toy_"):  # real configs: tests/test_segmenter_pretrained.py
            assert cfg.model.backbone.get("init_cfg") is None, f"{path}: the toy needs no download"
    # a shortened run moves the LR schedule end with it
    cfg = load_seg_config(TOY_CONFIG, {"train_cfg.max_iters": 30})
    assert cfg.param_scheduler[0].end == 30
