"""Pascal VOC 2012 + SBD -> ``SegmentationClassAug`` and the ``trainaug`` list (10,582 images).

    python -m utils.prepare_voc_aug --voc_root data/VOCdevkit/VOC2012 \
        --sbd_root data/benchmark_RELEASE/dataset --num_workers 8

Inputs:
  --voc_root   VOCdevkit/VOC2012 with SegmentationClass/*.png (palette PNGs) and
               ImageSets/Segmentation/{train,val}.txt
  --sbd_root   SBD's benchmark_RELEASE/dataset with cls/*.mat (struct GTcls, field
               Segmentation), train.txt and val.txt

Outputs (what dataset/voc_semantic.py reads):
  <voc_root>/SegmentationClassAug/<id>.png     single-channel uint8, 0 background, 1..20, 255
  <voc_root>/ImageSets/Segmentation/trainaug.txt

Rules: every id of VOC's SegmentationClass and of SBD train/val gets a PNG; where both have a
mask, VOC's own annotation wins (it is the finer one and carries the 255 boundary band). The
palette PNGs are read as their index values, so colours never enter the labels.
trainaug = (VOC train + SBD train + SBD val) - VOC val, deduplicated and sorted.

Resumable: PNGs are written atomically, existing ones are kept (``--overwrite true`` redoes all).
"""
from __future__ import annotations

import multiprocessing
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from dataset.voc_semantic import INFO
from utils.config import die, parse_config
from utils.io import atomic_write_text, save_image_atomic

NUM_LABELS = len(INFO.classes)  # 21: 0 background + 20 classes


@dataclass
class PrepareVocAugConfig:
    """Merge VOC 2012 and SBD annotations into SegmentationClassAug + trainaug.txt."""

    voc_root: str = field(default=INFO.data_root, metadata={"help": "VOCdevkit/VOC2012"})
    sbd_root: str = field(default="data/benchmark_RELEASE/dataset",
                          metadata={"help": "SBD benchmark_RELEASE/dataset (cls/, train.txt, val.txt)"})
    out_dir: str | None = field(default=None, metadata={
        "help": "mask folder (default <voc_root>/SegmentationClassAug)"})
    num_workers: int = field(default=8, metadata={"help": "worker processes (0 = in this process)"})
    overwrite: bool = field(default=False, metadata={"help": "rewrite PNGs that already exist"})


def read_id_list(path: Path) -> list[str]:
    if not path.is_file():
        die(f"{path}: not found")
    ids = [line.split()[0] for line in path.read_text().splitlines() if line.strip()]
    if not ids:
        die(f"{path}: list file is empty")
    return ids


def load_sbd_mask(path: str | Path) -> np.ndarray:
    """SBD ``cls/<id>.mat`` -> uint8 HxW class map (GTcls.Segmentation)."""
    from scipy.io import loadmat

    data = loadmat(str(path), squeeze_me=True, struct_as_record=False)
    if "GTcls" not in data:
        raise ValueError("no 'GTcls' struct (expected an SBD cls/*.mat file)")
    seg = np.asarray(data["GTcls"].Segmentation)
    if seg.ndim != 2:
        raise ValueError(f"GTcls.Segmentation has shape {seg.shape}, expected HxW")
    return seg.astype(np.uint8)


def load_voc_mask(path: str | Path) -> np.ndarray:
    """VOC ``SegmentationClass/<id>.png`` (palette PNG) -> uint8 HxW of its index values."""
    with Image.open(path) as im:
        if im.mode not in ("P", "L"):
            raise ValueError(f"mode {im.mode}: expected a palette (P) or grey (L) PNG of class indices")
        return np.array(im, dtype=np.uint8)


def _convert_one(task) -> tuple[str, str | None]:
    image_id, source, src_path, out_path = task
    try:
        mask = load_voc_mask(src_path) if source == "voc" else load_sbd_mask(src_path)
        bad = np.setdiff1d(np.unique(mask), np.r_[np.arange(NUM_LABELS), 255])
        if bad.size:
            raise ValueError(f"label values {bad.tolist()} outside 0..{NUM_LABELS - 1} and 255")
        save_image_atomic(out_path, mask)
        return image_id, None
    except Exception as e:  # report every broken file at the end instead of stopping at the first
        return image_id, f"{src_path}: {type(e).__name__}: {e}"


def plan(voc_root: Path, sbd_root: Path, out_dir: Path, overwrite: bool):
    """Which source each id's mask comes from, and the trainaug list."""
    seg_sets = voc_root / "ImageSets" / "Segmentation"
    voc_train = read_id_list(seg_sets / "train.txt")
    voc_val = read_id_list(seg_sets / "val.txt")
    sbd_train = read_id_list(sbd_root / "train.txt")
    sbd_val = read_id_list(sbd_root / "val.txt")
    trainaug = sorted((set(voc_train) | set(sbd_train) | set(sbd_val)) - set(voc_val))

    voc_seg_dir = voc_root / "SegmentationClass"
    sources: dict[str, tuple[str, Path]] = {}
    for image_id in sorted(set(sbd_train) | set(sbd_val)):
        sources[image_id] = ("sbd", sbd_root / "cls" / f"{image_id}.mat")
    if voc_seg_dir.is_dir():
        for png in sorted(voc_seg_dir.glob("*.png")):
            sources[png.stem] = ("voc", png)  # VOC's own annotation takes precedence
    missing = [i for i in sorted(set(trainaug) | set(voc_val))
               if i not in sources or not sources[i][1].is_file()]
    if missing:
        where = {i: str(sources[i][1]) if i in sources else str(voc_seg_dir / f"{i}.png") for i in missing[:5]}
        die(f"{len(missing)} listed ids have no annotation file, e.g. {', '.join(where.values())}")
    tasks = [(i, src, str(path), str(out_dir / f"{i}.png")) for i, (src, path) in sorted(sources.items())
             if overwrite or not (out_dir / f"{i}.png").exists()]
    return trainaug, sources, tasks


def main(argv=None) -> int:
    cfg = parse_config(PrepareVocAugConfig, argv, description=__doc__)
    voc_root, sbd_root = Path(cfg.voc_root), Path(cfg.sbd_root)
    out_dir = Path(cfg.out_dir) if cfg.out_dir else voc_root / "SegmentationClassAug"
    if not voc_root.is_dir():
        die(f"{voc_root}: VOC root not found (VOCdevkit/VOC2012 with SegmentationClass/ and "
            "ImageSets/; pass --voc_root)")
    if not (sbd_root / "cls").is_dir():
        die(f"{sbd_root / 'cls'}: not found (SBD benchmark_RELEASE/dataset holds cls/, train.txt, val.txt)")
    trainaug, sources, tasks = plan(voc_root, sbd_root, out_dir, cfg.overwrite)
    out_dir.mkdir(parents=True, exist_ok=True)

    failures = {}
    bar = tqdm(total=len(tasks), desc="SegmentationClassAug", unit="img")
    if cfg.num_workers > 0 and len(tasks) > 1:
        with multiprocessing.get_context("spawn").Pool(cfg.num_workers) as pool:
            for image_id, err in pool.imap_unordered(_convert_one, tasks, chunksize=16):
                if err:
                    failures[image_id] = err
                bar.update()
    else:
        for task in tasks:
            image_id, err = _convert_one(task)
            if err:
                failures[image_id] = err
            bar.update()
    bar.close()

    list_path = voc_root / "ImageSets" / "Segmentation" / "trainaug.txt"
    atomic_write_text(list_path, "".join(f"{i}\n" for i in trainaug))
    n_voc = sum(1 for s, _ in sources.values() if s == "voc")
    print(f"{len(sources)} masks ({n_voc} from VOC, {len(sources) - n_voc} from SBD): "
          f"{len(tasks) - len(failures)} written, {len(sources) - len(tasks)} already done, "
          f"{len(failures)} failed -> {out_dir}")
    print(f"trainaug: {len(trainaug)} ids -> {list_path}")
    for image_id, err in sorted(failures.items()):
        print(f"error: {err}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
