"""The toy U-ViT base: an untrained UniDiffuser folder built from the toy SD base, pretrained in
image mode by the joint trainer with UniDiffuser's objective, then turned into the JoDiffusion
U-ViT by inference.uvit_init and generating image + mask pairs."""
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from dataset import get_dataset_info
from dataset.toy_shapes import write_toy_dataset
from models.pipelines import TRAINING, load_pipeline, training_backbone
from models.uvit_training import UNIDIFFUSER_LOSS_PARTS, unidiffuser_loss
from tests.fixtures_authors_label_vae import write_authors_label_vae_folder
from utils.io import read_jsonl
from utils.precision import cpu_generators

SIZE = 16  # px; factor-2 VAE -> 8 x 8 latents
TINY_SD = ["--resolution", str(SIZE), "--vae_channels", "8", "16", "--unet_channels", "16", "32", "--text_hidden", "16",
           "--text_layers", "1", "--max_length", "16", "--train_batch_size", "8", "--max_train_steps", "3",
           "--logging_steps", "1"]
TINY_UVIT = ["--num_attention_heads", "2", "--attention_head_dim", "8", "--num_layers", "3", "--text_prefix_dim", "8",
             "--clip_img_dim", "16", "--vision_hidden", "16", "--vision_layers", "1", "--vision_patch", "8"]
CPU = ["--mode", "image", "--dataset", "toy", "--resolution", str(SIZE), "--mixed_precision", "no", "--use_8bit_adam",
       "false", "--gradient_checkpointing", "false", "--dataloader_num_workers", "0", "--train_batch_size", "8",
       "--logging_steps", "1", "--caption_dropout", "0"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A 32-image toy set, a tiny SD base (factor-2 VAE), its toy UniDiffuser and a label VAE."""
    from train import toy_base_model, toy_unidiffuser_base

    root = tmp_path_factory.mktemp("toy_unidiffuser")
    write_toy_dataset(root / "toy", SIZE, 32, 4, seed=0, progress=False)
    toy_base_model.main(["--data_root", str(root / "toy"), "--output_dir", str(root / "sd_base")] + TINY_SD)
    toy_unidiffuser_base.main(["--sd_base", str(root / "sd_base"), "--output_dir", str(root / "base")] + TINY_UVIT)
    write_authors_label_vae_folder(root / "label_vae", out_channels=6, in_channels=3)
    return root


def train_args(world, out, *extra):
    return CPU + ["--data_root", str(world / "toy"), "--pretrained_model", str(world / "base"),
                  "--output_dir", str(out), *extra]


def test_builder_writes_a_unidiffuser_folder_that_uvit_init_accepts(world, tmp_path):
    from models.uvit_init import write_uvit_pipeline_folder
    from train import toy_unidiffuser_base

    base = world / "base"
    for ours, theirs in (("vae", "vae"), ("text_encoder", "text_encoder")):  # the SD base's, unchanged
        a, b = next((base / ours).glob("*.safetensors")), next((world / "sd_base" / theirs).glob("*.safetensors"))
        assert a.read_bytes() == b.read_bytes(), ours
    assert not list(base.rglob("*.bin"))  # safetensors only, the tied caption decoder included
    unet = load_file(base / "unet" / "diffusion_pytorch_model.safetensors")
    assert unet["text_in.weight"].shape == (16, 8) and unet["clip_img_in.weight"].shape == (16, 16)
    assert unet["pos_embed"].shape == (1, 2 + 16 + 1 + 16, 16)  # t_img, t_text, 16 text tokens, clip, 4x4 patches
    assert training_backbone(base) == "unidiffuser" and training_backbone(world / "sd_base") == "unet"
    assert training_backbone("some-org/some-model") == "unet"
    again = toy_unidiffuser_base.main(["--sd_base", str(world / "sd_base"), "--output_dir", str(tmp_path / "b")]
                                      + TINY_UVIT)
    assert (again / "unet" / "diffusion_pytorch_model.safetensors").read_bytes() == \
        (base / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()  # same seed, same bytes
    out = write_uvit_pipeline_folder(base, world / "label_vae", tmp_path / "init")
    assert training_backbone(out) == "uvit"


def test_objective_is_one_mse_over_text_image_and_clip(world):
    models, unet, sched = TRAINING["unidiffuser"].load(str(world / "base"), None, get_dataset_info("toy"))
    assert models["label_vae"] is None and not any(p.requires_grad for p in models["text_decoder"].parameters())
    b = 2
    text, image, clip = torch.randn(b, 16, 8), torch.randn(b, 4, 8, 8), torch.randn(b, 1, 16)
    loss, parts = unidiffuser_loss(unet, sched, text, image, clip, torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)  # by hand: t_img, t_text, then the three noises
    t_img, t_text = torch.randint(0, 1000, (b,), generator=g), torch.randint(0, 1000, (b,), generator=g)
    noise = [torch.randn(x.shape, generator=g) for x in (text, image, clip)]
    with torch.no_grad():
        img_out, clip_out, text_out = unet(sched.add_noise(image, noise[1], t_img), sched.add_noise(clip, noise[2], t_img),
                                           sched.add_noise(text, noise[0], t_text), t_img, t_text, data_type=1)
    flat = torch.cat([(o - n).flatten(1) for o, n in zip((text_out, img_out, clip_out), noise)], 1)
    torch.testing.assert_close(loss.detach(), (flat ** 2).mean())
    assert set(parts) == set(UNIDIFFUSER_LOSS_PARTS)
    torch.testing.assert_close(parts["clip"], ((clip_out - noise[2]) ** 2).mean())


@pytest.fixture(scope="module")
def runs(world):
    """4 steps in one go, and 2 + 2 with a resume (EMA, accumulation, cached latents and CLIP embeddings)."""
    from train import joint_diffusion

    common = ["--gradient_accumulation_steps", "2", "--learning_rate", "1e-3", "--cache_latents", "--cache_dir",
              str(world / "cache"), "--use_ema", "--ema_decay", "0.9", "--checkpointing_steps", "2",
              "--num_validation_images", "1"]
    joint_diffusion.main(train_args(world, world / "whole", *common, "--max_train_steps", "4"))
    joint_diffusion.main(train_args(world, world / "split", *common, "--max_train_steps", "2"))
    joint_diffusion.main(train_args(world, world / "split", *common, "--max_train_steps", "4",
                                    "--resume_from_checkpoint", "latest"))
    return world


def test_image_mode_logs_every_part_and_resumes_to_the_same_weights(runs):
    rows = read_jsonl(runs / "whole" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert all(np.isfinite([r["loss"], r["image_loss"], r["text_loss"], r["clip_loss"]]).all() for r in rows)
    assert "label_loss" not in rows[0]
    log = (runs / "whole" / "log.txt").read_text()
    assert "unidiffuser UniDiffuserModel" in log and "no validation grids" in log
    assert "resumed from" in (runs / "split" / "log.txt").read_text()
    for sub in ("pipeline/unet", "checkpoint-4/unet"):
        a = load_file(runs / "whole" / sub / "diffusion_pytorch_model.safetensors")
        b = load_file(runs / "split" / sub / "diffusion_pytorch_model.safetensors")
        assert a.keys() == b.keys() and max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6, sub
    start = load_file(runs / "base" / "unet" / "diffusion_pytorch_model.safetensors")
    assert any(not torch.equal(start[k], a[k]) for k in a)  # it did train


def test_exported_base_becomes_a_uvit_that_generates_pairs(runs):
    from inference.uvit_init import main as uvit_init

    exported = runs / "whole" / "pipeline"
    assert training_backbone(exported) == "unidiffuser"
    for part in ("vae", "text_encoder", "clip_tokenizer", "image_encoder", "text_decoder", "scheduler"):
        assert (exported / part).is_dir(), part
    init = uvit_init(["--unidiffuser", str(exported), "--label_vae", str(runs / "label_vae"),
                      "--output_dir", str(runs / "uvit_init")])
    trained = load_file(exported / "unet" / "diffusion_pytorch_model.safetensors")
    step0 = load_file(init / "unet" / "diffusion_pytorch_model.safetensors")
    assert torch.equal(step0["vae_img_in.proj.weight"], trained["vae_img_in.proj.weight"])  # the trained U-ViT carried over
    out = load_pipeline(str(init), torch.float32, "cpu")(["a red circle"], num_inference_steps=2,
                                                          generator=cpu_generators([0]))
    assert out.images.shape == (1, SIZE, SIZE, 3) and out.masks.shape == (1, SIZE, SIZE)
    # the label VAE's 6 label ids, or the ignore label where it is unsure
    assert set(np.unique(out.masks).tolist()) <= set(range(6)) | {get_dataset_info("toy").ignore_index}


@pytest.mark.parametrize("extra, message", [
    (["--mode", "joint"], "image mode only"),
    (["--gradient_checkpointing", "true"], "--gradient_checkpointing"),
])
def test_what_the_unidiffuser_cannot_do_stops_with_one_line(world, capsys, extra, message):
    from train import joint_diffusion

    with pytest.raises(SystemExit):
        joint_diffusion.main(train_args(world, world / f"bad{len(extra[1])}", "--max_train_steps", "1", *extra))
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
