"""The label-VAE trainer with two CPU processes, launched as on a multi-GPU node:

    ACCELERATE_USE_CPU=true torchrun --standalone --nproc_per_node 2 -m train.label_vae ...

(``accelerate launch --cpu`` starts one process only). Each launch pays the import of torch and
diffusers in both processes (~6 s CPU each): the test takes ~18 s on a quiet 2-core machine, like
the joint trainer's (tests/test_joint_multiprocess.py), and runs in the default suite.
"""
import shutil

import pytest
import torch
from safetensors.torch import load_file

from tests.torchrun import torchrun
from utils.io import read_jsonl


@pytest.fixture(scope="module")
def toy_root(tmp_path_factory):
    from dataset.toy_shapes import write_toy_dataset

    root = tmp_path_factory.mktemp("toy")
    write_toy_dataset(root, size=16, num_train=48, num_val=8, seed=0, progress=False)
    bad = root / "ann_dir" / "train" / "000005.png"  # found corrupt mid-run by whichever process reads it
    data = bad.read_bytes()
    bad.write_bytes(data[:data.index(b"IDAT") + 8])
    return root


def _torchrun(root, out, **over):
    opts = dict(dataset="toy", data_root=root, output_dir=out, encoder_channels="8 16",
                decoder_channels="16 16", norm_num_groups=4, resolution=16, train_batch_size=4,
                total_batch_size=8, learning_rate=1e-2, max_train_steps=8, mixed_precision="no",
                dataloader_num_workers=0, checkpointing_steps=4, validation_steps=100,
                validation_batch_size=8, logging_steps=1, latent_stats_samples=16)
    opts.update(over)
    argv = []
    for k, v in opts.items():
        argv += [f"--{k}", *str(v).split()]
    proc = torchrun("train.label_vae", argv)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_two_processes_share_the_data_write_once_and_resume_to_the_same_weights(toy_root, tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    _torchrun(toy_root, full)
    log = (full / "log.txt").read_text()
    # both processes count in the effective batch: 4 per process x 2 processes, no accumulation
    assert "batch 4 x 1 accum x 2 processes = 8 masks per step" in log, log
    # only the main process writes: one log line per event, one metrics row per step
    assert log.count("saved " + str(full / "label_vae")) == 1, log
    assert [r["step"] for r in read_jsonl(full / "metrics.jsonl") if "loss" in r] == list(range(1, 9))
    assert sorted(p.name for p in full.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-8"]
    # a bad file met by either process reaches the main process's log
    assert "skipped 1 bad training file(s)" in log and str(toy_root / "ann_dir" / "train" / "000005.png") in log

    # the run stopped after its checkpoint at step 4; resume it to step 8
    part.mkdir()
    shutil.copytree(full / "checkpoint-4", part / "checkpoint-4")
    _torchrun(toy_root, part, resume_from_checkpoint="latest")
    assert f"resumed from {part / 'checkpoint-4'} at step 4" in (part / "log.txt").read_text()
    a = load_file(full / "label_vae" / "diffusion_pytorch_model.safetensors")
    b = load_file(part / "label_vae" / "diffusion_pytorch_model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    first = load_file(full / "checkpoint-4" / "model.safetensors")
    assert any(not torch.equal(first[k], a[k]) for k in a)  # steps 5-8 did change the weights
