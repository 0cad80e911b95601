"""Real (image, mask, caption) pairs of any dataset in ``dataset/``, as a torch Dataset.

    from dataset import get_dataset_info
    from dataset.segmentation import SegmentationDataset
    ds = SegmentationDataset(get_dataset_info("toy"), "train", size=32, augment=True)
    item = ds[0]  # {"image": 3x32x32 in [-1, 1], "mask": 32x32 int64, "caption": str, "name": str,
                  #  "skipped": ""}

Masks stay in the annotation label space of ``dataset/base.py`` (0 background, 1..K, 255
ignore). Bad data is found in two places:

* when the dataset is built (before any training): the folders, the image/mask pairing, and
  every file's header (readable, image and mask sizes agree, masks single-channel) -- header
  reads only, no decoding, so a 100k-file dataset is checked in seconds. Problems raise
  ``DatasetError("<path>: <problem>")``.
* when an item is read: a file that turns out corrupt (truncated data, labels outside 0..K
  and not the ignore value) is skipped: the next good item (index+1, +2, ...) takes its place
  and carries ``item["skipped"] = "<path>: <problem>"`` (good items carry ``""``) so the
  trainer can count and log it. Once more than ``max_bad_fraction`` of the items have been
  bad in this process, reading raises ``DatasetError``. ``load(index)`` reads strictly.
"""
from __future__ import annotations

import copy
import json
import os
import struct
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dataset.base import DatasetInfo

CAPTION_MODES = ("auto", "class_names", "file")
# what PIL raises for a broken or truncated file (plugins differ), and for an absurd pixel count
_PIL_ERRORS = (OSError, ValueError, SyntaxError, EOFError, struct.error, Image.DecompressionBombError)


class DatasetError(ValueError):
    """A dataset file or folder is missing or malformed; the one-line message names it.

    Built from the message alone: a DataLoader worker's exception is re-raised in the main
    process as ``type(exc)(message)``.
    """


def _root_hint(info: DatasetInfo) -> str:
    hint = f"edit data_root in dataset/{info.name}_semantic.py or pass --data_root"
    if info.name == "toy":
        hint += f" (or make it: python -m utils.make_toy_dataset --out {info.data_root})"
    return hint


def read_image(path: str | Path) -> np.ndarray:
    """HxWx3 uint8 RGB; DatasetError if the file is missing, truncated or not an image."""
    path = Path(path)
    try:
        with Image.open(path) as im:
            im.load()  # decode now: a truncated file fails here, not later in a worker
            return np.asarray(im.convert("RGB"), dtype=np.uint8).copy()
    except FileNotFoundError:
        raise DatasetError(f"{path}: image file not found") from None
    except _PIL_ERRORS as e:
        raise DatasetError(f"{path}: cannot read image ({e})") from None


def read_mask(path: str | Path, info: DatasetInfo | None = None) -> np.ndarray:
    """HxW uint8 class indices from a single-channel PNG (mode L, P or I).

    With ``info``, values must be 0..K or ``info.ignore_index``; anything else is a DatasetError
    (e.g. an RGB colour mask, or COCO category ids instead of 1..80 labels).
    """
    path = Path(path)
    try:
        with Image.open(path) as im:
            im.load()
            mode = im.mode
            if mode in _COLOUR_MODES:
                raise DatasetError(
                    f"{path}: mask has mode {mode}; masks must be single-channel class indices "
                    "(mode L or P), not colours")
            arr = np.asarray(im)
    except FileNotFoundError:
        raise DatasetError(f"{path}: mask file not found") from None
    except DatasetError:
        raise
    except _PIL_ERRORS as e:
        raise DatasetError(f"{path}: cannot read mask ({e})") from None
    if arr.dtype == bool:
        arr = arr.astype(np.uint8)
    if info is not None:
        valid = np.zeros(max(int(arr.max()) + 1, 256) if arr.size else 256, dtype=bool)
        valid[: info.num_labels] = True
        if 0 <= info.ignore_index < len(valid):
            valid[info.ignore_index] = True
        if arr.size and (arr.min() < 0 or not valid[arr.ravel()].all()):
            present = np.unique(arr)
            bad = [int(v) for v in present if v < 0 or not valid[v]]
            raise DatasetError(
                f"{path}: mask values {bad[:10]} are outside 0..{info.num_classes} and not the "
                f"ignore label {info.ignore_index} (dataset '{info.name}')")
    elif arr.size and (arr.min() < 0 or arr.max() > 255):
        raise DatasetError(f"{path}: mask values outside 0..255")
    return arr.astype(np.uint8)


_COLOUR_MODES = ("RGB", "RGBA", "LA", "CMYK", "YCbCr")


def read_header(path: str | Path, kind: str = "image") -> tuple[tuple[int, int], str]:
    """(width, height) and PIL mode from the file's header, without decoding the pixels."""
    path = Path(path)
    try:
        with Image.open(path) as im:
            return im.size, im.mode
    except FileNotFoundError:
        raise DatasetError(f"{path}: {kind} file not found") from None
    except _PIL_ERRORS as e:
        raise DatasetError(f"{path}: cannot read {kind} ({e})") from None


def load_captions(info: DatasetInfo, split: str) -> dict[str, str] | None:
    """The split's caption file as {image id: caption}, or None where it has none or it is missing."""
    spec = _split_spec(info, split)
    if spec.caption_file is None:
        return None
    path = info.root() / spec.caption_file
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DatasetError(f"{path}: caption file is not valid JSON ({e})") from None
    if not isinstance(data, dict) or not all(isinstance(v, str) for v in data.values()):
        raise DatasetError(f"{path}: caption file must be a JSON object {{image id: caption string}}")
    return {str(k): v for k, v in data.items()}


def _split_spec(info: DatasetInfo, split: str):
    if split not in info.splits:
        raise DatasetError(f"dataset '{info.name}' has no split {split!r}; "
                           f"splits: {', '.join(info.splits)} (dataset/{info.name}_semantic.py)")
    return info.splits[split]


def _list_ids(info: DatasetInfo, spec, img_dir: Path) -> list[str]:
    suffix = info.img_suffix
    if spec.list_file is None:
        # hidden names are atomic-write temporaries of a writer still running: not images yet
        names = sorted(e.name for e in os.scandir(img_dir)
                       if e.name.endswith(suffix) and not e.name.startswith(".") and e.is_file())
        ids = [n[: -len(suffix)] for n in names]
        if not ids:
            raise DatasetError(f"{img_dir}: no images ending in {suffix} (dataset '{info.name}')")
        return ids
    list_path = info.root() / spec.list_file
    if not list_path.is_file():
        raise DatasetError(f"{list_path}: list file of dataset '{info.name}' not found; "
                           f"{_root_hint(info)}")
    ids = []
    for line in list_path.read_text().splitlines():
        tokens = line.split()
        if not tokens:
            continue
        token = tokens[0]  # some lists hold "JPEGImages/x.jpg SegmentationClass/x.png" pairs
        name = os.path.basename(token)
        ids.append(name[: -len(suffix)] if name.endswith(suffix) else name)
    if not ids:
        raise DatasetError(f"{list_path}: list file is empty")
    present = {e.name for e in os.scandir(img_dir)}
    missing = [i for i in ids if i + suffix not in present]
    if missing:
        raise DatasetError(
            f"{list_path}: names {len(missing)} image(s) that do not exist, e.g. "
            f"{img_dir / (missing[0] + suffix)}")
    return ids


class SegmentationDataset(torch.utils.data.Dataset):
    """Image/mask/caption items of one split of a dataset described by ``DatasetInfo``.

    size:     None keeps the native size (all images must share it); an int S resizes the
              shorter side to S (bilinear image, nearest mask) and crops S x S (centre crop,
              or a random crop with ``augment``).
    augment:  random crop + horizontal flip, identical for image and mask. Randomness comes
              from (seed, epoch, index): call ``set_epoch`` each epoch for fresh crops;
              ``seed=None`` draws from torch's global generator instead (seeded per worker
              by the DataLoader).
    captions: "file" (the split's caption JSON; every image must have one), "class_names"
              ("a photo of cat, sofa" from the labels in the returned mask) or "auto" (the
              file where it exists, class names for images it lacks).
    max_bad_fraction: share of items that may turn out corrupt when read (skipped, see the
              module docstring) before reading raises; at least one is always allowed.
              Counted per process (each DataLoader worker counts the items it reads).
    """

    def __init__(self, info: DatasetInfo, split: str, size: int | None = None, augment: bool = False,
                 captions: str = "auto", seed: int | None = 0, max_bad_fraction: float = 0.01):
        if captions not in CAPTION_MODES:
            raise ValueError(f"captions must be one of {CAPTION_MODES}, got {captions!r}")
        if size is not None and size < 1:
            raise ValueError(f"size must be positive, got {size}")
        if not 0.0 <= max_bad_fraction <= 1.0:
            raise ValueError(f"max_bad_fraction must be in [0, 1], got {max_bad_fraction}")
        self.info, self.split, self.size, self.augment = info, split, size, augment
        self.caption_mode, self.seed, self.epoch = captions, seed, 0
        self.max_bad_fraction = max_bad_fraction

        root = info.root()
        if not root.is_dir():
            raise DatasetError(f"{root}: data_root of dataset '{info.name}' not found; {_root_hint(info)}")
        spec = _split_spec(info, split)
        self.img_dir, self.ann_dir = root / spec.img_dir, root / spec.ann_dir
        for kind, folder in (("image", self.img_dir), ("annotation", self.ann_dir)):
            if not folder.is_dir():
                raise DatasetError(f"{folder}: {kind} folder of dataset '{info.name}' split "
                                   f"'{split}' not found; {_root_hint(info)}")
        self.ids = _list_ids(info, spec, self.img_dir)

        masks_present = {e.name for e in os.scandir(self.ann_dir)}
        unpaired = [i for i in self.ids if i + info.seg_map_suffix not in masks_present]
        if unpaired:
            raise DatasetError(
                f"{self.img_dir / (unpaired[0] + info.img_suffix)}: image has no mask "
                f"{self.ann_dir / (unpaired[0] + info.seg_map_suffix)} "
                f"({len(unpaired)} of {len(self.ids)} images unpaired)")

        self.captions = None if captions == "class_names" else load_captions(info, split)
        if captions == "file":
            cap_path = root / spec.caption_file if spec.caption_file else None
            if self.captions is None:
                raise DatasetError(f"{cap_path or split}: caption file of dataset '{info.name}' not found "
                                   "(make one with utils/prepare_captions.py or use captions='auto')")
            lacking = [i for i in self.ids if i not in self.captions]
            if lacking:
                raise DatasetError(f"{cap_path}: no caption for {len(lacking)} image(s), e.g. {lacking[0]!r}")
        elif self.captions is not None:
            lacking = sum(i not in self.captions for i in self.ids)
            if lacking:
                warnings.warn(f"{root / spec.caption_file}: {lacking} of {len(self.ids)} images have "
                              "no caption; they get class-name captions", stacklevel=2)

        self._native_size = self._check_headers()
        self._bad: dict[int, str] = {}  # index -> "<path>: <problem>", in this process

    def _check_headers(self) -> tuple[int, int] | None:
        """Every image and mask header: readable, sizes agree, masks are class indices. Returns
        the one size all images share when ``size`` is None."""
        native = None
        for index in range(len(self.ids)):
            img_path, mask_path = self.image_path(index), self.mask_path(index)
            img_size, _ = read_header(img_path, "image")
            mask_size, mode = read_header(mask_path, "mask")
            if mode in _COLOUR_MODES:
                raise DatasetError(f"{mask_path}: mask has mode {mode}; masks must be single-channel "
                                   "class indices (mode L or P), not colours")
            if img_size != mask_size:
                raise DatasetError(_size_mismatch(img_path, img_size, mask_path, mask_size))
            if self.size is None:
                native = native or img_size
                if img_size != native:
                    raise DatasetError(_native_mismatch(img_path, img_size, self.image_path(0), native))
        return native

    def __len__(self) -> int:
        return len(self.ids)

    def image_path(self, index: int) -> Path:
        return self.img_dir / (self.ids[index] + self.info.img_suffix)

    def mask_path(self, index: int) -> Path:
        return self.ann_dir / (self.ids[index] + self.info.seg_map_suffix)

    def without_augmentation(self) -> "SegmentationDataset":
        """The same files, un-augmented, without reading every header again (a second view of a
        split, e.g. the label VAE's latent-statistics masks); its bad-file record is its own."""
        view = copy.copy(self)
        view.augment, view._bad = False, {}
        return view

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    @property
    def bad_files(self) -> dict[str, str]:
        """{image id: "<path>: <problem>"} of the items found corrupt so far in this process."""
        return {self.ids[i]: p for i, p in sorted(self._bad.items())}

    def caption(self, index: int, mask: np.ndarray | None = None) -> str:
        """The image's caption: from the file, else named after the labels of ``mask``
        (the whole annotation when not given; a corrupt one gives the next good item's)."""
        name = self.ids[index]
        if self.captions is not None and name in self.captions:
            return self.captions[name]
        if mask is None:
            _, mask, _ = self._first_good(index, lambda j: read_mask(self.mask_path(j), self.info))
        return self.info.class_name_caption(np.unique(mask))

    def _random(self, index: int):
        """Uniform floats in [0, 1) for this item's crop and flip."""
        if self.seed is None:
            return lambda: float(torch.rand(()))
        rng = np.random.default_rng([self.seed, self.epoch, index])
        return lambda: float(rng.random())

    def _transform(self, image: np.ndarray, mask: np.ndarray, index: int):
        rand = self._random(index) if self.augment else None
        if self.size is not None:
            s = self.size
            h, w = mask.shape
            scale = s / min(h, w)
            nh, nw = max(s, round(h * scale)), max(s, round(w * scale))
            if (nh, nw) != (h, w):
                image = np.array(Image.fromarray(image).resize((nw, nh), Image.BILINEAR))
                mask = np.array(Image.fromarray(mask).resize((nw, nh), Image.NEAREST))
            if rand is not None:
                top = min(int(rand() * (nh - s + 1)), nh - s)
                left = min(int(rand() * (nw - s + 1)), nw - s)
            else:
                top, left = (nh - s) // 2, (nw - s) // 2
            image = image[top : top + s, left : left + s]
            mask = mask[top : top + s, left : left + s]
        if rand is not None and rand() < 0.5:
            image, mask = image[:, ::-1], mask[:, ::-1]
        return np.ascontiguousarray(image), np.ascontiguousarray(mask)

    def load(self, index: int) -> dict:
        """The item at ``index``, decoded and checked in full; DatasetError if it is corrupt."""
        img_path, mask_path = self.image_path(index), self.mask_path(index)
        image = read_image(img_path)
        mask = read_mask(mask_path, self.info)
        img_size, mask_size = (image.shape[1], image.shape[0]), (mask.shape[1], mask.shape[0])
        if img_size != mask_size:
            raise DatasetError(_size_mismatch(img_path, img_size, mask_path, mask_size))
        if self.size is None and img_size != self._native_size:
            raise DatasetError(_native_mismatch(img_path, img_size, self.image_path(0), self._native_size))
        image, mask = self._transform(image, mask, index)
        return {
            "image": torch.from_numpy(image).permute(2, 0, 1).float().div(127.5).sub(1.0),
            "mask": torch.from_numpy(mask.astype(np.int64)),
            # class-name captions name what the returned crop shows, not what it lost
            "caption": self.caption(index, mask),
            "name": self.ids[index],
        }

    def __getitem__(self, index: int) -> dict:
        """``load(index)``, or the next good item in its place with ``"skipped"`` naming the bad file."""
        _, item, skipped = self._first_good(index, self.load)
        item["skipped"] = skipped
        return item

    def _first_good(self, index: int, read):
        """(j, read(j), problem of ``index`` or "") for the first j = index, index+1, ... that reads."""
        index = range(len(self))[index]  # negative indices, and IndexError past the end
        problem = ""
        for step in range(len(self)):
            j = (index + step) % len(self)
            if j in self._bad:  # files do not heal: skip it without reading it again
                problem = problem or self._bad[j]
                continue
            try:
                return j, read(j), problem
            except DatasetError as e:
                problem = problem or str(e)
                self._note_bad(j, str(e))
        raise DatasetError(f"{self.img_dir}: no readable item left ({len(self._bad)} of {len(self)} bad)")

    def _note_bad(self, index: int, problem: str) -> None:
        self._bad[index] = problem
        allowed = max(1, int(self.max_bad_fraction * len(self)))
        if len(self._bad) > allowed:
            raise DatasetError(
                f"{self.img_dir}: {len(self._bad)} of {len(self)} files bad, more than the allowed "
                f"share (max_bad_fraction={self.max_bad_fraction}); latest {problem}")


def _size_mismatch(img_path: Path, img_size, mask_path: Path, mask_size) -> str:
    return (f"{img_path}: image is {img_size[0]}x{img_size[1]} but its mask {mask_path} is "
            f"{mask_size[0]}x{mask_size[1]}")


def _native_mismatch(img_path: Path, img_size, first_path: Path, first_size) -> str:
    return (f"{img_path}: image is {img_size[0]}x{img_size[1]} but {first_path} is "
            f"{first_size[0]}x{first_size[1]}; images of different sizes need a size (e.g. "
            "size=512) to be resized to")
