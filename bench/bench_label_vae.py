"""Benchmark: how well a trained label VAE reconstructs masks, and how fast it encodes + decodes.

    bash scripts/ae/toy_light.sh && python -m bench.bench_label_vae     # toy val split, CPU

1. Reconstruction on the val split: mask -> posterior-mean latent (scaled) -> decode -> argmax
   with the 0.5 confidence rule (low confidence counts as an error), scored with
   ``utils.metrics.IoUAccumulator`` over the dataset's K + 1 labels. Target on toy: mIoU >= 0.98.
2. Throughput of ``encode_masks`` + ``decode_latents_to_masks`` in masks/s (fastest of
   ``--repeats`` timed passes over the batch: on a shared machine other jobs only ever add time).

Prints and saves ``bench/results/label_vae.json``.
"""
from __future__ import annotations

import json
import platform
import statistics
import time
from dataclasses import dataclass, field

import torch

from utils.config import die, parse_config
from utils.io import atomic_write_json


@dataclass
class BenchLabelVAEConfig:
    """Label VAE reconstruction mIoU and encode+decode throughput."""

    model: str = field(default="runs/label_vae_toy", metadata={"help": "run folder or label_vae/ export"})
    dataset: str = field(default="toy", metadata={"help": "dataset whose val split is scored"})
    data_root: str | None = field(default=None, metadata={"help": "override the dataset's data_root"})
    split: str = field(default="val", metadata={"help": "split to reconstruct"})
    resolution: int | None = field(default=None, metadata={"help": "mask size (default: the dataset's)"})
    batch_size: int = field(default=100, metadata={"help": "masks per encode/decode call"})
    max_samples: int = field(default=0, metadata={"help": "masks scored (0 = all)"})
    repeats: int = field(default=5, metadata={"help": "timed passes (fastest kept)"})
    device: str = field(default="cpu", metadata={"help": "cpu or cuda"})
    cpu_threads: int | None = field(default=2, metadata={"help": "torch threads on CPU"})
    output: str = field(default="bench/results/label_vae.json", metadata={"help": "where the JSON goes"})


def main(argv=None) -> dict:
    cfg = parse_config(BenchLabelVAEConfig, argv, description=__doc__)
    if cfg.cpu_threads:
        torch.set_num_threads(cfg.cpu_threads)
    vae, info, size, masks = load_model_and_masks(cfg)
    with torch.no_grad():
        res, low_conf = score_reconstruction(vae, masks, cfg.batch_size, info.ignore_index, info.num_labels)
        batch = masks[: cfg.batch_size]
        times = time_encode_decode(vae, batch, cfg.repeats, cfg.device)

    result = {
        "model": str(cfg.model),
        "model_class": type(vae).__name__,
        "parameters": sum(p.numel() for p in vae.parameters()),
        "scaling_factor": float(vae.config.scaling_factor),
        "dataset": info.name,
        "split": cfg.split,
        "resolution": size,
        "num_masks": len(masks),
        "reconstruction_mIoU": res["mIoU"],
        "reconstruction_pixel_acc": res["pixel_acc"],
        "per_class_IoU": dict(zip(info.classes, res["per_class_IoU"])),
        "low_confidence_pixel_fraction": low_conf / max(1, int((masks != info.ignore_index).sum())),
        "target_mIoU": 0.98,
        "meets_target": bool(res["mIoU"] >= 0.98),
        "throughput_batch": len(batch),
        "encode_decode_masks_per_s": len(batch) / min(times),
        "encode_decode_masks_per_s_median": len(batch) / statistics.median(times),
        "device": cfg.device,
        "cpu_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "torch": torch.__version__,
    }
    atomic_write_json(cfg.output, result)
    print(json.dumps(result, indent=2))
    return result


def load_model_and_masks(cfg: BenchLabelVAEConfig):
    """(label VAE on ``cfg.device``, dataset info, mask size, the split's masks stacked); a bad model
    or dataset, or a label count that does not match, stops with a message."""
    from dataset import get_dataset_info
    from dataset.segmentation import DatasetError, SegmentationDataset
    from models.label_vae import load_label_vae

    try:
        vae = load_label_vae(cfg.model).to(cfg.device).eval()
    except (FileNotFoundError, ValueError) as e:
        die(str(e))
    info = get_dataset_info(cfg.dataset, cfg.data_root)
    size = cfg.resolution or info.default_size
    try:
        ds = SegmentationDataset(info, cfg.split, size=size)
    except DatasetError as e:
        die(str(e))
    n = min(len(ds), cfg.max_samples) if cfg.max_samples else len(ds)
    masks = torch.stack([ds[i]["mask"] for i in range(n)])
    if vae.config.num_labels != info.num_labels:
        die(f"{cfg.model}: model decodes {vae.config.num_labels} labels, dataset {info.name} has {info.num_labels}")
    return vae, info, size, masks


def score_reconstruction(vae, masks: torch.Tensor, batch_size: int, ignore_index: int, num_labels: int):
    """Encode, decode and argmax every mask (0.5 confidence rule); returns (IoU result, pixels a
    low confidence turned into ``ignore_index``)."""
    from models.label_vae import decode_latents_to_masks, encode_masks
    from utils.metrics import IoUAccumulator

    acc, low_conf = IoUAccumulator(num_labels, ignore_index), 0
    for s in range(0, len(masks), batch_size):
        batch = masks[s : s + batch_size]
        recon, _ = decode_latents_to_masks(vae, encode_masks(vae, batch), ignore_index=ignore_index)
        recon = recon.cpu()
        acc.update(recon.numpy(), batch.numpy())
        low_conf += int(((recon == ignore_index) & (batch != ignore_index)).sum())
    return acc.result(), low_conf


def time_encode_decode(vae, batch: torch.Tensor, repeats: int, device: str) -> list[float]:
    """Seconds of each of ``repeats`` encode + decode passes over ``batch``, after one warm-up pass."""
    from models.label_vae import decode_latents_to_masks, encode_masks

    decode_latents_to_masks(vae, encode_masks(vae, batch))  # warm-up
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        decode_latents_to_masks(vae, encode_masks(vae, batch))
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return times


if __name__ == "__main__":
    main()
