"""The joint trainer on the authors' U-ViT: step 0 written from a (tiny) UniDiffuser folder, their
objective, and the same run behaviour as the UNet path (resume, EMA, checkpoint limit, gradient
checkpointing, validation pictures, export)."""
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from dataset.toy_shapes import write_toy_dataset
from models.uvit_training import UVIT_LOSS_PARTS, uvit_joint_loss
from tests.fixtures_authors_label_vae import write_authors_label_vae_folder
from tests.fixtures_unidiffuser import write_tiny_unidiffuser_folder
from utils.io import read_jsonl

SIZE = 16  # px: the tiny UniDiffuser's factor-2 VAE -> 8 x 8 latents
CPU = ["--resolution", str(SIZE), "--mixed_precision", "no", "--use_8bit_adam", "false", "--dataloader_num_workers", "0",
       "--validation_inference_steps", "2", "--dataset", "toy", "--train_batch_size", "8", "--logging_steps", "1"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A 32-image toy dataset and the U-ViT step-0 folder made from a tiny UniDiffuser + label VAE."""
    from inference.uvit_init import main as uvit_init

    root = tmp_path_factory.mktemp("uvit_train")
    write_toy_dataset(root / "toy", SIZE, 32, 4, seed=0, progress=False)
    write_tiny_unidiffuser_folder(root / "unidiffuser")
    write_authors_label_vae_folder(root / "label_vae", out_channels=6, in_channels=3)
    uvit_init(["--unidiffuser", str(root / "unidiffuser"), "--label_vae", str(root / "label_vae"),
               "--output_dir", str(root / "init")])
    return root


def args(world, out, *extra):
    return CPU + ["--data_root", str(world / "toy"), "--pretrained_model", str(world / "init"), "--output_dir", str(out),
                  *extra]


def test_objective_is_one_mse_over_text_image_clip_and_label(world):
    from models.pipelines import TRAINING

    models, unet, sched = TRAINING["uvit"].load(str(world / "init"), str(world / "init" / "label_vae"),
                                                __import__("dataset").get_dataset_info("toy"))
    b, cfg = 2, unet.config
    text = torch.randn(b, cfg.num_text_tokens, cfg.text_dim)
    image, label = torch.randn(b, 4, 8, 8), torch.randn(b, 4, 8, 8)
    clip = torch.randn(b, 1, cfg.clip_img_dim)
    loss, parts = uvit_joint_loss(unet, sched, text, image, clip, label, torch.Generator().manual_seed(3))
    # by hand: two timesteps, then the four noises, in that order from the same generator
    g = torch.Generator().manual_seed(3)
    t_img, t_text = torch.randint(0, 1000, (b,), generator=g), torch.randint(0, 1000, (b,), generator=g)
    noise = [torch.randn(x.shape, generator=g) for x in (text, image, clip, label)]
    with torch.no_grad():
        out = unet(sched.add_noise(text, noise[0], t_text), sched.add_noise(image, noise[1], t_img),
                   sched.add_noise(clip, noise[2], t_img), sched.add_noise(label, noise[3], t_img), t_img, t_text)
    flat_pred = torch.cat([o.flatten(1) for o in out], 1)
    flat_noise = torch.cat([n.flatten(1) for n in noise], 1)
    torch.testing.assert_close(loss.detach(), ((flat_pred - flat_noise) ** 2).mean())
    assert set(parts) == set(UVIT_LOSS_PARTS)
    torch.testing.assert_close(parts["text"], ((out[0] - noise[0]) ** 2).mean())
    no_text, _ = uvit_joint_loss(unet, sched, text, image, clip, label, torch.Generator().manual_seed(3),
                                 part_weights={"text": 0.0})
    rest = torch.cat([(o - n).flatten(1) for o, n in zip(out[1:], noise[1:])], 1)
    torch.testing.assert_close(no_text.detach(), (rest ** 2).mean())


def test_uvit_trains_with_checkpointing_and_exports_a_pipeline_that_generates(world):
    from models.pipelines import check_pipeline, load_pipeline
    from utils.precision import cpu_generators

    out = world / "run"
    from train import joint_diffusion

    joint_diffusion.main(args(world, out, "--learning_rate", "2e-3", "--max_train_steps", "24",
                              "--gradient_checkpointing", "true", "--checkpointing_steps", "0",
                              "--num_validation_images", "2"))
    rows = read_jsonl(out / "metrics.jsonl")
    assert len(rows) == 24 and all(np.isfinite([r[f"{k}_loss"] for k in UVIT_LOSS_PARTS]).all() for r in rows)
    first, last = np.mean([r["loss"] for r in rows[:6]]), np.mean([r["loss"] for r in rows[-6:]])
    assert last < first, (first, last)
    log = (out / "log.txt").read_text()
    assert "uvit JoDiffusionUViT" in log
    assert (out / "validation" / "step-24.png").is_file() and (out / "loss.png").is_file()
    for part in ("image_encoder", "clip_image_processor", "unet", "label_vae", "image_vae"):
        assert (out / "pipeline" / part).is_dir(), part
    assert check_pipeline(str(out / "pipeline"), __import__("dataset").get_dataset_info("toy")) == "uvit"
    res = load_pipeline(str(out / "pipeline"), torch.float32, "cpu")(["a photo of circle"], num_inference_steps=2,
                                                                      generator=cpu_generators([0]))
    assert res.images.shape == (1, SIZE, SIZE, 3) and res.masks.shape == (1, SIZE, SIZE)


def test_stopped_and_resumed_uvit_run_ends_with_the_same_weights(world):
    from train import joint_diffusion

    common = args(world, world / "unused", "--gradient_accumulation_steps", "2", "--learning_rate", "1e-3",
                  "--cache_latents", "--cache_dir", str(world / "cache"), "--use_ema", "--ema_decay", "0.9",
                  "--checkpointing_steps", "2", "--num_validation_images", "0", "--gradient_checkpointing", "false")
    common = common[:common.index("--output_dir")] + common[common.index("--output_dir") + 2:]
    whole, split = world / "whole", world / "split"
    joint_diffusion.main(common + ["--output_dir", str(whole), "--max_train_steps", "4"])
    cache = load_file(next((world / "cache").glob("shard-*.safetensors")))
    assert cache["clip"].shape[1:] == (1, 16) and cache["clip_flip"].shape == cache["clip"].shape
    joint_diffusion.main(common + ["--output_dir", str(split), "--max_train_steps", "2"])
    assert (split / "checkpoint-2" / "unet_ema").is_dir()
    joint_diffusion.main(common + ["--output_dir", str(split), "--max_train_steps", "4", "--resume_from_checkpoint",
                                   "latest", "--checkpoints_total_limit", "1"])
    assert sorted(p.name for p in split.glob("checkpoint-*")) == ["checkpoint-4"]
    for sub in ("pipeline/unet", "checkpoint-4/unet"):
        a = load_file(whole / sub / "diffusion_pytorch_model.safetensors")
        b = load_file(split / sub / "diffusion_pytorch_model.safetensors")
        assert a.keys() == b.keys() and max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6, sub
    start = load_file(world / "init" / "unet" / "diffusion_pytorch_model.safetensors")
    assert any(not torch.equal(start[k], a[k]) for k in a)


def test_image_mode_is_refused_for_the_uvit_with_one_line(world, capsys):
    from train import joint_diffusion

    with pytest.raises(SystemExit):
        joint_diffusion.main(args(world, world / "img", "--mode", "image", "--max_train_steps", "1"))
    err = capsys.readouterr().err
    assert "trains jointly only" in err and "Traceback" not in err


def test_two_processes_train_the_uvit_and_resume_to_the_same_weights(world):
    """``ACCELERATE_USE_CPU=true torchrun --nproc_per_node 2 -m train.joint_diffusion`` on a U-ViT folder:
    the effective batch counts both processes, only the main one writes, and a run stopped after its
    step-2 checkpoint ends with the weights of the one that was not."""
    import shutil

    from tests.torchrun import torchrun as launch

    def torchrun(out, *extra):
        argv = args(world, out, "--train_batch_size", "4", "--learning_rate", "1e-3", "--max_train_steps", "4",
                    "--checkpointing_steps", "2", "--cache_latents", "--cache_dir", str(world / "mp_cache"),
                    "--num_validation_images", "0", "--gradient_checkpointing", "false", *extra)
        proc = launch("train.joint_diffusion", argv)
        assert proc.returncode == 0, proc.stderr[-3000:]

    whole, stopped = world / "mp_whole", world / "mp_stopped"
    torchrun(whole)
    log = (whole / "log.txt").read_text()
    assert "steps of 4 x 2 x 1 = 8" in log and log.count("exported the pipeline") == 1
    assert [r["step"] for r in read_jsonl(whole / "metrics.jsonl")] == [1, 2, 3, 4]
    stopped.mkdir()
    shutil.copytree(whole / "checkpoint-2", stopped / "checkpoint-2")
    torchrun(stopped, "--resume_from_checkpoint", "latest")
    for sub in ("pipeline/unet", "checkpoint-4/unet"):
        a = load_file(whole / sub / "diffusion_pytorch_model.safetensors")
        b = load_file(stopped / sub / "diffusion_pytorch_model.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), sub
