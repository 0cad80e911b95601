"""COCO instances JSON -> 80-class semantic PNGs: classes, overlap rule, crowd rule, resume."""
import json
import os

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("pycocotools")
from pycocotools import mask as mask_utils  # noqa: E402

from dataset import get_dataset_info  # noqa: E402
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
