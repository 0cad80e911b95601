"""Pickled ``.bin`` weights, read safely and rewritten as safetensors.

Some released folders (the authors' step-0 JoDiffusion folder among them) hold PyTorch ``.bin``
files. They are read with ``torch.load(weights_only=True)``, which unpickles tensors and plain
containers only, and must be a flat dict of tensors; anything else is refused with one line.

    state = read_bin_state_dict("unet/diffusion_pytorch_model.bin")
    convert_folder("downloads/jodiffusion", "weights/jodiffusion")   # every .bin -> .safetensors
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from utils.io import atomic_folder

# diffusers' and transformers' weight names, .bin -> .safetensors
_RENAMES = {"diffusion_pytorch_model": "diffusion_pytorch_model", "pytorch_model": "model"}


def read_bin_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A ``.bin`` state dict as tensors; ValueError naming the file when it holds anything else."""
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 -- pickle errors come in many types; the message is what matters
        raise ValueError(f"{path}: not a plain tensor file ({' '.join(str(e).split())[:200]})") from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise ValueError(f"{path}: holds {type(state).__name__}, not a flat dict of named tensors")
    return state


def safetensors_name(bin_name: str) -> str:
    """``diffusion_pytorch_model.bin`` -> ``diffusion_pytorch_model.safetensors``, ``pytorch_model.bin``
    -> ``model.safetensors`` (shards keep their ``-0000k-of-0000n`` suffix)."""
    stem = bin_name[: -len(".bin")]
    for old, new in _RENAMES.items():
        if stem == old or stem.startswith(old + "-"):
            return new + stem[len(old):] + ".safetensors"
    return stem + ".safetensors"


def _convert_file(src: Path, dst_dir: Path) -> None:
    state = read_bin_state_dict(src)
    # safetensors refuses tensors sharing storage (tied weights): each is written as its own copy
    save_file({k: v.contiguous().clone() for k, v in state.items()}, str(dst_dir / safetensors_name(src.name)),
              metadata={"format": "pt"})


def _convert_index(src: Path, dst_dir: Path) -> None:
    """A sharded ``*.bin.index.json`` -> the safetensors index naming the converted shards."""
    index = json.loads(src.read_text(encoding="utf-8"))
    index["weight_map"] = {k: safetensors_name(v) for k, v in index.get("weight_map", {}).items()}
    name = safetensors_name(src.name[: -len(".index.json")]) + ".index.json"
    (dst_dir / name).write_text(json.dumps(index, indent=2), encoding="utf-8")


def convert_folder(src: str | Path, dst: str | Path) -> list[Path]:
    """Copy the folder ``src`` to ``dst`` with every ``.bin`` (and shard index) rewritten as
    safetensors; written under a temporary name and renamed once complete. Returns the converted files."""
    src, dst = Path(src), Path(dst)
    if not src.is_dir():
        raise ValueError(f"{src}: folder not found")
    converted = []
    with atomic_folder(dst) as tmp:
        for path in sorted(src.rglob("*")):
            rel = path.relative_to(src)
            if path.is_dir() or any(part.startswith(".") for part in rel.parts):
                continue
            (tmp / rel.parent).mkdir(parents=True, exist_ok=True)
            if path.name.endswith(".bin"):
                _convert_file(path, tmp / rel.parent)
                converted.append(rel)
            elif path.name.endswith(".bin.index.json"):
                _convert_index(path, tmp / rel.parent)
            else:
                shutil.copy2(path, tmp / rel)
    return converted


def download_snapshot(repo_id: str, revision: str | None = None, allow_patterns=None, ignore_patterns=None) -> Path:
    """A hub repository's snapshot (huggingface_hub's cache; ``HF_TOKEN`` from the environment);
    ValueError("<repo>: download failed (...)") in one line when offline, unknown or refused."""
    from huggingface_hub import snapshot_download  # only for hub ids

    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=allow_patterns,
                                      ignore_patterns=ignore_patterns))
    except Exception as e:  # noqa: BLE001 -- offline, unknown repo, no access: one line either way
        raise ValueError(f"{repo_id}: download failed ({' '.join(str(e).split())[:300]})") from None
