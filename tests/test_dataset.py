"""SegmentationDataset over tiny trees laid out like ADE20K, VOC and COCO: items, captions,
augmentation alignment, and the errors a user meets with a misplaced or broken dataset."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from dataset import get_dataset_info
from dataset.segmentation import DatasetError, SegmentationDataset, load_captions, read_image, read_mask
from tests.fixtures_datasets import LABEL_STEP, make_colour_coded, make_fixture, save_png

DATASETS = ("ade20k", "voc", "coco")


def _valid_values(info):
    return set(range(info.num_labels)) | {info.ignore_index}


@pytest.mark.parametrize("name", DATASETS)
def test_loader_items_have_the_right_shapes_values_and_captions(tmp_path, name):
    fx = make_fixture(name, tmp_path)
    for split in ("train", "val"):
        ds = SegmentationDataset(fx.info, split, size=16)
        assert ds.ids == fx.ids(split)  # VOC: only listed images, not the extra one
        for i in range(len(ds)):
            item = ds[i]
            assert item["image"].shape == (3, 16, 16) and item["image"].dtype == torch.float32
            assert -1.0 <= item["image"].min() and item["image"].max() <= 1.0
            assert item["mask"].shape == (16, 16) and item["mask"].dtype == torch.int64
            assert set(item["mask"].unique().tolist()) <= _valid_values(fx.info)
            assert item["name"] == ds.ids[i] and item["skipped"] == ""
            assert item["caption"] == fx.captions[split][item["name"]]


@pytest.mark.parametrize("name", DATASETS)
def test_native_size_returns_the_annotation_unchanged(tmp_path, name):
    fx = make_fixture(name, tmp_path)
    ds = SegmentationDataset(fx.info, "train")
    for i in range(len(ds)):
        item = ds[i]
        expected = fx.masks["train"][item["name"]]
        assert item["image"].shape == (3,) + expected.shape
        np.testing.assert_array_equal(item["mask"].numpy(), expected)
    # ignore pixels (VOC boundary, COCO crowd) survive as 255, not folded into a class
    if fx.info.name in ("voc", "coco"):
        assert any((ds[i]["mask"] == 255).any() for i in range(len(ds)))


def test_class_name_captions_when_there_is_no_caption_file(tmp_path):
    fx = make_fixture("voc", tmp_path, captions=False)
    assert load_captions(fx.info, "train") is None
    for mode in ("auto", "class_names"):
        ds = SegmentationDataset(fx.info, "train", captions=mode)
        for i in range(len(ds)):
            item = ds[i]
            labels = set(item["mask"].unique().tolist()) - {0, 255}
            names = [fx.info.classes[l] for l in sorted(labels)]
            assert item["caption"] == "a photo of " + ", ".join(names)
    with pytest.raises(DatasetError, match="trainaug.json"):
        SegmentationDataset(fx.info, "train", captions="file")


def test_class_name_mode_ignores_the_caption_file(tmp_path):
    fx = make_fixture("ade20k", tmp_path)
    item = SegmentationDataset(fx.info, "train", captions="class_names")[0]
    assert item["caption"].startswith("a photo of ") and "test caption" not in item["caption"]


def test_auto_captions_fill_gaps_in_the_file_with_class_names(tmp_path):
    fx = make_fixture("coco", tmp_path)
    cap_path = fx.info.root() / fx.info.splits["train"].caption_file
    caps = json.loads(cap_path.read_text())
    dropped = sorted(caps)[0]
    del caps[dropped]
    cap_path.write_text(json.dumps(caps))
    with pytest.warns(UserWarning, match="1 of 3 images have no caption"):
        ds = SegmentationDataset(fx.info, "train")
    items = {ds[i]["name"]: ds[i]["caption"] for i in range(len(ds))}
    assert items[dropped].startswith("a photo of ")
    assert all(items[k] == v for k, v in caps.items())
    with pytest.raises(DatasetError, match=f"train2017.json.*{dropped}"):
        SegmentationDataset(fx.info, "train", captions="file")


@pytest.mark.parametrize("hw", [(24, 36), (36, 24)])  # wide and tall: crops move along x and y
def test_augmentation_moves_image_and_mask_together(tmp_path, hw):
    fx = make_colour_coded(tmp_path / "toy", hw=hw)
    # size == shorter side: no resampling, so after any crop/flip the image must decode to the mask
    ds = SegmentationDataset(fx.info, "train", size=24, augment=True, captions="class_names")
    seen = set()
    for epoch in range(6):
        ds.set_epoch(epoch)
        for i in range(len(ds)):
            item = ds[i]
            red = torch.round((item["image"][0] + 1) * 127.5).long()
            assert torch.equal(red, item["mask"] * LABEL_STEP)
            seen.add(item["mask"].numpy().tobytes())
    # crops and flips really happened: many distinct views of the 4 masks
    assert len(seen) > 2 * len(ds)


@pytest.mark.parametrize("hw", [(24, 36), (36, 24)])
def test_resize_keeps_image_and_mask_aligned(tmp_path, hw):
    fx = make_colour_coded(tmp_path / "toy", hw=hw, cell=8)
    for size in (12, 40):  # downscale and upscale
        ds = SegmentationDataset(fx.info, "train", size=size, augment=True, captions="class_names")
        for i in range(len(ds)):
            item = ds[i]
            assert item["mask"].shape == (size, size)
            decoded = torch.round((item["image"][0] + 1) * 127.5 / LABEL_STEP).long()
            # bilinear blends colours at region borders only; nearly every pixel must agree
            agreement = (decoded == item["mask"]).float().mean().item()
            assert agreement > 0.8, (size, agreement)


def test_without_augment_is_a_deterministic_centre_crop(tmp_path):
    fx = make_colour_coded(tmp_path / "toy", hw=(24, 36))
    ds = SegmentationDataset(fx.info, "train", size=24)
    name = ds.ids[0]
    np.testing.assert_array_equal(ds[0]["mask"].numpy(), fx.masks["train"][name][:, 6:30])


def test_augmentation_is_reproducible_per_seed_and_epoch(tmp_path):
    fx = make_colour_coded(tmp_path / "toy", hw=(24, 36))
    a = SegmentationDataset(fx.info, "train", size=20, augment=True, seed=5)
    b = SegmentationDataset(fx.info, "train", size=20, augment=True, seed=5)
    views = [a[i]["mask"] for i in range(len(a))]
    assert all(torch.equal(v, b[i]["mask"]) for i, v in enumerate(views))
    views_by_epoch = []
    for epoch in range(4):
        a.set_epoch(epoch)
        views_by_epoch.append(torch.stack([a[i]["mask"] for i in range(len(a))]))
    assert any(not torch.equal(views_by_epoch[0], v) for v in views_by_epoch[1:])


def test_dataloader_batches(tmp_path):
    fx = make_fixture("ade20k", tmp_path)
    loader = torch.utils.data.DataLoader(SegmentationDataset(fx.info, "train", size=16, augment=True),
                                         batch_size=2)
    batch = next(iter(loader))
    assert batch["image"].shape == (2, 3, 16, 16) and batch["mask"].shape == (2, 16, 16)
    assert len(batch["caption"]) == 2 and batch["skipped"] == ["", ""]


# --- errors a user meets: each names the file or folder to look at ---------------------------

def test_missing_data_root_says_where_to_set_it(tmp_path):
    info = get_dataset_info("voc", data_root=str(tmp_path / "nowhere"))
    with pytest.raises(DatasetError) as e:
        SegmentationDataset(info, "train")
    msg = str(e.value)
    assert str(tmp_path / "nowhere") in msg and "dataset/voc_semantic.py" in msg and "--data_root" in msg


def test_missing_split_folder(tmp_path):
    fx = make_fixture("ade20k", tmp_path)
    ann = fx.info.root() / "annotations" / "validation"
    for p in ann.iterdir():
        p.unlink()
    ann.rmdir()
    SegmentationDataset(fx.info, "train")  # the other split is fine
    with pytest.raises(DatasetError, match=str(ann)):
        SegmentationDataset(fx.info, "val")


def test_unknown_split(tmp_path):
    fx = make_fixture("coco", tmp_path)
    with pytest.raises(DatasetError, match="no split 'test'"):
        SegmentationDataset(fx.info, "test")


def test_image_without_mask(tmp_path):
    fx = make_fixture("coco", tmp_path)
    name = fx.ids("val")[1]
    (fx.info.root() / "semantic_80" / "val2017" / f"{name}.png").unlink()
    with pytest.raises(DatasetError, match=f"{name}.jpg: image has no mask"):
        SegmentationDataset(fx.info, "val")


def test_list_file_naming_a_missing_image(tmp_path):
    fx = make_fixture("voc", tmp_path)
    val_list = fx.info.root() / "ImageSets" / "Segmentation" / "val.txt"
    val_list.write_text(val_list.read_text() + "2011_ghost\n")
    with pytest.raises(DatasetError) as e:
        SegmentationDataset(fx.info, "val")
    assert str(val_list) in str(e.value) and "2011_ghost.jpg" in str(e.value)


def test_image_and_mask_of_different_sizes(tmp_path):
    fx = make_fixture("ade20k", tmp_path)
    ds = SegmentationDataset(fx.info, "train", size=16)
    save_png(ds.mask_path(1), np.zeros((7, 9), np.uint8))
    # found before training, from the headers
    with pytest.raises(DatasetError) as e:
        SegmentationDataset(fx.info, "train", size=16)
    assert str(ds.image_path(1)) in str(e.value) and str(ds.mask_path(1)) in str(e.value)
    assert "image is 28x20 but its mask" in str(e.value) and "is 9x7" in str(e.value)
    # changed under a running dataset: the strict read names both files, the item is skipped
    ds[0]  # other items still load: the check is per item
    with pytest.raises(DatasetError) as e:
        ds.load(1)
    assert str(ds.image_path(1)) in str(e.value) and str(ds.mask_path(1)) in str(e.value)
    item = ds[1]
    assert item["skipped"] == str(e.value) and item["name"] == ds.ids[2]


def test_mask_values_out_of_range(tmp_path):
    fx = make_fixture("voc", tmp_path)
    ds = SegmentationDataset(fx.info, "train", size=16)
    bad = fx.masks["train"][ds.ids[2]].copy()
    bad[0, 0] = 21  # VOC has labels 0..20 and 255
    save_png(ds.mask_path(2), bad)
    with pytest.raises(DatasetError, match=rf"{ds.ids[2]}\.png: mask values \[21\]"):
        ds.load(2)
    item = ds[2]
    assert "mask values [21]" in item["skipped"] and item["name"] == ds.ids[0]  # wraps around


def test_colour_mask_is_rejected(tmp_path):
    fx = make_fixture("ade20k", tmp_path)
    ds = SegmentationDataset(fx.info, "val")
    save_png(ds.mask_path(0), np.zeros((20, 28, 3), np.uint8))
    with pytest.raises(DatasetError, match=f"{ds.ids[0]}.png: mask has mode RGB"):
        SegmentationDataset(fx.info, "val")
    with pytest.raises(DatasetError, match=f"{ds.ids[0]}.png: mask has mode RGB"):
        ds.load(0)


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_unreadable_image(tmp_path, damage):
    fx = make_fixture("coco", tmp_path, hw=(64, 64))
    ds = SegmentationDataset(fx.info, "train", size=16)
    path = ds.image_path(0)
    data = path.read_bytes()
    path.write_bytes(b"not a jpeg at all" if damage == "garbage" else data[: len(data) // 2])
    if damage == "garbage":  # the header is broken: found when the dataset is built
        with pytest.raises(DatasetError, match=f"{path.name}: cannot read image"):
            SegmentationDataset(fx.info, "train", size=16)
    else:  # the header is intact: found when the item is decoded, and skipped
        SegmentationDataset(fx.info, "train", size=16)
        assert ds[0]["skipped"].startswith(f"{path}: cannot read image")
    with pytest.raises(DatasetError, match=f"{path.name}: cannot read image"):
        ds.load(0)
    with pytest.raises(DatasetError, match=path.name):
        read_image(path)


def test_native_size_needs_images_of_one_size(tmp_path):
    fx = make_fixture("ade20k", tmp_path)
    ds = SegmentationDataset(fx.info, "train")
    Image.new("RGB", (10, 12)).save(ds.image_path(2), format="JPEG")
    save_png(ds.mask_path(2), np.zeros((12, 10), np.uint8))
    with pytest.raises(DatasetError, match=f"{ds.ids[2]}.jpg: image is 10x12 .* need a size"):
        SegmentationDataset(fx.info, "train")
    with pytest.raises(DatasetError, match=f"{ds.ids[2]}.jpg: image is 10x12 .* need a size"):
        ds.load(2)
    assert SegmentationDataset(fx.info, "train", size=8)[2]["mask"].shape == (8, 8)


def test_broken_caption_file(tmp_path):
    fx = make_fixture("ade20k", tmp_path)
    cap = fx.info.root() / "captions" / "training.json"
    cap.write_text("{not json")
    with pytest.raises(DatasetError, match="training.json: caption file is not valid JSON"):
        SegmentationDataset(fx.info, "train")


def test_read_mask_checks_range_only_with_info(tmp_path):
    path = tmp_path / "m.png"
    save_png(path, np.array([[0, 151]], np.uint8))
    assert read_mask(path).tolist() == [[0, 151]]
    with pytest.raises(DatasetError, match="outside 0..150"):
        read_mask(path, get_dataset_info("ade20k"))
    with pytest.raises(DatasetError, match="m2.png: mask file not found"):
        read_mask(tmp_path / "m2.png")


def test_seed_none_draws_from_torch(tmp_path):
    fx = make_colour_coded(tmp_path / "toy", hw=(36, 24))
    ds = SegmentationDataset(fx.info, "train", size=24, augment=True, seed=None, captions="class_names")
    runs = []
    for _ in range(2):
        torch.manual_seed(0)
        runs.append(torch.stack([ds[i % len(ds)]["mask"] for i in range(12)]))
    assert torch.equal(runs[0], runs[1])
    torch.manual_seed(1)
    assert not torch.equal(runs[0], torch.stack([ds[i % len(ds)]["mask"] for i in range(12)]))
