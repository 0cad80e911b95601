"""Pretrained backbones of the real segmenter configs (issue #16, point 1): MMSegmentation's
checkpoints by default, one override for training from scratch, a local file accepted, and no
network + no cached copy -> one line before anything is built. No real ResNet is built or trained."""
from __future__ import annotations

import glob
import pickle
import re
from pathlib import Path
from urllib.error import URLError

import pytest

pytest.importorskip("mmseg")
pytest.importorskip("mmcv._ext")

import torch  # noqa: E402

import models.segmenter as seg  # noqa: E402
from models.segmenter import PretrainedUnavailableError, load_seg_config, prepare_pretrained  # noqa: E402
from train.segmenter import main, parse_args  # noqa: E402
from tests.fixtures_datasets import make_mmseg_folder  # noqa: E402

TOY_CONFIG = Path("configs/seg/toy_unet_fcn.py").resolve()
# MMSegmentation 1.2.2: deeplabv3plus_r50-d8 -> open-mmlab://resnet50_v1c, the r101-d8 configs
# -> open-mmlab://resnet101_v1c, mask2former_r50_8xb2-160k_ade20k-512x512 -> torchvision://resnet50
EXPECTED = {"deeplabv3plus_r50": ("ResNetV1c", 50, "open-mmlab://resnet50_v1c"),
            "deeplabv3plus_r101": ("ResNetV1c", 101, "open-mmlab://resnet101_v1c"),
            "mask2former_r50": ("ResNet", 50, "torchvision://resnet50")}
# mask2former_r50_8xb2-160k_ade20k-512x512.py: scales=[int(512 * x * 0.1) for x in range(5, 21)]
RECIPE_SCALES = [256, 307, 358, 409, 460, 512, 563, 614, 665, 716, 768, 819, 870, 921, 972, 1024]


def _real_configs() -> list[str]:
    return sorted(p for p in glob.glob("configs/seg/*.py") if not Path(p).name.startswith("toy_"))


@pytest.fixture
def torch_home(tmp_path, monkeypatch) -> Path:
    """An empty torch hub cache: nothing is downloaded or cached for these tests."""
    home = tmp_path / "torch_home"
    monkeypatch.setenv("TORCH_HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert Path(torch.hub.get_dir()) == home / "hub"
    return home


def _fake_state_dict(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": {"conv1.weight": torch.ones(2, 3, 1, 1)}}, path)
    return path


def _toy_with_pretrained(tmp_path: Path, checkpoint: str) -> Path:
    """The toy config whose backbone asks for a pretrained checkpoint."""
    cfg = tmp_path / "toy_pretrained.py"
    cfg.write_text(f'_base_ = ["{TOY_CONFIG}"]\n'
                   f'model = dict(backbone=dict(init_cfg=dict(_delete_=True, type="Pretrained",\n'
                   f'                                         checkpoint="{checkpoint}")))\n')
    return cfg


def _toy_data(root: Path) -> Path:
    return make_mmseg_folder(root, 4, 2, "{}")


def _tiny_run(root: Path) -> list[str]:
    return ["--cfg-options", f"train_dataloader.dataset.data_root={root}",
            f"val_dataloader.dataset.data_root={root}", f"test_dataloader.dataset.data_root={root}",
            "train_dataloader.batch_size=2", "train_cfg.max_iters=1", "train_cfg.val_interval=1",
            "default_hooks.checkpoint.interval=1"]


def test_real_configs_start_from_mmseg_checkpoints():
    configs = _real_configs()
    assert len(configs) == 12
    for path in configs:
        cfg = load_seg_config(path)
        arch = next(a for a in EXPECTED if a in Path(path).name)
        kind, depth, checkpoint = EXPECTED[arch]
        backbone = cfg.model.backbone
        assert (backbone.type, backbone.depth) == (kind, depth), path
        assert backbone.init_cfg == dict(type="Pretrained", checkpoint=checkpoint), path
        assert not cfg.model.get("pretrained"), path
    for path in glob.glob("configs/seg/toy_*.py"):
        assert load_seg_config(path).model.backbone.init_cfg is None, f"{path}: the toy stays offline"


def test_checkpoint_names_resolve_to_torch_hub_cache(torch_home):
    urls = {name: seg.checkpoint_url(name) for _, _, name in EXPECTED.values()}
    assert urls["open-mmlab://resnet50_v1c"].startswith("https://download.openmmlab.com/")
    assert re.search(r"/resnet101_v1c-\w+\.pth$", urls["open-mmlab://resnet101_v1c"])
    assert re.search(r"/resnet50-\w+\.pth$", urls["torchvision://resnet50"])
    for url in urls.values():
        assert seg.cached_checkpoint_path(url).parent == torch_home / "hub" / "checkpoints"
    assert seg.checkpoint_url("/some/file.pth") is None


def test_mask2former_trains_with_mmseg_recipe_pipeline():
    from mmengine.dataset import Compose
    from mmengine.registry import init_default_scope

    init_default_scope("mmseg")
    configs = sorted(glob.glob("configs/seg/*_mask2former_r50_synthetic.py"))
    assert len(configs) == 3
    for path in configs:
        cfg = load_seg_config(path)
        pipe = cfg.train_dataloader.dataset.pipeline
        assert [t.type for t in pipe] == ["LoadImageFromFile", "LoadAnnotations", "RandomChoiceResize",
                                          "RandomCrop", "RandomFlip", "PhotoMetricDistortion",
                                          "PackSegInputs"], path
        resize, crop = pipe[2], pipe[3]
        assert resize.scales == RECIPE_SCALES and resize.resize_type == "ResizeShortestEdge"
        assert resize.max_size == 2048
        assert tuple(crop.crop_size) == (512, 512) and crop.cat_max_ratio == 0.75
        assert pipe[4].prob == 0.5
        assert cfg.synthetic_train.pipeline == pipe and cfg.real_train.pipeline == pipe
        Compose(pipe)  # every step is a registered transform
    # DeepLabV3+ keeps its own recipe (RandomResize 0.5-2.0 of 2048x512)
    cfg = load_seg_config("configs/seg/voc_deeplabv3plus_r101_synthetic.py")
    assert "RandomChoiceResize" not in [t.type for t in cfg.train_dataloader.dataset.pipeline]


def test_offline_without_checkpoint_stops_before_anything_is_built(tmp_path, torch_home, capsys):
    cfg = _toy_with_pretrained(tmp_path, "open-mmlab://resnet50_v1c")
    work = tmp_path / "work"
    with pytest.raises(SystemExit) as e:
        main([str(cfg), "--work-dir", str(work), "--cfg-options",
              f"train_dataloader.dataset.data_root={tmp_path / 'no_data'}"])
    assert e.value.code != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    line = err[0]
    assert line.startswith("error: open-mmlab://resnet50_v1c: ")
    assert "HF_HUB_OFFLINE" in line and str(torch_home / "hub" / "checkpoints") in line
    assert "--cfg-options model.backbone.init_cfg.checkpoint=/path/resnet50_v1c" in line
    assert "model.backbone.init_cfg=None" in line
    assert not work.exists(), "stopped before the Runner (which makes the work dir)"


def test_failed_download_stops_with_one_line(tmp_path, torch_home, monkeypatch, capsys):
    monkeypatch.delenv("HF_HUB_OFFLINE")

    def no_network(url, dst):
        raise URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(seg, "_download", no_network)
    cfg = _toy_with_pretrained(tmp_path, "torchvision://resnet50")
    with pytest.raises(SystemExit) as e:
        main([str(cfg), "--work-dir", str(tmp_path / "work")])
    assert e.value.code != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: torchvision://resnet50: ")
    assert "download failed" in err[0] and "name resolution" in err[0]


def test_cached_or_downloaded_checkpoint_becomes_a_local_file(tmp_path, torch_home, monkeypatch):
    cfg = load_seg_config(_toy_with_pretrained(tmp_path, "open-mmlab://resnet50_v1c"))
    url = seg.checkpoint_url("open-mmlab://resnet50_v1c")
    cached = _fake_state_dict(seg.cached_checkpoint_path(url))
    assert prepare_pretrained(cfg) == {"model.backbone.init_cfg.checkpoint": str(cached)}
    assert cfg.model.backbone.init_cfg.checkpoint == str(cached)

    # online and not cached: downloaded once into the cache
    monkeypatch.delenv("HF_HUB_OFFLINE")
    got = []
    monkeypatch.setattr(seg, "_download", lambda u, dst: got.append(u) or _fake_state_dict(dst))
    cfg = load_seg_config(_toy_with_pretrained(tmp_path, "torchvision://resnet50"))
    (path,) = prepare_pretrained(cfg).values()
    assert got == [seg.checkpoint_url("torchvision://resnet50")] and Path(path).is_file()


def test_scratch_override_leaves_no_pretrained_weights(tmp_path, torch_home):
    for path in _real_configs():
        args = parse_args([path, "--work-dir", str(tmp_path), "--cfg-options", "model.backbone.init_cfg=None"])
        cfg = load_seg_config(args.config, args.cfg_options)
        assert cfg.model.backbone.init_cfg is None, path
        assert prepare_pretrained(cfg) == {}, path
    # through the entry point: offline, no cache, and it trains
    root = _toy_data(tmp_path / "data")
    cfg = _toy_with_pretrained(tmp_path, "open-mmlab://resnet50_v1c")
    argv = [str(cfg), "--work-dir", str(tmp_path / "scratch"), *_tiny_run(root)]
    main(argv + ["model.backbone.init_cfg=None"])
    assert (tmp_path / "scratch" / "final_metrics.json").is_file()


def test_local_checkpoint_is_checked_and_loaded(tmp_path, torch_home, capsys):
    from mmengine.registry import init_default_scope
    from mmseg.registry import MODELS

    init_default_scope("mmseg")
    cfg = load_seg_config(_toy_with_pretrained(tmp_path, "unused"))
    cfg.model.backbone.init_cfg = None
    backbone = MODELS.build(cfg.model).backbone
    state = {k: torch.full_like(v, 0.25) if v.is_floating_point() else v for k, v in backbone.state_dict().items()}
    local = tmp_path / "my_backbone.pth"
    torch.save(state, local)

    cfg = load_seg_config(_toy_with_pretrained(tmp_path, str(local)))
    assert prepare_pretrained(cfg) == {"model.backbone.init_cfg.checkpoint": str(local)}
    model = MODELS.build(cfg.model)
    model.init_weights()
    first = next(iter(model.backbone.state_dict().items()))
    assert torch.all(first[1] == 0.25), f"{first[0]} was not loaded from the local file"

    # the same file passed with the documented flag, through the entry point
    root = _toy_data(tmp_path / "data")
    work = tmp_path / "local"
    main([str(_toy_with_pretrained(tmp_path, "open-mmlab://resnet50_v1c")), "--work-dir", str(work),
          *_tiny_run(root), f"model.backbone.init_cfg.checkpoint={local}"])
    logs = "\n".join(Path(p).read_text() for p in glob.glob(str(work / "*" / "*.log")))
    assert f"Loads checkpoint by local backend from path: {local}" in logs

    # a missing local file: one line naming it
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main([str(_toy_with_pretrained(tmp_path, str(tmp_path / "nope.pth"))), "--work-dir", str(work)])
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {tmp_path / 'nope.pth'}: ") and "not found" in err[0]


class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_truncated_or_unsafe_pretrained_file_is_refused(tmp_path):
    good = _fake_state_dict(tmp_path / "good.pth")
    seg.check_pretrained_file(good, "good")
    cut = tmp_path / "cut.pth"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(PretrainedUnavailableError, match="cannot read"):
        seg.check_pretrained_file(cut, "cut")
    marker = tmp_path / "payload_ran"
    evil = tmp_path / "evil.pth"
    torch.save({"state_dict": _Payload(marker)}, evil)
    with pytest.raises(PretrainedUnavailableError, match="weights-only"):
        seg.check_pretrained_file(evil, "evil")
    assert not marker.exists()
    pickle.loads(pickle.dumps(_Payload(marker)))  # the payload is real: plain unpickling runs it
    assert marker.exists()
