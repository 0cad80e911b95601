"""inference.generate: same seed -> same bytes with 1 or 2 processes, as launched (no thread
variables set by hand); resume == uninterrupted."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dataset import get_dataset_info
from dataset.synthetic import SyntheticWriter, batches, pair_seed, repeat_shuffled, shard
from inference.generate import GenerateConfig, main, make_prompts
from tests.fixtures_uvit_pipeline import SIZE as UVIT_SIZE, write_authors_pipeline_folder
from tests.test_pipeline import NUM_LABELS, make_tiny_pipeline

REPO = Path(__file__).resolve().parents[1]
N = 7  # odd, so the last batch is short and the two processes get unequal shares
# files of the run folder, not of the dataset: they name the folder and carry timestamps
RUN_FILES = {"config.yaml", "log.txt"}


@pytest.fixture(scope="module", params=["unet", "uvit"])
def world(tmp_path_factory, request):
    """A toy dataset and a tiny pipeline of each backbone: ours (widened UNet, 32 px) and the
    authors' U-ViT folder layout (16 px); every test below runs on both."""
    from dataset.toy_shapes import write_toy_dataset

    root = tmp_path_factory.mktemp(f"gen_{request.param}")
    if request.param == "unet":
        make_tiny_pipeline().save_pretrained(root / "pipe", safe_serialization=True)
    else:
        write_authors_pipeline_folder(root / "pipe", num_labels=NUM_LABELS)
    write_toy_dataset(root / "toy", size=32, num_train=5, num_val=1, seed=0, progress=False)
    return root


def image_size(world) -> int:
    return UVIT_SIZE if (world / "pipe" / "image_vae").is_dir() else 32


def args(world, out, *extra):
    return ["--pipeline", str(world / "pipe"), "--dataset", "toy", "--data_root", str(world / "toy"),
            "--num_pairs", str(N), "--batch_size", "2", "--num_inference_steps", "2",
            "--output_dir", str(out), *extra]


def dataset_files(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*"))
            if p.is_file() and p.name not in RUN_FILES}


@pytest.fixture(scope="module", autouse=True)
def _restore_threads():
    import torch

    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def reference(world):
    out = world / "ref"
    main(args(world, out))
    return out


def test_dataset_layout_and_contents(world, reference):
    info = get_dataset_info("toy")
    names = [f"{i:06d}" for i in range(N)]
    assert sorted(p.stem for p in (reference / "img_dir/train").iterdir()) == names
    assert sorted(p.stem for p in (reference / "ann_dir/train").iterdir()) == names
    for name in names:
        mask = np.asarray(Image.open(reference / f"ann_dir/train/{name}.png"))
        assert mask.ndim == 2 and mask.dtype == np.uint8 and mask.shape == (image_size(world),) * 2
        assert np.isin(mask, list(range(info.num_labels)) + [255]).all()
        assert np.asarray(Image.open(reference / f"img_dir/train/{name}.png")).shape == (image_size(world),) * 2 + (3,)
    rows = [json.loads(l) for l in (reference / "manifest.jsonl").read_text().splitlines()]
    assert [r["index"] for r in rows] == list(range(N))
    assert [r["seed"] for r in rows] == [pair_seed(0, i) for i in range(N)]
    train_captions = set(json.loads((world / "toy/captions/train.json").read_text()).values())
    assert all(r["prompt"] in train_captions for r in rows)
    assert rows[0]["settings"]["guidance_scale"] == 8.0 and rows[0]["checkpoint"] == str(world / "pipe")
    captions = json.loads((reference / "captions/train.json").read_text())
    assert captions == {r["name"]: r["prompt"] for r in rows}
    meta = json.loads((reference / "dataset.json").read_text())
    assert meta["num_pairs"] == N and meta["dataset"] == "toy" and meta["generator"] == "jodiffusion"
    assert (reference / "preview.png").stat().st_size > 0
    # the real-dataset loader reads it as a toy dataset
    from dataset.segmentation import SegmentationDataset

    ds = SegmentationDataset(get_dataset_info("toy", str(reference)), "train")
    assert len(ds) == N and ds[0]["caption"] == captions["000000"]


def launch(world, out: Path, num_processes: int) -> subprocess.Popen:
    """``torchrun --nproc_per_node N -m inference.generate`` in the launcher's default environment:
    no thread variables (torchrun sets OMP_NUM_THREADS=1 for 2+ processes only; one process and
    accelerate's multi-CPU state take every core). ``accelerate launch --num_processes 2`` starts
    one process on a CPU-only machine, so torchrun is the CPU multi-process launcher."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    env.update(ACCELERATE_USE_CPU="true", HF_HUB_OFFLINE="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(num_processes),
           "-m", "inference.generate", *args(world, out)]
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def test_one_and_two_launched_processes_give_the_same_bytes(world, reference):
    # without the entry point pinning its threads, 1 process ran on every core and 2 on one thread
    # each: a grey level apart on a 2-core machine (a 1-core machine cannot tell them apart)
    runs = {n: (world / f"launched_{n}", launch(world, world / f"launched_{n}", n)) for n in (1, 2)}
    logs = {n: p.communicate(timeout=300)[0].decode() for n, (_, p) in runs.items()}
    assert all(p.returncode == 0 for _, p in runs.values()), logs
    assert "2 process(es)" in logs[2] and "1 process(es)" in logs[1]
    one, two = (dataset_files(runs[n][0]) for n in (1, 2))
    assert len(one) > 2 * N and one == two
    assert one == dataset_files(reference)  # and the same as a call of main() in this process


def test_interrupted_run_resumes_to_the_same_bytes(world, reference):
    out = world / "resumed"
    main(args(world, out, "--stop_after", "3"))
    done = sorted((out / "parts").glob("*.json"))
    assert 0 < len(done) < N and not (out / "manifest.jsonl").exists()
    # what a kill leaves behind: a half-written temporary and an image whose record never came
    (out / "img_dir/train/.000005.png.x1y2.tmp.png").write_bytes(b"\x89PNG half")
    (out / "img_dir/train/000006.png").write_bytes(b"\x89PNG half")
    main(args(world, out))
    assert dataset_files(out) == dataset_files(reference)


def test_other_settings_in_the_same_folder_are_refused(world, reference, tmp_path):
    out = tmp_path / "mixed"
    main(args(world, out, "--stop_after", "1"))
    with pytest.raises(SystemExit):
        main(args(world, out, "--guidance_scale", "3"))


def test_prompt_sources(world, tmp_path):
    info = get_dataset_info("toy", str(world / "toy"))
    prompt_file = tmp_path / "prompts.txt"
    prompt_file.write_text("a circle\n\na star\n")
    cfg = GenerateConfig(num_pairs=5, prompt_source="file", prompt_file=str(prompt_file), seed=3)
    prompts = make_prompts(cfg, info)
    assert len(prompts) == 5 and sorted(prompts[:2]) == ["a circle", "a star"]
    cfg = GenerateConfig(num_pairs=NUM_LABELS - 1, prompt_source="class_names")
    assert sorted(make_prompts(cfg, info)) == sorted(info.class_name_caption([k]) for k in range(1, NUM_LABELS))
    with pytest.raises(SystemExit):
        make_prompts(GenerateConfig(prompt_source="file", prompt_file=str(tmp_path / "none.txt")), info)


def test_seeding_and_sharding_helpers():
    assert pair_seed(0, 1) != pair_seed(1, 0) and pair_seed(5, 9) == pair_seed(5, 9)
    chunks = batches(range(7), 2)
    assert chunks == [[0, 1], [2, 3], [4, 5], [6]]
    assert sorted(i for r in range(3) for b in shard(chunks, r, 3) for i in b) == list(range(7))
    drawn = repeat_shuffled(["a", "b", "c"], 7, seed=0)
    assert drawn[:6].count("a") == 2 and drawn == repeat_shuffled(["a", "b", "c"], 7, seed=0)


def test_writer_never_shows_an_unfinished_pair(tmp_path):
    w = SyntheticWriter(tmp_path, "toy")
    img = np.zeros((4, 4, 3), np.uint8)
    with pytest.raises(ValueError):
        w.write_pair(0, img, np.zeros((4, 4), np.int64), {})  # wrong mask dtype: nothing committed
    assert not w.is_done(0)
    w.write_pair(0, img, np.zeros((4, 4), np.uint8), {"prompt": "x"})
    assert w.is_done(0) and w.records()[0]["prompt"] == "x"
