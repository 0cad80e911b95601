"""The joint trainer run as a GPU user runs it, with two processes (here on the CPU):

    ACCELERATE_USE_CPU=true torchrun --standalone --nproc_per_node 2 -m train.joint_diffusion ...

(``accelerate launch --cpu`` starts one process only). Each process must train on its own share
of every global batch, the log must count both in the effective batch, only the main process
writes the run's files, and a run stopped after a checkpoint and resumed with
``--resume_from_checkpoint latest`` must end with the weights of the run that was not stopped.

Run as a module under torchrun, this file is the trainer with a probe that records the cache
rows each process trained on (see ``_train_and_record_rows``).
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dataset.toy_shapes import write_toy_dataset
from models.label_vae import LabelVAE
from tests.test_joint_training import CPU_FAST, SIZE, TINY_BASE
from tests.torchrun import REPO, torchrun
from utils.io import read_jsonl

ITEMS, BATCH, ACCUM, PROCESSES = 48, 4, 2, 2  # a global batch of 4 x 2 x 2 = 16; 6 micro-steps an epoch


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A 48-image toy dataset, a tiny base model (3 VAE steps) and a tiny label VAE (factor 4)."""
    from train import toy_base_model

    root = tmp_path_factory.mktemp("joint_mp")
    write_toy_dataset(root / "toy", SIZE, ITEMS, 4, seed=0, progress=False)
    toy_base_model.main(["--data_root", str(root / "toy"), "--output_dir", str(root / "base")] + TINY_BASE)
    torch.manual_seed(0)
    LabelVAE(num_labels=6, encoder_channels=(8, 8, 8), decoder_channels=(8, 8, 8),
             norm_num_groups=8).save_pretrained(root / "label_vae")
    return root


def _torchrun(world, out: Path, *extra: str) -> list[list[list[int]]]:
    """Train with two CPU processes into ``out``; the cache rows of each micro-step, per process."""
    args = CPU_FAST + ["--data_root", str(world / "toy"), "--pretrained_model", str(world / "base"),
                       "--label_vae", str(world / "label_vae"), "--output_dir", str(out),
                       "--train_batch_size", str(BATCH), "--gradient_accumulation_steps", str(ACCUM),
                       "--learning_rate", "1e-3", "--max_train_steps", "4", "--logging_steps", "1",
                       "--checkpointing_steps", "2", "--cache_latents", "--cache_dir", str(world / "cache"),
                       "--use_ema", "--ema_decay", "0.9", "--num_validation_images", "0", *extra]
    rows_dir = out.parent / f"{out.name}_rows"
    rows_dir.mkdir()
    proc = torchrun("tests.test_joint_multiprocess", [rows_dir, *args], PROCESSES)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads((rows_dir / f"rows-{rank}.json").read_text()) for rank in range(PROCESSES)]


def _unet(path: Path) -> dict:
    return load_file(path / "diffusion_pytorch_model.safetensors")


def test_two_processes_share_the_batches_and_resume_to_the_same_weights(world):
    whole = world / "whole"
    rows = _torchrun(world, whole)

    # each process trains on its own share of every global batch, and one epoch covers every item once
    steps_per_epoch = ITEMS // (BATCH * PROCESSES)
    assert [len(r) for r in rows] == [4 * ACCUM] * PROCESSES
    for micro in range(4 * ACCUM):
        items = [{row % ITEMS for row in r[micro]} for r in rows]
        assert all(len(i) == BATCH for i in items) and not items[0] & items[1], micro
    epoch = [row % ITEMS for r in rows for micro in range(steps_per_epoch) for row in r[micro]]
    assert sorted(epoch) == list(range(ITEMS))

    log = (whole / "log.txt").read_text()
    assert f"steps of {BATCH} x {PROCESSES} x {ACCUM} = {BATCH * PROCESSES * ACCUM}" in log
    # only the main process writes: one line per event, one metrics row per step
    assert log.count(f"saved {whole / 'checkpoint-2'}\n") == 1 and log.count("exported the EMA pipeline") == 1
    assert [r["step"] for r in read_jsonl(whole / "metrics.jsonl")] == [1, 2, 3, 4]
    assert sorted(p.name for p in (whole / "checkpoint-2").glob("random_states_*")) == \
        [f"random_states_{rank}.pkl" for rank in range(PROCESSES)]  # each process's own random state

    # a run stopped after its step-2 checkpoint (as a job killed at step 3 leaves it), resumed
    stopped = world / "stopped"
    stopped.mkdir()
    shutil.copytree(whole / "checkpoint-2", stopped / "checkpoint-2")
    resumed_rows = _torchrun(world, stopped, "--resume_from_checkpoint", "latest")
    assert f"resumed from {stopped / 'checkpoint-2'} at step 2" in (stopped / "log.txt").read_text()
    assert [r[2 * ACCUM:] for r in rows] == resumed_rows  # it goes on with the same data
    for sub in ("pipeline/unet", "checkpoint-4/unet", "checkpoint-4/unet_ema"):
        a, b = _unet(whole / sub), _unet(stopped / sub)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), sub
    start = _unet(world / "base" / "unet")
    assert any(not torch.equal(start[k], a[k]) for k in start if start[k].shape == a[k].shape)  # it trained


@pytest.mark.parametrize("world_size", ["1", "2"])
def test_a_launched_rank_keeps_its_ddp_model_until_it_exits(world_size):
    """Under torchrun (``WORLD_SIZE`` > 1) the trainers hold what they prepared (the DDP model) to the
    end and leave with ``exit_launched_process``: freeing DDP after the last collective can deadlock
    in gloo (``utils.training.prepare_held``). One process frees them and exits as usual."""
    script = ("import sys\n"
              "from utils.training import exit_launched_process, hold_until_exit\n"
              "class Model:\n"
              "    def __del__(self):\n"
              "        print('freed', flush=True)\n"
              "def train():\n"
              "    hold_until_exit(Model())\n"
              "    print('trained', end='')\n"
              "    sys.stderr.write('logged')\n"
              "train()\n"
              "print(' returned')\n"
              "exit_launched_process()\n"
              "print('finalized')\n")
    env = dict(os.environ, WORLD_SIZE=world_size)
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)  # a hang guard (the import of torch), not a speed check
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stderr.endswith("logged")  # buffered output is flushed before the process ends
    if world_size == "1":
        assert proc.stdout.split() == ["freed", "trained", "returned", "finalized"]
    else:  # held past the return, then the process ends without finalization
        assert proc.stdout == "trained returned\n"


def _train_and_record_rows(rows_dir: str, argv: list[str]) -> None:
    """The real entry point; the cache rows each micro-step trains on go to ``rows-<rank>.json``."""
    from dataset.latents import CachedSource
    from train import joint_diffusion

    seen, latents = [], CachedSource.latents

    def recording(self, rows, *args, **kwargs):
        seen.append(rows.tolist())
        return latents(self, rows, *args, **kwargs)

    CachedSource.latents = recording
    try:
        joint_diffusion.main(argv)
    finally:
        Path(rows_dir, f"rows-{os.environ['RANK']}.json").write_text(json.dumps(seen))


if __name__ == "__main__":
    from utils.training import exit_launched_process

    _train_and_record_rows(sys.argv[1], sys.argv[2:])
    exit_launched_process()  # as train.joint_diffusion's entry point does
