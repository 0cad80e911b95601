"""Write a split's caption file, ``<data_root>/<caption_file>`` = ``{image id: caption}``.

    python -m utils.prepare_captions --dataset voc --split train --model /models/blip2-opt-2.7b

Modes (``--mode``; the default is the dataset's ``caption_source``):
  blip2        BLIP-2 captions (transformers ``Blip2ForConditionalGeneration``): the paper's
               captions for ADE20K and VOC. ``--model`` is a local folder or a hub id
               (default Salesforce/blip2-opt-2.7b); fp16 on GPU, fp32 on CPU; greedy decoding.
  coco_first   COCO's own first caption per image (lowest annotation id) from
               ``<data_root>/annotations/captions_<split>2017.json``.
  class_names  "a photo of cat, sofa" from the classes present in each mask; needs no model.

Image ids are file stems (``2007_000032``, ``000000000009``, ``ADE_train_00000001``): the
split's list file if it has one, otherwise every image in its image folder.

Resumable: finished captions are appended to ``<caption file stem>.partial.jsonl`` after every
batch; a rerun skips ids already in it or in the final JSON, so a second run captions nothing
new. The final JSON is written atomically at the end and the partial file removed.

Broken inputs: an image (or mask) that cannot be read is reported with its path, listed in
``<caption file stem>.failures.json``, and skipped; the rest are captioned, the final JSON is
written without them, and the exit code is 1. Rerun after fixing the files to caption only them.
"""
from __future__ import annotations

import json
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image
from tqdm import tqdm

from dataset import DATASET_NAMES, DatasetInfo, get_dataset_info
from dataset.segmentation import DatasetError, read_mask
from utils.config import die, parse_config
from utils.io import atomic_write_json, read_jsonl

MODES = ("blip2", "coco_first", "class_names")


@dataclass
class CaptionConfig:
    """Caption a dataset split (BLIP-2, COCO's first caption, or class names)."""

    dataset: str | None = field(default=None, metadata={"help": f"one of {', '.join(DATASET_NAMES)}"})
    split: str = field(default="train", metadata={"help": "split name in the dataset's module (train/val)"})
    mode: str | None = field(default=None, metadata={
        "help": f"one of {', '.join(MODES)}; default: the dataset's caption_source"})
    data_root: str | None = field(default=None, metadata={"help": "override the dataset's data_root"})
    output: str | None = field(default=None, metadata={
        "help": "caption JSON to write (default <data_root>/<split's caption_file>)"})
    model: str = field(default="Salesforce/blip2-opt-2.7b", metadata={
        "help": "BLIP-2 model: local folder or hub id (the paper's captioner)"})
    prompt: str = field(default="", metadata={"help": "BLIP-2 text prompt; empty = plain captioning"})
    batch_size: int = field(default=16, metadata={"help": "images per BLIP-2 forward pass"})
    max_new_tokens: int = field(default=30, metadata={"help": "longest caption in tokens"})
    device: str = field(default="auto", metadata={"help": "auto (cuda if available), cuda, cuda:1, cpu"})
    dtype: str = field(default="auto", metadata={"help": "auto (fp16 on GPU, fp32 on CPU), fp16, bf16, fp32"})
    num_workers: int = field(default=4, metadata={"help": "threads reading images/masks"})
    coco_captions: str | None = field(default=None, metadata={
        "help": "COCO captions JSON (default <data_root>/annotations/captions_<img_dir name>.json)"})
    overwrite: bool = field(default=False, metadata={"help": "ignore earlier results and caption everything"})


# ---------------------------------------------------------------------------------------------
# what to caption
def split_ids(info: DatasetInfo, split: str) -> list[str]:
    """Image ids (file stems) of a split: its list file, else every image in its folder."""
    spec = info.splits[split]
    if spec.list_file:
        path = info.root() / spec.list_file
        if not path.is_file():
            die(f"{path}: split list not found")
        return list(dict.fromkeys(line.split()[0] for line in path.read_text().splitlines() if line.strip()))
    img_dir = info.root() / spec.img_dir
    if not img_dir.is_dir():
        die(f"{img_dir}: image folder not found (set --data_root)")
    # hidden names are atomic-write temporaries of a writer still running, not images
    return sorted(p.stem for p in img_dir.iterdir()
                  if p.suffix.lower() == info.img_suffix and not p.name.startswith("."))


def _clean(text: str) -> str:
    return " ".join(text.split())


# ---------------------------------------------------------------------------------------------
# captioners: each maps a batch of ids to ({id: caption}, {id: error})
Captioner = Callable[[list[str]], tuple[dict[str, str], dict[str, str]]]


def class_name_captioner(info: DatasetInfo, split: str, num_workers: int) -> Captioner:
    ann_dir = info.root() / info.splits[split].ann_dir

    def one(name: str) -> tuple[str, str | None, str | None]:
        path = ann_dir / f"{name}{info.seg_map_suffix}"
        try:  # labels outside the dataset's classes are a failure, not silently dropped
            labels = np.unique(read_mask(path, info))
        except DatasetError as e:
            return name, None, str(e)
        return name, info.class_name_caption(labels.tolist()), None

    pool = ThreadPoolExecutor(max(1, num_workers))

    def run(names):
        done, failed = {}, {}
        for name, caption, err in pool.map(one, names):
            if err:
                failed[name] = err
            else:
                done[name] = caption
        return done, failed

    return run


def load_coco_first_captions(path: Path) -> dict[str, str | None]:
    """{file stem: first caption (lowest annotation id)} for every image of a COCO captions JSON;
    None for an image without captions."""
    if not path.is_file():
        die(f"{path}: COCO captions file not found (annotations_trainval2017.zip)")
    if path.stat().st_size == 0:
        die(f"{path}: COCO captions file is empty")
    try:
        data = json.loads(path.read_text())
        stems = {img["id"]: Path(img["file_name"]).stem for img in data["images"]}
        first: dict[int, tuple[int, str]] = {}
        for ann in data["annotations"]:
            key = (ann["id"], str(ann["caption"]))
            if ann["image_id"] not in first or key < first[ann["image_id"]]:
                first[ann["image_id"]] = key
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as e:
        die(f"{path}: not a COCO captions file ({type(e).__name__}: {e})")
    if not first:
        die(f"{path}: COCO captions file holds no captions ({len(stems)} images, 0 annotations)")
    return {stem: (_clean(first[i][1]) if i in first else None) for i, stem in stems.items()}


def coco_first_captioner(table: dict[str, str | None], path: Path) -> Captioner:
    def run(names):
        done, failed = {}, {}
        for name in names:
            if table.get(name):
                done[name] = table[name]
            else:
                failed[name] = f"{path}: no caption for image {name}"
        return done, failed

    return run


def blip2_captioner(cfg: CaptionConfig, info: DatasetInfo, split: str) -> Captioner:
    import torch
    from transformers import Blip2ForConditionalGeneration, Blip2Processor

    if cfg.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(cfg.device)
    dtypes = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
    if cfg.dtype == "auto":
        dtype = torch.float16 if device.type == "cuda" else torch.float32
    elif cfg.dtype in dtypes:
        dtype = dtypes[cfg.dtype]
    else:
        die(f"--dtype {cfg.dtype}: choose auto, {', '.join(dtypes)}")
    try:
        processor = Blip2Processor.from_pretrained(cfg.model)
        model = Blip2ForConditionalGeneration.from_pretrained(cfg.model, dtype=dtype)
    except (OSError, ValueError) as e:
        die(f"{cfg.model}: cannot load BLIP-2 ({type(e).__name__}: {str(e).splitlines()[0]}); "
            "pass --model with a local folder when offline")
    model.to(device).eval()

    img_dir = info.root() / info.splits[split].img_dir
    pool = ThreadPoolExecutor(max(1, cfg.num_workers))

    def load(name: str):
        path = img_dir / f"{name}{info.img_suffix}"
        try:
            with Image.open(path) as im:
                return name, im.convert("RGB"), None  # convert() decodes the whole file now
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            return name, None, f"{path}: cannot read image ({type(e).__name__}: {e})"

    @torch.inference_mode()
    def run(names):
        images, ok, failed = [], [], {}
        for name, image, err in pool.map(load, names):
            if err:
                failed[name] = err
            else:
                ok.append(name)
                images.append(image)
        if not images:
            return {}, failed
        text = [cfg.prompt] * len(images) if cfg.prompt else None
        inputs = processor(images=images, text=text, return_tensors="pt").to(device)
        inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
        out = model.generate(**inputs, max_new_tokens=cfg.max_new_tokens, do_sample=False, num_beams=1)
        captions = processor.batch_decode(out, skip_special_tokens=True)
        return {n: _clean(c) for n, c in zip(ok, captions)}, failed

    return run


# ---------------------------------------------------------------------------------------------
def _read_caption_file(path: Path) -> dict[str, str]:
    """An earlier run's caption JSON ({image id: caption}); a broken one stops the run."""
    hint = "remove it or pass --overwrite true"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        die(f"{path}: exists but is not valid JSON ({e}); {hint}")
    if not isinstance(data, dict) or not all(isinstance(v, str) for v in data.values()):
        die(f"{path}: exists but is not a JSON object {{image id: caption string}}; {hint}")
    return data


def caption_split(names: list[str], make_captioner: Callable[[], Captioner], output: Path,
                  batch_size: int, overwrite: bool = False) -> tuple[dict[str, str], dict[str, str], int]:
    """Caption ``names`` with resume; returns (all captions, failures, number captioned now).

    ``make_captioner`` is called only if something is left to do (loading BLIP-2 takes a while).
    """
    partial = output.with_name(output.stem + ".partial.jsonl")
    if overwrite:
        partial.unlink(missing_ok=True)
    done: dict[str, str] = {}
    if output.is_file() and not overwrite:
        done.update(_read_caption_file(output))
    for n, row in enumerate(read_jsonl(partial), 1):
        if not (isinstance(row, dict) and isinstance(row.get("name"), str)
                and isinstance(row.get("caption"), str)):
            die(f"{partial}: line {n} is not a {{name, caption}} record; remove the file to start over")
        done[row["name"]] = row["caption"]
    todo = [n for n in names if n not in done]
    captioner = make_captioner() if todo else None
    failed: dict[str, str] = {}
    new = 0
    partial.parent.mkdir(parents=True, exist_ok=True)
    with open(partial, "a") as sidecar, tqdm(total=len(todo), desc=output.name, unit="img") as bar:
        for start in range(0, len(todo), batch_size):
            batch = todo[start:start + batch_size]
            captions, errors = captioner(batch)
            for name, caption in captions.items():
                sidecar.write(json.dumps({"name": name, "caption": caption}) + "\n")
            sidecar.flush()  # a crash loses at most the batch in flight
            done.update(captions)
            new += len(captions)
            for name, err in errors.items():
                tqdm.write(f"error: {err}", file=sys.stderr)
            failed.update(errors)
            bar.update(len(batch))
    result = {n: done[n] for n in names if n in done}
    atomic_write_json(output, result)
    partial.unlink(missing_ok=True)
    return result, failed, new


def main(argv=None) -> int:
    cfg = parse_config(CaptionConfig, argv, description=__doc__)
    if cfg.dataset not in DATASET_NAMES:
        die(f"--dataset {cfg.dataset or '(missing)'}: choose one of {', '.join(DATASET_NAMES)}")
    info = get_dataset_info(cfg.dataset, cfg.data_root)
    if cfg.split not in info.splits:
        die(f"--split {cfg.split}: {cfg.dataset} has splits {', '.join(info.splits)}")
    mode = cfg.mode or (info.caption_source if info.caption_source in MODES else "class_names")
    if mode not in MODES:
        die(f"--mode {mode}: choose one of {', '.join(MODES)}")
    spec = info.splits[cfg.split]
    if cfg.output:
        output = Path(cfg.output)
    elif spec.caption_file:
        output = info.root() / spec.caption_file
    else:
        die(f"{cfg.dataset}/{cfg.split} has no caption_file in its dataset module; pass --output")

    if mode == "coco_first":
        path = Path(cfg.coco_captions) if cfg.coco_captions else (
            info.root() / "annotations" / f"captions_{Path(spec.img_dir).name}.json")
        table = load_coco_first_captions(path)
        names = sorted(table)
        make_captioner, batch_size = (lambda: coco_first_captioner(table, path)), 4096
    elif mode == "class_names":
        names = split_ids(info, cfg.split)
        make_captioner, batch_size = (lambda: class_name_captioner(info, cfg.split, cfg.num_workers)), 256
    else:
        names = split_ids(info, cfg.split)
        make_captioner, batch_size = (lambda: blip2_captioner(cfg, info, cfg.split)), max(1, cfg.batch_size)
    if not names:
        die(f"{cfg.dataset}/{cfg.split}: no images found")

    result, failed, new = caption_split(names, make_captioner, output, batch_size, cfg.overwrite)
    failures_path = output.with_name(output.stem + ".failures.json")
    if failed:
        atomic_write_json(failures_path, failed)
    else:
        failures_path.unlink(missing_ok=True)
    print(f"{cfg.dataset}/{cfg.split} ({mode}): {len(result)}/{len(names)} captioned, {new} new -> {output}")
    if failed:
        print(f"error: {len(failed)} failed (listed in {failures_path}):", file=sys.stderr)
        for name, err in sorted(failed.items()):
            print(f"  {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
