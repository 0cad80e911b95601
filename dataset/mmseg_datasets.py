"""MMSegmentation joins the project through ``custom_imports``, not a fork.

An mmseg config names this module and the dataset class below; classes, palette and
``reduce_zero_label`` come from ``dataset.get_dataset_info(dataset_name)`` (the one source of
truth), so the synthetic pairs and the real annotations are read with one definition:

    custom_imports = dict(imports=["dataset.mmseg_datasets"], allow_failed_imports=False)
    train_dataloader = dict(dataset=dict(type="JoDiffusionSegDataset", dataset_name="voc",
                                         source="synthetic", data_root="data/synthetic/voc"))

    python -m train.segmenter configs/seg/toy_unet_fcn.py --work-dir runs/seg/toy

``source="synthetic"`` reads the generated layout of ``dataset/synthetic.py``
(``img_dir/<split>/*.png`` + ``ann_dir/<split>/*.png``, uint8 class indices, same label space as
the real annotations); ``source="real"`` reads the real split described in
``dataset/<name>_semantic.py`` (image/annotation folders, optional list file, suffixes).

Bad data (checked the way ``dataset/segmentation.py`` checks it, with its ``DatasetError``,
message "<path>: <problem>"): when the dataset is built, a missing folder, an image without its
mask, a mask whose size differs from its image, a colour mask or an unreadable header stop it
(header reads only, no decoding). While training, a file that turns out corrupt when decoded
(truncated, or mask values outside the dataset's labels and not its ignore value) is skipped:
the next good item (index + 1, + 2, ...) takes its place and its data sample carries
``metainfo["skipped"] = "<path>: <problem>"`` (``models/segmenter.py`` logs and counts them),
until more than ``max_bad_fraction`` of the items were bad in this process (each DataLoader
worker counts its own). Evaluation (``test_mode``) never substitutes: a corrupt val file raises.

``JoDiffusionIoUMetric`` is mmseg's ``IoUMetric`` that also keeps the last per-class IoU (as
fractions, not percent) so ``models.segmenter.train_and_evaluate`` can return it.
"""
from __future__ import annotations

import json
import os.path as osp
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np
from mmseg.datasets import BaseSegDataset
from mmseg.evaluation import IoUMetric
from mmseg.registry import DATASETS, METRICS

from dataset import get_dataset_info
from dataset.segmentation import DatasetError, read_header

SOURCES = ("real", "synthetic")
MMSEG_IGNORE = 255  # mmseg's LoadAnnotations maps reduced label 0 here; its losses ignore it
# what reading a corrupt file raises somewhere in an mmcv/mmseg pipeline (PIL, cv2, mmcv's
# "failed to load image" assert); anything else is a bug and propagates
_READ_ERRORS = (DatasetError, OSError, ValueError, AssertionError, cv2.error)
_HEADER_THREADS = 8  # header reads wait on the disk, not the CPU


def dataset_metainfo(dataset_name: str) -> dict:
    """mmseg ``metainfo`` (classes/palette the segmenter predicts) for one of our datasets."""
    info = get_dataset_info(dataset_name)
    return dict(classes=tuple(info.seg_classes), palette=[list(c) for c in info.seg_palette])


def _synthetic_img_suffix(root: Path) -> str:
    """The image suffix a generated folder declares in its dataset.json (``inference.generate
    --image_format jpg`` writes .jpg); .png where there is none."""
    meta = root / "dataset.json"
    try:
        return str(json.loads(meta.read_text()).get("img_suffix", ".png")) if meta.is_file() else ".png"
    except (OSError, ValueError, AttributeError) as e:
        raise DatasetError(f"{meta}: cannot read the generated set's description ({e})") from None


def _pair_problem(img_path: str, seg_path: str) -> str | None:
    """What is wrong with one pair, from the headers alone; None if nothing is."""
    try:
        img_size, _ = read_header(img_path, "image")
        mask_size, mode = read_header(seg_path, "mask")
    except DatasetError as e:
        return str(e)
    if mode in ("RGB", "RGBA", "LA", "CMYK", "YCbCr"):
        return (f"{seg_path}: mask has mode {mode}; masks must be single-channel class indices "
                "(mode L or P), not colours")
    if img_size != mask_size:
        return (f"{img_path}: image is {img_size[0]}x{img_size[1]} but its mask {seg_path} is "
                f"{mask_size[0]}x{mask_size[1]}")
    return None


class _CheckLabels:
    """Pipeline step after LoadAnnotations: every value is a class the segmenter predicts or the
    ignore label (values are reported as they are in the file)."""

    def __init__(self, num_classes: int, reduce_zero_label: bool, dataset_name: str):
        self.num_classes, self.reduce_zero_label = num_classes, reduce_zero_label
        self.dataset_name = dataset_name

    def __call__(self, results: dict) -> dict:
        seg = results["gt_seg_map"]
        bad = (seg >= self.num_classes) & (seg != MMSEG_IGNORE)
        if bad.any():
            vals = np.unique(seg[bad]).astype(np.int64) + (1 if self.reduce_zero_label else 0)
            top = self.num_classes - (0 if self.reduce_zero_label else 1)
            raise DatasetError(f"{results.get('seg_map_path')}: mask values {vals[:10].tolist()} are "
                               f"outside 0..{top} and not the ignore label {MMSEG_IGNORE} "
                               f"(dataset '{self.dataset_name}')")
        return results


@DATASETS.register_module()
class JoDiffusionSegDataset(BaseSegDataset):
    """Real or generated pairs of one of our datasets (``ade20k``, ``voc``, ``coco``, ``toy``).

    Args:
        dataset_name: selects ``dataset.get_dataset_info(name)``.
        source: ``"real"`` (the layout in ``dataset/<name>_semantic.py``) or ``"synthetic"``
            (``img_dir/<split>/*``, ``ann_dir/<split>/*.png`` written by ``dataset/synthetic.py``;
            the image suffix is the one its ``dataset.json`` names, .png by default).
        split: ``"train"`` or ``"val"`` (for real data, a key of ``info.splits``).
        data_root: the folder; ``None`` = the default of the dataset module (real only).
        max_bad_fraction: share of items that may turn out corrupt while training (skipped, see
            the module docstring) before reading raises; at least one is always allowed.
        Everything else (``pipeline``, ``test_mode``, ``indices``, ...) goes to
        ``BaseSegDataset``; classes, palette, suffixes, list file and ``reduce_zero_label`` are
        taken from the dataset info and must not be passed.

    Every problem, a wrong setting included, raises ``DatasetError`` with one line, which
    ``train/segmenter.py`` prints as its error.
    """

    def __init__(self, dataset_name: str, source: str = "real", split: str = "train",
                 data_root: str | None = None, max_bad_fraction: float = 0.01, **kwargs):
        if source not in SOURCES:
            raise DatasetError(f"JoDiffusionSegDataset: source must be one of {SOURCES}, got {source!r}")
        if not 0.0 <= max_bad_fraction <= 1.0:
            raise DatasetError(f"JoDiffusionSegDataset: max_bad_fraction must be in [0, 1], "
                               f"got {max_bad_fraction}")
        clash = sorted(set(kwargs) & {"metainfo", "img_suffix", "seg_map_suffix", "reduce_zero_label",
                                      "data_prefix", "ann_file", "ignore_index"})
        if clash:
            raise DatasetError(f"JoDiffusionSegDataset: {', '.join(clash)} come from "
                               f"dataset/{dataset_name}_semantic.py; do not set them in the config")
        info = get_dataset_info(dataset_name, data_root)
        self.dataset_name, self.source, self.split = dataset_name, source, split
        self.max_bad_fraction = max_bad_fraction
        self._bad: dict[int, str] = {}  # index -> "<path>: <problem>", in this process
        root = Path(info.data_root)
        where = f"--cfg-options {'train' if split == 'train' else 'val'}_dataloader.dataset.data_root=DIR"
        if source == "synthetic" and data_root is None:
            raise DatasetError(f"JoDiffusionSegDataset({dataset_name}): source='synthetic' needs "
                               f"data_root (the folder inference.generate wrote); set it with {where}")
        if not root.is_dir():
            raise DatasetError(f"{root}: {source} data folder of dataset '{dataset_name}' not found; "
                               f"set it with {where}")
        if source == "synthetic":
            img_dir, ann_dir, list_file = f"img_dir/{split}", f"ann_dir/{split}", None
            img_suffix, seg_map_suffix = _synthetic_img_suffix(root), ".png"
        else:
            if split not in info.splits:
                raise DatasetError(f"JoDiffusionSegDataset: {dataset_name} has no split {split!r} "
                                   f"(splits: {', '.join(info.splits)})")
            spec = info.splits[split]
            img_dir, ann_dir, list_file = spec.img_dir, spec.ann_dir, spec.list_file
            img_suffix, seg_map_suffix = info.img_suffix, info.seg_map_suffix
        for sub in (img_dir, ann_dir):
            if not (root / sub).is_dir():
                raise DatasetError(f"{root / sub}: folder of dataset '{dataset_name}' ({source}, "
                                   f"{split}) not found; set the data folder with {where}")
        if list_file and not (root / list_file).is_file():
            raise DatasetError(f"{root / list_file}: list file of dataset '{dataset_name}' not found")
        super().__init__(
            ann_file=list_file or "",  # relative: BaseSegDataset joins it with data_root
            img_suffix=img_suffix,
            seg_map_suffix=seg_map_suffix,
            metainfo=dataset_metainfo(dataset_name),
            data_root=str(root),
            data_prefix=dict(img_path=img_dir, seg_map_path=ann_dir),
            ignore_index=info.ignore_index,
            reduce_zero_label=info.reduce_zero_label,
            **kwargs,
        )
        steps = self.pipeline.transforms
        at = next((i for i, t in enumerate(steps) if type(t).__name__ == "LoadAnnotations"), None)
        if at is not None:
            steps.insert(at + 1, _CheckLabels(len(self.metainfo["classes"]), info.reduce_zero_label,
                                              dataset_name))

    def load_data_list(self) -> list[dict]:
        """mmseg's pairing by file name, then the header checks of every pair."""
        # hidden names are atomic-write temporaries of a writer still running (utils/io.py)
        data_list = [d for d in super().load_data_list() if not osp.basename(d["img_path"]).startswith(".")]
        if not data_list:
            raise DatasetError(f"{self.data_prefix['img_path']}: no images ending in "
                               f"{self.img_suffix} (dataset '{self.dataset_name}', {self.source})")
        for d in data_list:
            if not osp.isfile(d["seg_map_path"]):
                hint = " (an unfinished generation run? rerun it to finish)" if self.source == "synthetic" else ""
                raise DatasetError(f"{d['img_path']}: image has no mask {d['seg_map_path']}{hint}")
        with ThreadPoolExecutor(_HEADER_THREADS) as pool:
            problems = pool.map(_pair_problem, [d["img_path"] for d in data_list],
                                [d["seg_map_path"] for d in data_list], chunksize=64)
            problem = next((p for p in problems if p is not None), None)
        if problem:
            raise DatasetError(problem)
        return data_list

    @property
    def bad_files(self) -> dict[str, str]:
        """{image path: "<path>: <problem>"} of the items found corrupt so far in this process."""
        return {self.get_data_info(i)["img_path"]: p for i, p in sorted(self._bad.items())}

    def _read(self, idx: int):
        """The pipeline's item; a file that fails to decode raises DatasetError naming it."""
        try:
            return super().prepare_data(idx)
        except DatasetError:
            raise
        except _READ_ERRORS as e:
            why = " ".join(f"{type(e).__name__}: {e}".split())
            raise DatasetError(f"{self.get_data_info(idx)['img_path']}: cannot read the pair ({why})") from None

    def prepare_data(self, idx: int):
        """The pipeline's item; while training, a corrupt file's item is replaced by the next
        good one and named in ``data_samples.metainfo["skipped"]``."""
        if self.test_mode:  # evaluation covers every file or stops
            return self._read(idx)
        skipped = ""
        for j in (np.arange(len(self)) + idx) % len(self):
            try:
                data = self._read(int(j))
            except DatasetError as e:
                self._note_bad(int(j), str(e))
                skipped = skipped or str(e)
                continue
            if data is not None and "data_samples" in data:
                data["data_samples"].set_metainfo({"skipped": skipped})
            return data
        raise DatasetError(f"{self.data_prefix['img_path']}: every pair is corrupt")

    def _note_bad(self, index: int, problem: str) -> None:
        self._bad[index] = problem
        allowed = max(1, int(self.max_bad_fraction * len(self)))
        if len(self._bad) > allowed:
            raise DatasetError(f"{problem}; {len(self._bad)} of {len(self)} files bad, more than the "
                               f"allowed share (max_bad_fraction={self.max_bad_fraction}); fix or "
                               f"remove them, or raise train_dataloader.dataset.max_bad_fraction")


@METRICS.register_module()
class JoDiffusionIoUMetric(IoUMetric):
    """``IoUMetric`` that also keeps ``last_result = {"mIoU", "per_class_IoU", "aAcc"}`` in [0, 1].

    mmseg logs per-class values only as a printed table; the benchmark needs them as numbers.
    Classes absent from both prediction and ground truth get NaN (left out of the mean), as in
    mmseg.
    """

    def __init__(self, **kwargs):
        kwargs.setdefault("iou_metrics", ["mIoU"])
        super().__init__(**kwargs)
        self.last_result: dict | None = None

    def compute_metrics(self, results: list) -> dict:
        metrics = super().compute_metrics(results)
        inter, union, _, label_area = (sum(r[i] for r in results) for i in range(4))
        inter, union = inter.double().numpy(), union.double().numpy()
        with np.errstate(invalid="ignore", divide="ignore"):
            iou = inter / union
        names = list(self.dataset_meta["classes"])
        self.last_result = {
            "mIoU": float(np.nanmean(iou)),
            "per_class_IoU": {n: (None if np.isnan(v) else float(v)) for n, v in zip(names, iou)},
            "aAcc": float(inter.sum() / max(float(label_area.sum()), 1.0)),
        }
        return metrics
