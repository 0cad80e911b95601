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
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

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


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


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

