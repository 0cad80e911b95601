"""The downstream segmenter (stage 5): mmseg configs run through mmengine's Runner, with
checkpoints that only load when this project wrote them.

    python -m train.segmenter configs/seg/toy_unet_fcn.py --work-dir runs/seg/toy

In-process helpers for the benchmark:

    metrics = train_and_evaluate("configs/seg/toy_unet_fcn.py", "runs/seg/toy",
                                 {"train_cfg.max_iters": 300})
    masks = predict("configs/seg/toy_unet_fcn.py", "runs/seg/toy/iter_300.pth", rgb_images)

Safe checkpoint loading
-----------------------
torch >= 2.6 loads with ``weights_only=True``; a stock mmengine checkpoint also pickles the
message hub (``HistoryBuffer`` objects whose bound methods unpickle through
``builtins.getattr``, numpy arrays and scalars), which that unpickler refuses. Allow-listing
``getattr`` would reopen arbitrary code execution, so we do not: ``TrustedRunner`` instead
writes checkpoints that need nothing beyond torch's default allow-list (``HistoryBuffer`` ->
a dict of tensors, numpy -> tensors / Python numbers, restored on load). Two independent
guards apply to every checkpoint it loads (``--resume``, ``--checkpoint``/``load_from``,
``predict``):

1. Provenance: each saved checkpoint gets ``<ckpt>.sha256`` beside it. Before reading a
   checkpoint we hash it and refuse it (``UntrustedCheckpointError``, nothing unpickled)
   unless the record exists and matches. A file the project did not write, or one changed
   after it was written, never reaches ``torch.load``.
2. Content: the file is read with an explicit ``torch.load(..., weights_only=True)`` and no
   added globals, so even a file with a forged record cannot run a ``__reduce__`` payload.

Pretrained backbones
--------------------
The real configs start their backbone from the ImageNet checkpoint MMSegmentation's recipe
uses (``init_cfg=dict(type="Pretrained", checkpoint="open-mmlab://resnet50_v1c")``, ...).
``prepare_pretrained`` runs before anything is built: it resolves such a name to its URL as
mmengine does, uses the copy in torch hub's cache (``<torch hub dir>/checkpoints/<file name>``,
where mmengine's download puts it) or downloads it there once, checks that it reads with
``torch.load(weights_only=True)`` as a dict of tensors, and points ``init_cfg.checkpoint`` at
that local file, so the Runner never goes to the network. Without network (or with
``HF_HUB_OFFLINE=1``) and no cached copy it raises one line naming the checkpoint and the
two ways on (``LOCAL_CHECKPOINT_OPTION``, ``SCRATCH_OPTION``).
"""
from __future__ import annotations

import copy
import hashlib
import importlib
import os
import os.path as osp
import pickle
import socket
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Sequence
from urllib.parse import urlparse

import numpy as np
import torch
from mmengine.config import Config
from mmengine.dist import is_main_process
from mmengine.hooks import Hook
from mmengine.logging.history_buffer import HistoryBuffer
from mmengine.runner import Runner
from mmengine.runner.checkpoint import get_deprecated_model_names, get_external_models

from utils.io import atomic_write_json, atomic_write_text

CUSTOM_IMPORT = "dataset.mmseg_datasets"
SHA_SUFFIX = ".sha256"


# the one override each for the backbone (documented in the config headers and scripts/seg/*.sh)
SCRATCH_OPTION = "--cfg-options model.backbone.init_cfg=None"
LOCAL_CHECKPOINT_OPTION = "--cfg-options model.backbone.init_cfg.checkpoint=/path/to/file.pth"
DOWNLOAD_TIMEOUT_S = 60  # per socket operation: a firewalled node fails fast instead of hanging


class UntrustedCheckpointError(ValueError):
    """A checkpoint that this project did not write (no or wrong ``.sha256`` record)."""


class PretrainedUnavailableError(ValueError):
    """A pretrained backbone checkpoint that is neither local nor downloadable, or unreadable."""


_HISTORY_BUFFER = "__jodiffusion_history_buffer__"


def to_plain(x):
    """A copy of ``x`` that ``torch.load(weights_only=True)`` reads with torch's default
    allow-list: HistoryBuffers become tagged dicts of tensors, numpy values tensors/numbers."""
    if isinstance(x, torch.Tensor):
        return x
    if isinstance(x, HistoryBuffer):
        log, count = x.data
        return {_HISTORY_BUFFER: True, "max_length": int(x.max_length),
                "log": torch.from_numpy(np.asarray(log, dtype=np.float64).copy()),
                "count": torch.from_numpy(np.asarray(count, dtype=np.int64).copy())}
    if isinstance(x, np.ndarray):
        return torch.from_numpy(x.copy()) if x.dtype.kind in "biuf" else to_plain(x.tolist())
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, OrderedDict):
        return OrderedDict((k, to_plain(v)) for k, v in x.items())
    if isinstance(x, dict):
        return {k: to_plain(v) for k, v in x.items()}
    if isinstance(x, list):
        return [to_plain(v) for v in x]
    if isinstance(x, tuple) and not hasattr(x, "_fields"):
        return tuple(to_plain(v) for v in x)
    return x


def from_plain(x):
    """Undo ``to_plain`` for HistoryBuffers (what mmengine's MessageHub expects on resume)."""
    if isinstance(x, dict) and x.get(_HISTORY_BUFFER) is True:
        return HistoryBuffer(x["log"].numpy(), x["count"].numpy(), x["max_length"])
    if isinstance(x, OrderedDict):
        return OrderedDict((k, from_plain(v)) for k, v in x.items())
    if isinstance(x, dict):
        return {k: from_plain(v) for k, v in x.items()}
    if isinstance(x, list):
        return [from_plain(v) for v in x]
    return x


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def record_checkpoint(path: str | Path) -> Path:
    """Write ``<path>.sha256`` (``sha256sum`` format): 'this project wrote this file'."""
    path = Path(path)
    side = path.with_name(path.name + SHA_SUFFIX)
    atomic_write_text(side, f"{sha256_file(path)}  {path.name}\n")
    return side


def verify_checkpoint(path: str | Path) -> None:
    """Raise ``UntrustedCheckpointError`` unless ``<path>.sha256`` exists and matches the file."""
    path = Path(path)
    if not path.is_file():
        raise UntrustedCheckpointError(f"{path}: checkpoint not found")
    side = path.with_name(path.name + SHA_SUFFIX)
    if not side.is_file():
        raise UntrustedCheckpointError(
            f"{path}: no {side.name} record, so this project did not write it; refusing to "
            f"unpickle it (only checkpoints saved by train/segmenter.py load)")
    recorded = side.read_text().split()[0] if side.read_text().split() else ""
    actual = sha256_file(path)
    if recorded != actual:
        raise UntrustedCheckpointError(
            f"{path}: sha256 {actual[:12]}... differs from the recorded {recorded[:12]}...; the "
            f"file changed after this project wrote it; refusing to load it")


def load_trusted_checkpoint(path: str | Path, map_location="cpu") -> dict:
    """Verify the sha256 record, then ``torch.load(weights_only=True)`` (default allow-list)."""
    verify_checkpoint(path)
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        # keep torch's one line that names the refused global, not its advice to unpickle anyway
        why = next((l.strip() for l in str(e).splitlines() if "WeightsUnpickler error" in l), str(e))
        raise UntrustedCheckpointError(f"{path}: refused by the weights-only unpickler ({why})") from None
    for key in ckpt:
        if key != "state_dict":
            ckpt[key] = from_plain(ckpt[key])
    return ckpt


class _PlainCheckpointHook(Hook):
    """Runs last before a save, so whatever other hooks added is converted too."""

    priority = "VERY_LOW"

    def before_save_checkpoint(self, runner, checkpoint: dict) -> None:
        for key in list(checkpoint):
            if key != "state_dict":
                checkpoint[key] = to_plain(checkpoint[key])


class _BadFileHook(Hook):
    """Names each training file the dataset skipped as corrupt (``metainfo["skipped"]``, see
    dataset/mmseg_datasets.py) once in the log, and keeps their count: ``bad_files`` in the
    train log lines and vis_data/scalars.json, and in final_metrics.json. Counts what this
    process's batches carried."""

    priority = "NORMAL"  # before LoggerHook (BELOW_NORMAL), so the iteration's log line has it

    def __init__(self):
        self.files: dict[str, None] = {}  # "<path>: <problem>", in the order first seen

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None) -> None:
        samples = data_batch.get("data_samples", []) if isinstance(data_batch, dict) else []
        for sample in samples:
            skipped = sample.metainfo.get("skipped", "") if hasattr(sample, "metainfo") else ""
            if skipped and skipped not in self.files:
                self.files[skipped] = None
                runner.logger.warning(f"skipped a corrupt training file: {skipped}")
        runner.message_hub.update_scalar("train/bad_files", len(self.files))

    def after_train(self, runner) -> None:
        if self.files:
            runner.logger.warning(f"{len(self.files)} corrupt training file(s) skipped in this run")


class TrustedRunner(Runner):
    """mmengine ``Runner`` whose checkpoints load with ``weights_only=True`` and carry a sha256
    record; it loads only checkpoints with a matching record."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.register_hook(_PlainCheckpointHook())
        self.bad_file_hook = _BadFileHook()
        self.register_hook(self.bad_file_hook)

    def save_checkpoint(self, out_dir, filename, *args, **kwargs):
        super().save_checkpoint(out_dir, filename, *args, **kwargs)
        if is_main_process():
            record_checkpoint(osp.join(out_dir, filename))
            # CheckpointHook(max_keep_ckpts) deletes old checkpoints: drop their records too
            for side in Path(out_dir).glob(f"*.pth{SHA_SUFFIX}"):
                if not side.with_name(side.name[: -len(SHA_SUFFIX)]).exists():
                    side.unlink(missing_ok=True)

    def load_checkpoint(self, filename, map_location="cpu", strict=False, revise_keys=[(r"^module.", "")]):
        # Runner.load_checkpoint, with our loader instead of mmengine's torch.load call
        from mmengine.model import is_model_wrapper
        from mmengine.runner.checkpoint import _load_checkpoint_to_model

        checkpoint = load_trusted_checkpoint(filename, map_location=map_location)
        self.call_hook("after_load_checkpoint", checkpoint=checkpoint)
        model = self.model.module if is_model_wrapper(self.model) else self.model
        checkpoint = _load_checkpoint_to_model(model, checkpoint, strict, revise_keys=revise_keys)
        self._has_loaded = True
        self.logger.info(f"Load checkpoint from {filename}")
        return checkpoint


def _pretrained_refs(node, key: str = "model") -> list[tuple[str, dict, str]]:
    """(config key, holder, field) of every pretrained checkpoint name under ``node``:
    ``init_cfg=dict(type="Pretrained", checkpoint=...)`` and mmseg's ``pretrained=...``."""
    out = []
    if isinstance(node, dict):
        if node.get("type") == "Pretrained" and isinstance(node.get("checkpoint"), str):
            out.append((f"{key}.checkpoint", node, "checkpoint"))
        for k, v in node.items():
            if k == "pretrained" and isinstance(v, str):
                out.append((f"{key}.{k}", node, k))
            else:
                out += _pretrained_refs(v, f"{key}.{k}")
    elif isinstance(node, (list, tuple)):
        for i, v in enumerate(node):
            out += _pretrained_refs(v, f"{key}.{i}")
    return out


def _torchvision_urls() -> dict:
    """mmengine's table for ``torchvision://`` names (read as mmengine >= 0.10 does for
    torchvision >= 0.13, without importing torchvision, which this project does not need)."""
    import mmengine
    from mmengine.fileio import load as load_file

    return load_file(osp.join(mmengine.__path__[0], "hub", "torchvision_0.12.json"))


def checkpoint_url(name: str) -> str | None:
    """The URL mmengine downloads a checkpoint name from; None for a local path."""
    if name.startswith(("http://", "https://")):
        return name
    scheme, sep, model = name.partition("://")
    if not sep:
        return None
    if scheme in ("open-mmlab", "openmmlab"):
        model = get_deprecated_model_names().get(model, model)
        table = get_external_models()
    elif scheme in ("torchvision", "modelzoo"):
        table = _torchvision_urls()
    else:
        raise PretrainedUnavailableError(f"{name}: unsupported checkpoint scheme {scheme}://; "
                                         f"pass a local file: {LOCAL_CHECKPOINT_OPTION}")
    if model not in table or not str(table[model]).startswith(("http://", "https://")):
        raise PretrainedUnavailableError(f"{name}: mmengine knows no download for this name; pass a "
                                         f"local file: {LOCAL_CHECKPOINT_OPTION}")
    return str(table[model])


def cached_checkpoint_path(url: str) -> Path:
    """Where torch hub (and so mmengine's ``load_from_http``) keeps a downloaded checkpoint."""
    return Path(torch.hub.get_dir()) / "checkpoints" / osp.basename(urlparse(url).path)


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _download(url: str, dst: Path) -> None:
    """torch hub's download: a temporary file in dst's folder, renamed when complete."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    before = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
    try:
        torch.hub.download_url_to_file(url, str(dst), progress=False)
    finally:
        socket.setdefaulttimeout(before)


def check_pretrained_file(path: Path, name: str) -> None:
    """Raise unless ``path`` reads with ``weights_only=True`` as a (wrapped) dict of tensors."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as e:
        why = next((l.strip() for l in str(e).splitlines() if "WeightsUnpickler error" in l), "unsafe content")
        raise PretrainedUnavailableError(f"{path}: {name} is refused by the weights-only unpickler "
                                         f"({why}); pass a plain state dict instead") from None
    except (RuntimeError, OSError, EOFError, ValueError, zipfile.BadZipFile) as e:
        raise PretrainedUnavailableError(f"{path}: cannot read {name} (truncated download? delete it "
                                         f"and rerun): {' '.join(str(e).split())[:200]}") from None
    state = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise PretrainedUnavailableError(f"{path}: {name} is not a state dict of tensors")


def _local_pretrained(name: str, key: str, offline: bool) -> Path:
    """The local file for checkpoint ``name`` (config key ``key``), downloading it if allowed."""
    scratch = (f"--cfg-options {key[: -len('.checkpoint')]}=None" if key.endswith(".init_cfg.checkpoint")
               else f"--cfg-options {key}=None")
    url = checkpoint_url(name)
    local = f"--cfg-options {key}=/path/{osp.basename(urlparse(url).path) if url else 'file.pth'}"
    if url is None:
        path = Path(name).expanduser()
        if not path.is_file():
            raise PretrainedUnavailableError(f"{name}: pretrained checkpoint ({key}) not found; pass an "
                                             f"existing file with {local}, or train from scratch with {scratch}")
        check_pretrained_file(path, name)
        return path
    path = cached_checkpoint_path(url)
    if not path.is_file():
        why = "HF_HUB_OFFLINE is set"
        if not offline:
            try:
                _download(url, path)
            except Exception as e:  # URLError, timeouts, HTTP errors, a full disk: all say "not here"
                why = f"the download failed ({' '.join(str(e).split())[:120]})"
        if not path.is_file():
            raise PretrainedUnavailableError(
                f"{name}: pretrained backbone weights ({key}) are not in the torch hub cache ({path}) "
                f"and {why}; download {url} to that path, or pass a local copy with {local} "
                f"(or train from scratch: {scratch})")
    check_pretrained_file(path, name)
    return path


def prepare_pretrained(cfg: Config, offline: bool | None = None) -> dict[str, str]:
    """Make every pretrained checkpoint of ``cfg.model`` a checked local file (see module doc).

    Rewrites the names in ``cfg`` to the local paths and returns ``{config key: path}``;
    raises ``PretrainedUnavailableError`` (one line) when one cannot be had.
    """
    offline = _offline() if offline is None else offline
    done = {}
    for key, holder, field in _pretrained_refs(cfg.get("model", {})):
        path = _local_pretrained(str(holder[field]), key, offline)
        holder[field] = done[key] = str(path)
    return done


def _scheduler_ends_follow_max_iters(cfg: Config, file_max_iters) -> None:
    """A ``--cfg-options train_cfg.max_iters=N`` also moves the LR schedule ends written for the
    file's max_iters; otherwise a shortened (demo) run would stop with the LR barely decayed."""
    new = cfg.get("train_cfg", {}).get("max_iters")
    if file_max_iters is None or new is None or new == file_max_iters:
        return
    scheds = cfg.get("param_scheduler") or []
    for s in scheds if isinstance(scheds, (list, tuple)) else [scheds]:
        if s.get("end") == file_max_iters:
            s["end"] = new


def load_seg_config(config: str | Path | Config, cfg_options: dict | None = None,
                    work_dir: str | Path | None = None) -> Config:
    """Read an mmseg config, apply ``key=value`` overrides, make sure our classes are importable."""
    cfg = copy.deepcopy(config) if isinstance(config, Config) else Config.fromfile(str(config))
    file_max_iters = cfg.get("train_cfg", {}).get("max_iters")
    if cfg_options:
        cfg.merge_from_dict(dict(cfg_options))
    _scheduler_ends_follow_max_iters(cfg, file_max_iters)
    imports = list(cfg.get("custom_imports", {}).get("imports", []))
    if CUSTOM_IMPORT not in imports:
        cfg.custom_imports = dict(imports=imports + [CUSTOM_IMPORT], allow_failed_imports=False)
    if work_dir is not None:
        cfg.work_dir = str(work_dir)
    return cfg


def _import_custom(cfg: Config) -> None:
    # Config.fromfile imports custom_imports; a Config built in memory may not have done so
    for name in cfg.get("custom_imports", {}).get("imports", []):
        importlib.import_module(name)


def build_runner(cfg: Config) -> TrustedRunner:
    _import_custom(cfg)
    return TrustedRunner.from_cfg(cfg)


def _iou_metric(runner):
    from dataset.mmseg_datasets import JoDiffusionIoUMetric

    for m in runner.val_evaluator.metrics if runner.val_evaluator is not None else []:
        if isinstance(m, JoDiffusionIoUMetric):
            return m
    raise ValueError("the config's val_evaluator must be dict(type='JoDiffusionIoUMetric') "
                     "for per-class results")


def train_runner(runner: TrustedRunner) -> dict:
    """Train, evaluate the final model on the val set, write ``work_dir/final_metrics.json``.

    Returns ``{"mIoU": float, "per_class_IoU": {class: float|None}, "aAcc": float,
    "iters": int, "bad_files": int}``, IoU as fractions in [0, 1] (mmseg logs percent);
    ``bad_files`` counts the corrupt training files skipped (named in the log).
    """
    runner.train()
    metric = _iou_metric(runner)
    if metric.last_result is None:  # IterBasedTrainLoop validates at max_iters; epoch loops may not
        runner.val_loop.run()
    out = dict(metric.last_result)
    out["iters"] = int(runner.iter)
    out["bad_files"] = len(runner.bad_file_hook.files)
    if is_main_process():
        atomic_write_json(Path(runner.work_dir) / "final_metrics.json", out)
    return out


def train_and_evaluate(config_path: str | Path, work_dir: str | Path,
                       cfg_options: dict | None = None) -> dict:
    """Build the runner of an mmseg config and ``train_runner`` it (in-process API)."""
    cfg = load_seg_config(config_path, cfg_options, work_dir)
    prepare_pretrained(cfg)
    return train_runner(build_runner(cfg))


def _to_annotation_space(pred: np.ndarray, reduce_zero_label: bool) -> np.ndarray:
    if reduce_zero_label:
        # the segmenter predicts 0..K-1 for annotation labels 1..K (label 0 was ignored)
        return (pred.astype(np.int64) + 1).astype(np.uint8)
    return pred.astype(np.uint8)


def load_segmenter(config: str | Path | Config, checkpoint: str | Path, device: str = "cpu",
                   cfg_options: dict | None = None):
    """Build the model of ``config`` and load a checkpoint this project wrote (see module doc)."""
    from mmengine.registry import init_default_scope
    from mmseg.registry import MODELS

    cfg = load_seg_config(config, cfg_options)
    _import_custom(cfg)
    # weights come from the checkpoint: no pretrained file needs to exist here
    for key in ("backbone", "decode_head"):
        if isinstance(cfg.model.get(key), dict) and "init_cfg" in cfg.model[key]:
            cfg.model[key].init_cfg = None
    cfg.model.train_cfg = None
    init_default_scope(cfg.get("default_scope", "mmseg"))
    model = MODELS.build(cfg.model)
    ckpt = load_trusted_checkpoint(checkpoint, map_location="cpu")
    state = {k[len("module."):] if k.startswith("module.") else k: v
             for k, v in ckpt["state_dict"].items()}
    model.load_state_dict(state, strict=True)
    model.dataset_meta = ckpt.get("meta", {}).get("dataset_meta")
    model.cfg = cfg
    return model.to(device).eval()


@torch.no_grad()
def predict(config: str | Path | Config, checkpoint: str | Path, images: Sequence[np.ndarray],
            device: str = "cpu", batch_size: int = 16, model=None) -> np.ndarray:
    """Segment RGB uint8 HxWx3 images; returns uint8 masks (N x H x W) in the dataset's
    *annotation* label space (so they compare directly with generated masks).

    Pass ``model`` (from ``load_segmenter``) to skip loading for repeated calls.
    """
    from mmengine.dataset import Compose

    model = model if model is not None else load_segmenter(config, checkpoint, device)
    steps = [dict(t) for t in model.cfg.test_pipeline if t["type"] != "LoadAnnotations"]
    steps[0] = dict(type="LoadImageFromNDArray")
    pipeline = Compose(steps)
    reduce_zero = bool((model.dataset_meta or {}).get("reduce_zero_label", False))
    out = []
    for start in range(0, len(images), batch_size):
        batch = {"inputs": [], "data_samples": []}
        for img in images[start:start + batch_size]:
            img = np.asarray(img)
            if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
                raise ValueError(f"predict: expected uint8 HxWx3 RGB images, got {img.dtype} {img.shape}")
            # mmseg pipelines carry BGR (as cv2 reads files); the preprocessor flips to RGB
            item = pipeline(dict(img=np.ascontiguousarray(img[:, :, ::-1])))
            batch["inputs"].append(item["inputs"])
            batch["data_samples"].append(item["data_samples"])
        for sample in model.test_step(batch):
            pred = sample.pred_sem_seg.data[0].cpu().numpy()
            out.append(_to_annotation_space(pred, reduce_zero))
    return np.stack(out) if out else np.zeros((0, 0, 0), np.uint8)
