"""DiffuMask baseline: attention capture, mask extraction, noise filter, mosaic, entry points."""
from __future__ import annotations

import json
from pathlib import Path
import math

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter

from models.diffumask.affinity import ColourAffinity, RandomWalker, WalkParams, random_walk_refine
from models.diffumask.attention import (AttentionStore, ClassWordError, capture_cross_attention,
                                        token_weights)
from models.diffumask.masks import dense_crf, extract_mask, foreground_iou, threshold_mask
from models.diffumask.mosaic import make_mosaic
from models.diffumask.noise import keep_best
from models.diffumask.prompts import PromptPlan

WORDS = ["a", "photo", "of", "red", "blue", "green", "circle", "square", "triangle", "ring", "star"]


@pytest.fixture(scope="module")
def tiny_pipe():
    from diffusers import StableDiffusionPipeline

    from models.tiny_kit import tiny_components

    pipe = StableDiffusionPipeline(**tiny_components(WORDS), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _run(pipe, prompts, words, resolutions=(), steps=None, guidance=7.0):
    store = AttentionStore(token_weights(pipe.tokenizer, prompts, words), (32, 32), resolutions, steps)
    with capture_cross_attention(pipe.unet, store):
        pipe(prompts, num_inference_steps=3, guidance_scale=guidance, height=32, width=32, output_type="np",
             generator=[torch.Generator().manual_seed(i) for i in range(len(prompts))])
    return store


def test_capture_shapes_normalisation_and_restore(tiny_pipe):
    before = {k: type(v) for k, v in tiny_pipe.unet.attn_processors.items()}
    store = _run(tiny_pipe, ["a red circle and a blue square", "a green star"],
                 [["circle", "square"], ["star"]])
    maps = store.maps()
    assert maps.shape == (2, 2, 32, 32)
    assert store.seen_resolutions == {4, 8}  # 8x8 latents: only these grids exist
    assert store.num_steps_recorded == 3
    assert float(maps.min()) >= 0 and float(maps.max()) <= 1
    assert torch.allclose(maps[0].amax(dim=(1, 2)), torch.ones(2))
    assert torch.allclose(maps[1, 0].max(), torch.tensor(1.0))
    assert float(maps[1, 1].abs().max()) == 0  # padding class of the one-class prompt stays empty
    assert {k: type(v) for k, v in tiny_pipe.unet.attn_processors.items()} == before


def test_minmax_normalisation_is_an_affine_rescale_of_the_max_maps(tiny_pipe):
    prompts, words = ["a red circle and a blue square"], [["circle", "square"]]
    plain = _run(tiny_pipe, prompts, words).maps()
    store = AttentionStore(token_weights(tiny_pipe.tokenizer, prompts, words), (32, 32),
                           normalization="minmax")
    with capture_cross_attention(tiny_pipe.unet, store):
        tiny_pipe(prompts, num_inference_steps=3, guidance_scale=7.0, height=32, width=32, output_type="np",
                  generator=[torch.Generator().manual_seed(0)])
    mm = store.maps()
    # every class map spans exactly [0, 1], and it is the max-normalised map rescaled
    assert torch.allclose(mm[0].amin(dim=(1, 2)), torch.zeros(2), atol=1e-6)
    assert torch.allclose(mm[0].amax(dim=(1, 2)), torch.ones(2))
    lo = plain[0].amin(dim=(1, 2), keepdim=True)
    assert torch.allclose(mm[0], (plain[0] - lo) / (1 - lo), atol=1e-5)
    with pytest.raises(ValueError, match="normalization"):
        AttentionStore(token_weights(tiny_pipe.tokenizer, prompts, words), (32, 32), normalization="l2")


def test_capture_without_guidance_and_step_selection(tiny_pipe):
    store = _run(tiny_pipe, ["a red circle"], [["circle"]], resolutions=(8,), steps=[1], guidance=1.0)
    assert store.num_steps_recorded == 1 and store.maps().shape == (1, 1, 32, 32)


def test_missing_resolution_is_a_clear_error(tiny_pipe):
    store = _run(tiny_pipe, ["a red circle"], [["circle"]], resolutions=(16, 8))
    with pytest.raises(ValueError, match=r"resolution\(s\) \[16\].*available: \[4, 8\]"):
        store.maps()


def test_absent_class_word_and_subword_pieces(tiny_pipe):
    with pytest.raises(ClassWordError, match="'star' is not in prompt 'a red circle'"):
        token_weights(tiny_pipe.tokenizer, ["a red circle"], [["star"]])
    w = token_weights(tiny_pipe.tokenizer, ["a red zebra"], [["zebra"]])  # unknown word: char pieces
    pieces = torch.nonzero(w[0, 0]).flatten()
    assert len(pieces) > 1 and torch.allclose(w[0, 0].sum(), torch.tensor(1.0))
    assert torch.allclose(w[0, 0, pieces], torch.full((len(pieces),), 1.0 / len(pieces)))


def _blurred_shape(size=64, sigma=5.0):
    yy, xx = np.mgrid[:size, :size]
    sharp = (((yy - 30) ** 2 + (xx - 34) ** 2) < 15 ** 2).astype(np.uint8)
    rng = np.random.default_rng(0)
    image = np.array([40, 90, 160], float) + rng.normal(0, 8, (size, size, 3))
    image[sharp > 0] = [220, 40, 30]
    soft = gaussian_filter(sharp.astype(float), sigma)
    return np.clip(image, 0, 255).astype(np.uint8), sharp, (soft / soft.max())[None]


@pytest.mark.parametrize("gamma", [0.35, 0.55])
def test_crf_and_random_walk_sharpen_a_blurred_mask(gamma):
    image, sharp, maps = _blurred_shape()
    base = foreground_iou(threshold_mask(maps, [1], gamma), sharp)
    crf = foreground_iou(dense_crf(image, maps, [1], gamma), sharp)
    walked = random_walk_refine(image, maps, ColourAffinity(), WalkParams(walk_size=64, radius=3, iterations=20))
    rw = foreground_iou(threshold_mask(walked, [1], gamma), sharp)
    assert base < 0.95
    assert crf > base + 0.03 and rw > base + 0.03
    assert walked.shape == maps.shape and walked.max() == pytest.approx(1.0)


def test_adaptive_gamma_and_multiple_classes():
    image, sharp, maps = _blurred_shape()
    second = np.zeros_like(maps[0])
    second[2:12, 2:12] = 1.0
    image[2:12, 2:12] = [250, 250, 40]
    both = np.concatenate([maps, second[None]])
    walker = RandomWalker(ColourAffinity(), WalkParams(walk_size=64, radius=3, iterations=20))
    mask, gamma, extra = extract_mask(image, both, [3, 5], [0.35, 0.45, 0.55], "crf", walker)
    assert gamma in (0.35, 0.45, 0.55) and 0 <= extra["agreement"] <= 1
    assert set(np.unique(mask)) == {0, 3, 5}
    assert (mask[4:10, 4:10] == 5).all() and (mask[sharp > 0] == 3).mean() > 0.95


def _square_pairs(n, size=24, seed=0):
    rng = np.random.default_rng(seed)
    images, masks = [], []
    for _ in range(n):
        image = np.empty((size, size, 3), np.uint8)
        image[:] = rng.integers(0, 90, 3)
        y, x = rng.integers(2, size - 12, 2)
        image[y:y + 10, x:x + 10] = rng.integers(170, 256, 3)
        mask = np.zeros((size, size), np.uint8)
        mask[y:y + 10, x:x + 10] = 1
        images.append(image)
        masks.append(mask)
    return images, masks


def test_noise_filter_keeps_fraction_and_drops_planted_pairs_first(tmp_path):
    from dataset import get_dataset_info
    from dataset.synthetic import SyntheticWriter
    from inference.diffumask_noise_filter import main

    images, masks = _square_pairs(30)
    planted = {3, 11, 17, 26}
    writer = SyntheticWriter(tmp_path, "toy")
    for i, (im, m) in enumerate(zip(images, masks)):
        if i in planted:  # the mask marks a region the picture does not show
            m = np.roll(m, (12, 12), axis=(0, 1))
        writer.write_pair(i, im, m, {"prompt": "a square"})
    writer.finalize(get_dataset_info("toy"), "test", {})
    summary = main(["--data_dir", str(tmp_path), "--keep_fraction", "0.8", "--epochs", "12",
                    "--batch_size", "10", "--width", "16"])
    kept = (tmp_path / "kept.txt").read_text().split()
    assert len(kept) == math.ceil(0.8 * 30) == summary["kept"]
    assert not {f"{i:06d}" for i in planted} & set(kept)
    scores = [json.loads(line) for line in (tmp_path / "scores.jsonl").read_text().splitlines()]
    assert len(scores) == 30 and all(0 <= s["score"] <= 1 for s in scores)
    assert len(list((tmp_path / "img_dir" / "train").glob("*.png"))) == 30  # nothing deleted
    # the kept pairs, as a synthetic set of their own that the segmenter scripts take (SYNTH=..._kept)
    out = Path(f"{tmp_path}_kept")
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["num_pairs"] == len(kept) and meta["subset"]["keep_fraction"] == 0.8
    assert [json.loads(line)["name"] for line in (out / "manifest.jsonl").read_text().splitlines()] == kept
    for name in kept:
        for sub in ("img_dir", "ann_dir"):
            assert (out / sub / "train" / f"{name}.png").read_bytes() == \
                (tmp_path / sub / "train" / f"{name}.png").read_bytes()
    assert sorted(p.stem for p in (out / "ann_dir" / "train").glob("*.png")) == kept


def test_keep_best_breaks_ties_by_index():
    assert keep_best([0.5, 0.9, 0.5, 0.1], 0.5).tolist() == [0, 1]
    with pytest.raises(ValueError):
        keep_best([0.1], 0.0)


def test_mosaic_splices_image_and_mask_alike():
    tiles = []
    for k in range(4):
        img = np.full((8, 8, 3), 40 * k, np.uint8)
        tiles.append((img, np.full((8, 8), k, np.uint8)))
    image, mask = make_mosaic(tiles, (2, 2), 16)
    assert image.shape == (16, 16, 3) and mask.shape == (16, 16)
    assert mask[0, 0] == 0 and mask[0, 15] == 1 and mask[15, 0] == 2 and mask[15, 15] == 3
    assert (image[mask == 3] == 120).all()
    image, mask = make_mosaic(tiles[:2], (2, 1), 8)
    assert set(np.unique(mask)) == {0, 1}


def test_prompt_plan_is_class_agnostic_and_seeded():
    plan = PromptPlan.from_dataset("toy", "configs/diffumask/subclasses_toy.json", "a {subclass} {word}")
    prompt, words, labels = plan.prompt_for(7, images_per_class=5, seed=0)
    assert words == ["square"] and labels == [2] and prompt.endswith(" square") and len(prompt.split()) == 3
    assert plan.prompt_for(7, 5, 0) == (prompt, words, labels)
    p2, w2, l2 = plan.prompt_for(0, 5, 0, classes_per_image=2)
    assert len(set(l2)) == 2 and all(w in p2 for w in w2)
    with pytest.raises(ValueError, match="unknown class"):
        PromptPlan(["circle"], {"sqaure": ["red"]})


def test_generate_is_seed_deterministic_and_mosaics(tmp_path):
    from inference.diffumask import main
    from inference.diffumask_mosaic import main as mosaic_main
    from models.tiny_kit import build_tiny_sd

    base = build_tiny_sd(tmp_path / "base", WORDS + ["yellow", "orange", "purple", "cyan", "pink", "white", "black"])
    args = ["--config", "configs/diffumask/toy.yaml", "--base_model", str(base), "--classes", "circle", "square",
            "--images_per_class", "2", "--num_inference_steps", "2", "--batch_size", "2"]
    runs = []
    for name, workers in (("a", "2"), ("b", "0")):  # masks in a CPU worker pool, then inline
        summary = main(args + ["--output_dir", str(tmp_path / name), "--crf_workers", workers])
        assert summary["num_pairs"] == 4 and summary["pairs_per_s"] > 0
        runs.append(tmp_path / name)
    rels = ["manifest.jsonl", "dataset.json"] + [f"{d}/train/00000{i}.png" for d in ("img_dir", "ann_dir")
                                                 for i in range(4)] + [f"attention/00000{i}.npy" for i in range(4)]
    for rel in rels:
        assert (runs[0] / rel).read_bytes() == (runs[1] / rel).read_bytes(), rel
    assert not list((runs[0] / "attention").glob("*.png"))  # staged images removed once written
    rows = [json.loads(x) for x in (runs[0] / "manifest.jsonl").read_text().splitlines()]
    assert [r["class_labels"] for r in rows] == [[1], [1], [2], [2]]
    assert all(r["gamma"] in (0.35, 0.4, 0.45, 0.5, 0.55) for r in rows)
    from PIL import Image

    for r in rows:
        m = np.asarray(Image.open(runs[0] / r["mask"]))
        assert m.shape == (32, 32) and set(np.unique(m)) <= {0, r["class_labels"][0]}
    meta = mosaic_main(["--data_dir", str(runs[0]), "--output_dir", str(tmp_path / "mosaic"),
                        "--num_mosaics", "3", "--layouts", "2x2"])
    assert meta["num_pairs"] == 3
    assert np.asarray(Image.open(tmp_path / "mosaic/img_dir/train/000002.png")).shape == (32, 32, 3)


def test_entry_point_rejects_bad_settings(tmp_path, capsys):
    from inference.diffumask import main

    with pytest.raises(SystemExit):
        main(["--dataset", "toy", "--base_model", str(tmp_path), "--output_dir", str(tmp_path / "o")])
    assert "model_index.json" in capsys.readouterr().err


def test_learned_affinity_net_trains_saves_and_separates_regions(tmp_path):
    from models.diffumask.affinity import AffinityNet, LearnedAffinity, neighbour_offsets, train_affinity_net

    image, sharp, maps = _blurred_shape(size=32, sigma=1.5)
    # radius 4: confident fg and bg pixels (map >= 0.7 / <= 0.2) must fall within reach of each other
    params = WalkParams(walk_size=32, radius=4, iterations=10)
    net = train_affinity_net([(image, maps)] * 4, params, epochs=10, batch_size=4, lr=3e-3)
    net.save(tmp_path / "aff.safetensors")
    loaded = LearnedAffinity(AffinityNet.from_file(tmp_path / "aff.safetensors"))
    img = torch.from_numpy(image).permute(2, 0, 1).float() / 255
    offsets = neighbour_offsets(4)
    a = loaded(img, offsets, 4)
    assert a.shape == (len(offsets), 32, 32) and float(a.min()) >= 0 and float(a.max()) <= 1
    right = offsets.index((0, 2))
    lab = torch.from_numpy(sharp).bool()
    same = lab[:, :-2] == lab[:, 2:]  # pixel pairs two columns apart: same region or across the edge
    assert a[right][:, :-2][same].mean() > a[right][:, :-2][~same].mean() + 0.1
