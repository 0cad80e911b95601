"""Files that are never left half-written, and the per-run folder every entry point writes.

Partial output must never look complete: everything goes to a temporary name in the same
folder and is renamed into place (``os.replace`` is atomic on POSIX).
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import shutil
import struct
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
from PIL import Image


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it to ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp" + path.suffix, dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


@contextlib.contextmanager
def atomic_folder(path: str | Path) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``path``; it replaces ``path`` only if the block
    succeeds (a folder that looks complete is complete), and is removed if it fails."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def read_json_object(path: str | Path) -> dict:
    """A JSON file holding an object; ValueError("<path>: ...") when it is missing, unreadable or not an object."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ValueError(f"{path}: missing or unreadable ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: not a JSON object")
    return data


def save_pretrained_atomic(obj: Any, folder: str | Path) -> Path:
    """``obj.save_pretrained`` (safetensors) into a temporary sibling renamed to ``folder`` once
    complete, replacing an older export: an interrupted save never leaves a folder that looks done."""
    with atomic_folder(folder) as tmp:
        obj.save_pretrained(str(tmp), safe_serialization=True)
    return Path(folder)


def encode_image(array: np.ndarray, fmt: str, **save_kwargs) -> bytes:
    """Encode an HxWx3 uint8 image or HxW uint8 mask to PNG/JPEG bytes (deterministic)."""
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array)).save(buf, format=fmt, **save_kwargs)
    return buf.getvalue()


def save_image_atomic(path: str | Path, array: np.ndarray, **save_kwargs) -> None:
    path = Path(path)
    fmt = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG"}[path.suffix.lower()]
    if fmt == "JPEG":
        save_kwargs.setdefault("quality", 95)
    atomic_write_bytes(path, encode_image(array, fmt, **save_kwargs))


# a safetensors header is a JSON table of tensor names -> dtype, shape, byte offsets; real ones
# are kilobytes to a few MB, so a larger length means the file is something else
_MAX_SAFETENSORS_HEADER = 100 * 1024 * 1024
# the files that make a diffusers/transformers component folder a component
_CONFIG_NAMES = ("config.json", "scheduler_config.json", "tokenizer_config.json",
                 "preprocessor_config.json")


def check_weights_file(path: str | Path) -> None:
    """Raise ValueError("<path>: ...") unless ``path`` is a complete safetensors file.

    Reads only the header (8-byte length + JSON table) and compares the file's size with the
    end of the last tensor, so a download or copy cut short is found without loading anything.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: weights file not found")
    size = path.stat().st_size

    def bad(detail: str) -> ValueError:
        return ValueError(f"{path}: truncated or not a safetensors file ({detail})")

    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise bad(f"{size} bytes, too short for a header")
        (n,) = struct.unpack("<Q", head)
        if n > min(size - 8, _MAX_SAFETENSORS_HEADER):
            raise bad(f"header length {n} but the file has {size} bytes")
        raw = f.read(n)
    try:
        table = json.loads(raw.decode("utf-8"))
        ends = [int(v["data_offsets"][1]) for k, v in table.items() if k != "__metadata__"]
    except (UnicodeDecodeError, json.JSONDecodeError, AttributeError, KeyError, IndexError,
            TypeError, ValueError) as e:
        raise bad(f"header is not a safetensors tensor table: {e}") from None
    need = 8 + n + max(ends, default=0)
    if size < need:
        raise bad(f"{size} bytes, its header needs {need}")


def _check_component(folder: Path, name: str) -> None:
    comp = folder / name
    if not comp.is_dir():
        raise ValueError(f"{comp}: component folder '{name}' of the pipeline is missing")
    configs = [comp / c for c in _CONFIG_NAMES if (comp / c).is_file()]
    if not configs:
        raise ValueError(f"{comp}: component '{name}' has no config file ({' / '.join(_CONFIG_NAMES)})")
    for config in configs:
        try:
            if not isinstance(json.loads(config.read_text(encoding="utf-8")), dict):
                raise ValueError("not a JSON object")
        except (OSError, UnicodeDecodeError, ValueError) as e:
            raise ValueError(f"{config}: unreadable config ({e})") from None
    if not (comp / "config.json").is_file():
        return  # scheduler, tokenizer, processor: configuration only, no weights
    weights = sorted(comp.glob("*.safetensors"))
    for index in sorted(comp.glob("*.safetensors.index.json")):  # sharded weights
        try:
            shards = set(json.loads(index.read_text())["weight_map"].values())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError,
                AttributeError) as e:
            raise ValueError(f"{index}: broken shard index ({e})") from None
        missing = sorted(s for s in shards if not (comp / s).is_file())
        if missing:
            raise ValueError(f"{comp / missing[0]}: weights shard listed in {index.name} is missing")
    if not weights and not any(comp.glob("*.bin")):
        raise ValueError(f"{comp}: component '{name}' has no weights file (*.safetensors)")
    for w in weights:
        check_weights_file(w)


def check_pipeline_folder(folder: str | Path, components: Iterable[str] | None = None) -> None:
    """Raise ValueError naming the first missing or broken part of a diffusers pipeline folder.

    Checks ``model_index.json``, then for each component (``components``, or every non-null
    one listed in ``model_index.json``) its folder, its config file and, for models, that every
    safetensors weights file is complete (``check_weights_file``: header reads only).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"{folder}: pipeline folder not found")
    index = folder / "model_index.json"
    if not index.is_file():
        raise ValueError(f"{index}: missing; {folder} is not a diffusers pipeline folder")
    try:
        table = json.loads(index.read_text())
        if not isinstance(table, dict):
            raise ValueError("not a JSON object")
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ValueError(f"{index}: not a valid model index ({e})") from None
    if components is None:
        components = [k for k, v in table.items() if not k.startswith("_") and isinstance(v, list)
                      and len(v) == 2 and v[1] is not None]
    for name in components:
        _check_component(folder, name)


def read_jsonl(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if line:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                break  # a line cut by a crash: everything before it is good
    return rows


class RunDir:
    """A run's own folder: ``config.yaml``, ``log.txt``, ``metrics.jsonl`` and whatever else it saves.

    Only the main process should write (pass ``is_main=False`` on the others: the object then
    does nothing).
    """

    def __init__(self, path: str | Path, is_main: bool = True, name: str = "jodiffusion"):
        self.path = Path(path)
        self.is_main = is_main
        self.logger = logging.getLogger(f"{name}.{self.path}")
        self.logger.setLevel(logging.INFO)
        self.logger.propagate = False
        if is_main:
            self.path.mkdir(parents=True, exist_ok=True)
            if not self.logger.handlers:
                fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S")
                fh = logging.FileHandler(self.path / "log.txt")
                fh.setFormatter(fmt)
                sh = logging.StreamHandler(sys.stderr)
                sh.setFormatter(fmt)
                self.logger.addHandler(fh)
                self.logger.addHandler(sh)

    def save_config(self, cfg: Any) -> None:
        if self.is_main:
            from utils.config import save_config

            save_config(cfg, self.path / "config.yaml")

    def log(self, message: str) -> None:
        if self.is_main:
            self.logger.info(message)

    def log_metrics(self, **metrics: Any) -> None:
        """Append one JSON line to ``metrics.jsonl`` (flushed at once, so a crash loses nothing)."""
        if not self.is_main:
            return
        metrics.setdefault("time", round(time.time(), 3))
        with open(self.path / "metrics.jsonl", "a") as f:
            f.write(json.dumps(metrics, default=float) + "\n")
            f.flush()

    def close(self) -> None:
        for h in list(self.logger.handlers):
            h.close()
            self.logger.removeHandler(h)

