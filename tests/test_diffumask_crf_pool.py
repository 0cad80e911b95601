"""DiffuMask's masks in a CPU worker pool: the same bytes as inline, and a stopped run resumes."""
from __future__ import annotations

import io
import shutil

import numpy as np
import pytest
from PIL import Image
from scipy.ndimage import gaussian_filter

from dataset.synthetic import SyntheticWriter
from models.diffumask.affinity import WalkParams, train_affinity_net
from models.diffumask.masks import CRFParams
from models.diffumask.refine import RefineJob, RefinePool, RefineSpec, load_maps
from utils.io import atomic_write_bytes, save_image_atomic

N_PAIRS = 6


def _stage(out, n=N_PAIRS, size=40):
    """Staged pairs as pass 1 leaves them: attention/{name}.png (image) and .npy (uint8 maps)."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:size, :size]
    for i in range(n):
        cy, cx, r = rng.integers(12, size - 12, 2).tolist() + [int(rng.integers(6, 10))]
        shape = ((yy - cy) ** 2 + (xx - cx) ** 2) < r * r
        image = np.clip(rng.normal(80, 10, (size, size, 3)), 0, 255)
        image[shape] = rng.integers(150, 256, 3)
        soft = gaussian_filter(shape.astype(float), 3.0)
        maps = np.rint(np.stack([soft / soft.max(), np.roll(soft, 9, axis=1) * 0.6]) * 255).astype(np.uint8)
        buf = io.BytesIO()
        np.save(buf, maps, allow_pickle=False)
        atomic_write_bytes(out / "attention" / f"{i:06d}.npy", buf.getvalue())
        save_image_atomic(out / "attention" / f"{i:06d}.png", image.astype(np.uint8))
    return [RefineJob(i, f"a shape {i}", ("circle", "square"), (1, 2), 1000 + i) for i in range(n)]


def _spec(out, net=""):
    return RefineSpec(out_dir=str(out), dataset="toy", img_suffix=".png", resolution=40,
                      gammas=(0.35, 0.45, 0.55), refine="crf", affinity_net=str(net),
                      walk=WalkParams(walk_size=20, radius=3, iterations=10), crf=CRFParams(), base_model="tiny")


def _files(out):
    return {p.relative_to(out).as_posix(): p.read_bytes() for d in ("img_dir", "ann_dir", "parts")
            for p in sorted((out / d).rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def affinity_net(tmp_path_factory):
    """A learned affinity net, so the workers load one from its file as a real run does."""
    folder = tmp_path_factory.mktemp("net")
    _stage(folder, n=2)
    samples = [(np.asarray(Image.open(folder / f"attention/{i:06d}.png")),
                load_maps(folder / f"attention/{i:06d}.npy", 40)) for i in range(2)]
    net = train_affinity_net(samples, WalkParams(walk_size=20, radius=3), epochs=1, batch_size=2)
    net.save(folder / "aff.safetensors")
    return folder / "aff.safetensors"


def _run(out, jobs, workers, net, offer=False, on_result=None):
    results = []
    with RefinePool(_spec(out, net), workers, on_result or results.append) as pool:
        for job in jobs:
            (pool.offer if offer else pool.submit)(job)
    return results


@pytest.mark.parametrize("use_net", [False, True], ids=["colour", "learned"])
def test_pool_writes_the_same_bytes_as_inline(tmp_path, affinity_net, use_net):
    net = affinity_net if use_net else ""
    inline, pooled = tmp_path / "inline", tmp_path / "pooled"
    jobs = _stage(inline)
    shutil.copytree(inline, pooled)
    r_inline = _run(inline, jobs, workers=0, net=net)
    r_pool = _run(pooled, jobs, workers=2, net=net, offer=True)  # offered, as during generation
    assert sorted(r.index for r in r_pool) == list(range(N_PAIRS)) and not any(r.skipped for r in r_pool)
    assert [r.gamma for r in sorted(r_pool, key=lambda r: r.index)] == [r.gamma for r in r_inline]
    files = _files(inline)
    assert len(files) == 3 * N_PAIRS and files == _files(pooled)
    masks = [np.asarray(Image.open(inline / f"ann_dir/train/{i:06d}.png")) for i in range(N_PAIRS)]
    assert sum(bool(m.any()) for m in masks) >= N_PAIRS // 2  # the comparison is over real masks
    for out in (inline, pooled):  # staged images removed once written; the maps stay
        assert not list((out / "attention").glob("*.png")) and len(list((out / "attention").glob("*.npy"))) == N_PAIRS


def test_a_stopped_pool_leaves_written_or_staged_pairs_and_resumes(tmp_path):
    clean, stopped = tmp_path / "clean", tmp_path / "stopped"
    jobs = _stage(clean)
    shutil.copytree(clean, stopped)
    _run(clean, jobs, workers=0, net="")

    def interrupt(result):
        raise KeyboardInterrupt  # Ctrl-C while the first results come back

    with pytest.raises(KeyboardInterrupt):
        _run(stopped, jobs, workers=2, net="", on_result=interrupt)
    writer = SyntheticWriter(stopped, "toy")
    done = [j.index for j in jobs if writer.is_done(j.index)]
    assert 0 < len(done) < N_PAIRS  # stopped part way
    for j in jobs:  # every pair is either written or still staged, never lost
        assert writer.is_done(j.index) or (stopped / f"attention/{j.index:06d}.png").is_file()
    results = _run(stopped, [j for j in jobs if not writer.is_done(j.index)], workers=2, net="")
    assert len(results) == N_PAIRS - len(done)
    assert _files(stopped) == _files(clean)
    assert writer.remove_temporaries() == 0  # no half-written file anywhere


def test_unreadable_staged_pair_is_named_skipped_and_dropped(tmp_path):
    out = tmp_path / "out"
    jobs = _stage(out, n=3)
    (out / "attention/000001.npy").write_bytes(b"\x93NUMPY cut short")
    results = {r.index: r for r in _run(out, jobs, workers=0, net="")}
    assert "000001" in results[1].skipped and not results[0].skipped and not results[2].skipped
    # dropped from the stage, so the rerun that finalize asks for generates it again
    assert not (out / "attention/000001.png").exists() and not (out / "attention/000001.npy").exists()
    assert not SyntheticWriter(out, "toy").is_done(1)


@pytest.mark.slow  # timing-dependent under load: how many pairs the pool finishes before the stop
def test_generation_stopped_during_the_masks_resumes_to_the_same_bytes(tmp_path, monkeypatch):
    from inference.diffumask import main
    from models.diffumask import generate
    from models.tiny_kit import build_tiny_sd

    words = ["a", "red", "blue", "green", "yellow", "circle", "square"]
    base = build_tiny_sd(tmp_path / "base", words)
    args = ["--config", "configs/diffumask/toy.yaml", "--base_model", str(base), "--classes", "circle", "square",
            "--images_per_class", "3", "--num_inference_steps", "2", "--batch_size", "2", "--crf_workers", "2"]
    main(args + ["--output_dir", str(tmp_path / "clean")])
    count = generate.MaskStats.__call__

    def stop_after_first(self, result):
        count(self, result)
        raise KeyboardInterrupt

    monkeypatch.setattr(generate.MaskStats, "__call__", stop_after_first)
    with pytest.raises(KeyboardInterrupt):
        main(args + ["--output_dir", str(tmp_path / "stopped")])
    monkeypatch.undo()
    assert not (tmp_path / "stopped/manifest.jsonl").exists()
    summary = main(args + ["--output_dir", str(tmp_path / "stopped")])
    assert 0 < summary["written_this_run"] < 6
    for rel in ["manifest.jsonl", "dataset.json"]:
        assert (tmp_path / "clean" / rel).read_bytes() == (tmp_path / "stopped" / rel).read_bytes()
    assert _files(tmp_path / "clean") == _files(tmp_path / "stopped")
