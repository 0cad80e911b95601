"""COCO instances JSON -> 80-class semantic PNGs: classes, overlap rule, crowd rule, resume;
both image layouts (images/<split>/ and the archives unzipped in place); broken annotation files."""
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("pycocotools")
from pycocotools import mask as mask_utils  # noqa: E402

from dataset import get_dataset_info  # noqa: E402
from dataset.segmentation import SegmentationDataset  # noqa: E402
from tests.fixtures_datasets import make_coco, make_coco_unzipped, save_jpg  # noqa: E402
from utils.prepare_coco_semantic_80 import main  # noqa: E402

H, W = 40, 60


def rect(x0, y0, x1, y1):
    return [[x0, y0, x1, y0, x1, y1, x0, y1]]


def label_of(name):
    return get_dataset_info("coco").classes.index(name)


@pytest.fixture
def coco_root(tmp_path):
    info = get_dataset_info("coco")
    cat = {name: info.extra["category_ids"][info.classes.index(name) - 1]
           for name in ("person", "dining table", "cup", "dog")}
    crowd = np.zeros((H, W), np.uint8)
    crowd[25:38, 2:30] = 1  # a crowd of people, bottom left
    crowd_rle = mask_utils.encode(np.asfortranarray(crowd))
    crowd_rle["counts"] = crowd_rle["counts"].decode("ascii")  # as the JSON files store it
    anns = [
        # image 1: a cup (small) on a dining table (large), listed small-first so file order
        # would give the wrong answer if the rule were "last listed wins"
        {"id": 1, "image_id": 1, "category_id": cat["cup"], "iscrowd": 0, "segmentation": rect(20, 10, 30, 20)},
        {"id": 2, "image_id": 1, "category_id": cat["dining table"], "iscrowd": 0,
         "segmentation": rect(5, 5, 55, 30)},
        # a two-part polygon (an occluded dog)
        {"id": 3, "image_id": 1, "category_id": cat["dog"], "iscrowd": 0,
         "segmentation": rect(40, 32, 45, 38) + rect(50, 32, 58, 38)},
        # image 2: a compressed-RLE crowd with one person partly over it
        {"id": 4, "image_id": 2, "category_id": cat["person"], "iscrowd": 1, "segmentation": crowd_rle},
        {"id": 5, "image_id": 2, "category_id": cat["dog"], "iscrowd": 0, "segmentation": rect(20, 20, 40, 35)},
        # image 2 also has an uncompressed-RLE crowd (the other format in the real files)
        {"id": 6, "image_id": 2, "category_id": cat["person"], "iscrowd": 1,
         "segmentation": {"size": [H, W], "counts": [50 * H, 3 * H, 7 * H]}},
    ]
    images = [{"id": i, "file_name": f"{i:012d}.jpg", "height": H, "width": W} for i in (1, 2, 3)]
    data = {"images": images, "annotations": anns,
            "categories": [{"id": v, "name": k} for k, v in cat.items()]}
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations" / "instances_val2017.json").write_text(json.dumps(data))
    return tmp_path


def read(root, image_id):
    path = root / "semantic_80" / "val2017" / f"{image_id:012d}.png"
    with Image.open(path) as im:
        assert im.mode == "L"
        return np.array(im)


def test_classes_overlap_and_crowd(coco_root):
    rc = main(["--data_root", str(coco_root), "--splits", "val2017", "--num_workers", "2"])
    assert rc == 0
    files = sorted(p.name for p in (coco_root / "semantic_80" / "val2017").iterdir())
    assert files == ["000000000001.png", "000000000002.png", "000000000003.png"]

    m1 = read(coco_root, 1)
    assert m1.shape == (H, W)
    assert set(np.unique(m1)) <= {0, label_of("cup"), label_of("dining table"), label_of("dog")}
    assert (m1[11:19, 21:29] == label_of("cup")).all()  # smaller instance on top survives
    assert (m1[6:9, 6:50] == label_of("dining table")).all()
    assert (m1[33:37, 41:44] == label_of("dog")).all() and (m1[33:37, 51:57] == label_of("dog")).all()
    assert (m1[33:37, 47:49] == 0).all()  # the gap between the dog's two parts
    assert m1[0, 0] == 0 and m1[39, 0] == 0

    m2 = read(coco_root, 2)
    assert (m2[26:37, 3:19] == 255).all()  # crowd only: ignore
    assert (m2[26:34, 21:29] == label_of("dog")).all()  # instance over the crowd wins
    assert (m2[:, 51:52] == 255).all()  # uncompressed-RLE crowd: columns 50..52
    assert (m2[:, 45:49] == 0).all()
    assert 0 in m2

    assert (read(coco_root, 3) == 0).all()  # an image without annotations: all background


def test_resume_skips_complete_and_redoes_partial(coco_root, capsys):
    args = ["--data_root", str(coco_root), "--splits", "val2017", "--num_workers", "0"]
    assert main(args) == 0
    out_dir = coco_root / "semantic_80" / "val2017"
    first = {p.name: p.read_bytes() for p in out_dir.iterdir()}
    (out_dir / "000000000002.png").unlink()
    (out_dir / "000000000003.png").write_bytes(b"\x89PNG truncated")
    mtime = os.stat(out_dir / "000000000001.png").st_mtime_ns
    capsys.readouterr()
    assert main(args) == 0
    assert "2 written, 1 already done" in capsys.readouterr().out
    assert os.stat(out_dir / "000000000001.png").st_mtime_ns == mtime
    assert {p.name: p.read_bytes() for p in out_dir.iterdir()} == first
    assert not [p for p in out_dir.iterdir() if p.name.startswith(".")]  # no temp files left


def test_missing_annotations_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["--data_root", str(tmp_path), "--splits", "val2017"])
    assert e.value.code == 2
    assert "instances_val2017.json" in capsys.readouterr().err


# --- the two image layouts ------------------------------------------------------------------------
@pytest.mark.parametrize("img_dir", ["images/val2017", "val2017"])
def test_both_image_layouts_prepare_and_load(coco_root, img_dir, capsys):
    """MMSegmentation's images/val2017/ and the archive unzipped in place (val2017/ beside
    annotations/): preparation writes the same masks, and the dataset pairs them with the images."""
    rng = np.random.default_rng(0)
    for i in (1, 2, 3):
        save_jpg(coco_root / img_dir / f"{i:012d}.jpg", rng.integers(0, 256, (H, W, 3), dtype=np.uint8))
    assert main(["--data_root", str(coco_root), "--splits", "val2017", "--num_workers", "0"]) == 0
    assert f"images in {coco_root / img_dir}" in capsys.readouterr().out

    info = get_dataset_info("coco", str(coco_root))
    assert info.splits["val"].img_dir == img_dir
    ds = SegmentationDataset(info, "val", captions="class_names")
    assert ds.ids == [f"{i:012d}" for i in (1, 2, 3)]
    for index, image_id in enumerate((1, 2, 3)):
        assert ds.image_path(index) == coco_root / img_dir / f"{image_id:012d}.jpg"
        np.testing.assert_array_equal(ds[index]["mask"].numpy(), read(coco_root, image_id))


def test_image_layout_rule(tmp_path):
    """images/<split> wins when both exist; neither: the documented images/ layout (its error names it)."""
    (tmp_path / "images" / "train2017").mkdir(parents=True)
    (tmp_path / "train2017").mkdir()
    (tmp_path / "val2017").mkdir()
    info = get_dataset_info("coco", str(tmp_path))
    assert info.splits["train"].img_dir == "images/train2017"
    assert info.splits["val"].img_dir == "val2017"
    other = tmp_path / "other"
    (other / "images" / "val2017").mkdir(parents=True)
    assert info.with_root(other).splits["val"].img_dir == "images/val2017"  # decided per root
    empty = get_dataset_info("coco", str(tmp_path / "empty")).splits
    assert [s.img_dir for s in empty.values()] == ["images/train2017", "images/val2017"]


def test_unzipped_fixture_loads_like_the_images_layout(tmp_path):
    nested = make_coco(tmp_path / "a" / "coco")
    flat = make_coco_unzipped(tmp_path / "b" / "coco")
    assert not (tmp_path / "b" / "coco" / "images").exists()
    for split in ("train", "val"):
        a = SegmentationDataset(nested.info, split, captions="file")
        b = SegmentationDataset(flat.info, split, captions="file")
        assert a.ids == b.ids == flat.ids(split)
        for i in range(len(a)):
            x, y = a[i], b[i]
            assert x["caption"] == y["caption"]
            assert (x["mask"] == y["mask"]).all() and (x["image"] == y["image"]).all()


def test_unzipped_layout_reaches_the_segmenter_dataset(tmp_path):
    pytest.importorskip("mmseg")
    from dataset.mmseg_datasets import JoDiffusionSegDataset

    fx = make_coco_unzipped(tmp_path / "coco")
    ds = JoDiffusionSegDataset("coco", source="real", split="val", data_root=str(fx.info.data_root),
                               pipeline=[], lazy_init=False)
    paths = sorted(d["img_path"] for d in ds.load_data_list())
    assert paths == [str(tmp_path / "coco" / "val2017" / f"{i}.jpg") for i in fx.ids("val")]


# --- broken annotation files ----------------------------------------------------------------------
@pytest.mark.parametrize("content, problem", [
    (b'{"images": [{"id": 1, "height": 4', "not valid JSON"),                       # cut short
    (b"\x89PNG\r\n\x1a\n\x00\x00binary", "not valid JSON"),                  # not text
    (b'[1, 2, 3]', "not a COCO instances file"),
    (b'{"images": [], "categories": []}', "not a COCO instances file"),            # no annotations
    (b'{"images": [{"id": 1, "width": 5}], "annotations": []}', "images[0] lacks 'height'"),
    (b'{"images": [{"id": "x", "height": 4, "width": 5}], "annotations": []}', "images[0] has a non-integer 'id'"),
    (b'{"images": [], "annotations": [{"image_id": 1, "category_id": 1}]}',
     "annotations[0] lacks 'segmentation'"),
    (b'{"images": [], "annotations": [7]}', "annotations[0] is a int"),
])
def test_broken_annotation_file_is_one_line(tmp_path, capsys, content, problem):
    path = tmp_path / "annotations" / "instances_val2017.json"
    path.parent.mkdir()
    path.write_bytes(content)
    with pytest.raises(SystemExit) as e:
        main(["--data_root", str(tmp_path), "--splits", "val2017", "--num_workers", "0"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {path}: ") and problem in err and "\n" not in err
    assert not list((tmp_path / "semantic_80").rglob("*.png"))


def test_unreadable_annotation_file_is_one_line(tmp_path, capsys, monkeypatch):
    path = tmp_path / "annotations" / "instances_val2017.json"
    path.parent.mkdir()
    path.write_text("{}")
    real_read_bytes = Path.read_bytes

    def refuse(self):  # what a file without read permission gives (chmod does not stop root)
        if self == path:
            raise PermissionError(13, "Permission denied", str(self))
        return real_read_bytes(self)

    monkeypatch.setattr(Path, "read_bytes", refuse)
    with pytest.raises(SystemExit):
        main(["--data_root", str(tmp_path), "--splits", "val2017"])
    assert capsys.readouterr().err.strip() == f"error: {path}: cannot read (Permission denied)"


def test_a_broken_segmentation_is_named_skipped_and_counted(coco_root, capsys):
    path = coco_root / "annotations" / "instances_val2017.json"
    data = json.loads(path.read_text())
    data["annotations"].append({"id": 9, "image_id": 3, "category_id": 1, "iscrowd": 0,
                                "segmentation": {"size": [H, W], "counts": "@@not rle"}})
    path.write_text(json.dumps(data))
    assert main(["--data_root", str(coco_root), "--splits", "val2017", "--num_workers", "0"]) == 1
    out, err = capsys.readouterr()
    assert "3 images, 2 written, 0 already done, 1 failed" in out
    bad = coco_root / "semantic_80" / "val2017" / "000000000003.png"
    assert [l for l in err.splitlines() if l.startswith("error: ")] == [l for l in err.splitlines()
                                                                      if l.startswith(f"error: {bad}: ")]
    assert not bad.exists() and read(coco_root, 1).shape == (H, W)
