"""VOC 2012 + SBD .mat files -> SegmentationClassAug PNGs and trainaug.txt."""
import numpy as np
import pytest
import scipy.io
import scipy.sparse
from PIL import Image

from dataset.voc_semantic import INFO
from utils.prepare_voc_aug import load_sbd_mask, main

H, W = 12, 16


def write_sbd_mat(path, seg):
    """The real cls/*.mat layout: a 1x1 struct GTcls with Boundaries (cell of sparse),
    Segmentation (uint8 HxW) and CategoriesPresent."""
    present = np.unique(seg)
    present = present[present > 0]
    boundaries = np.empty((20, 1), dtype=object)
    for k in range(20):
        boundaries[k, 0] = scipy.sparse.csc_matrix((H, W), dtype=bool)
    scipy.io.savemat(path, {"GTcls": {"Boundaries": boundaries, "Segmentation": seg.astype(np.uint8),
                                      "CategoriesPresent": present.astype(np.uint8)}})


def write_voc_png(path, seg):
    im = Image.fromarray(seg.astype(np.uint8), mode="P")
    im.putpalette([c for rgb in INFO.palette for c in rgb] + [0] * (768 - 3 * len(INFO.palette)))
    im.save(path)


def mask(value, boundary=False):
    m = np.zeros((H, W), np.uint8)
    m[2:8, 3:10] = value
    if boundary:
        m[2, 3:10] = 255
    return m


@pytest.fixture
def roots(tmp_path):
    voc = tmp_path / "VOCdevkit" / "VOC2012"
    sbd = tmp_path / "benchmark_RELEASE" / "dataset"
    (voc / "SegmentationClass").mkdir(parents=True)
    (voc / "ImageSets" / "Segmentation").mkdir(parents=True)
    (sbd / "cls").mkdir(parents=True)
    # VOC: train a, b; val c, d.  SBD: train b, c, e; val f, a.
    (voc / "ImageSets" / "Segmentation" / "train.txt").write_text("2007_a\n2007_b\n")
    (voc / "ImageSets" / "Segmentation" / "val.txt").write_text("2007_c\n2007_d\n")
    (sbd / "train.txt").write_text("2007_b\n2007_c\n2008_e\n")
    (sbd / "val.txt").write_text("2008_f\n2007_a\n")
    for i, name in enumerate(["2007_a", "2007_b", "2007_c", "2007_d"]):
        write_voc_png(voc / "SegmentationClass" / f"{name}.png", mask(i + 1, boundary=True))
    for i, name in enumerate(["2007_b", "2007_c", "2008_e", "2008_f", "2007_a"]):
        write_sbd_mat(sbd / "cls" / f"{name}.mat", mask(11 + i))
    return voc, sbd


def test_sbd_mat_reader_reads_the_real_struct(tmp_path):
    seg = (np.arange(H * W).reshape(H, W) % 21).astype(np.uint8)
    write_sbd_mat(tmp_path / "x.mat", seg)
    np.testing.assert_array_equal(load_sbd_mask(tmp_path / "x.mat"), seg)


def test_merge_list_and_masks(roots, capsys):
    voc, sbd = roots
    assert main(["--voc_root", str(voc), "--sbd_root", str(sbd), "--num_workers", "2"]) == 0
    ids = (voc / "ImageSets" / "Segmentation" / "trainaug.txt").read_text().split()
    assert ids == ["2007_a", "2007_b", "2008_e", "2008_f"]  # c is VOC val: excluded

    out = voc / "SegmentationClassAug"
    assert sorted(p.stem for p in out.glob("*.png")) == ["2007_a", "2007_b", "2007_c", "2007_d", "2008_e", "2008_f"]
    for name in ["2007_a", "2007_b", "2007_c", "2007_d", "2008_e", "2008_f"]:
        with Image.open(out / f"{name}.png") as im:
            assert im.mode == "L"  # indices, not a palette image
            got = np.array(im)
        if name.startswith("2007"):  # VOC has it: VOC wins, boundary band kept
            expected = mask("abcd".index(name[-1]) + 1, boundary=True)
        else:
            expected = mask(11 + ["2007_b", "2007_c", "2008_e", "2008_f", "2007_a"].index(name))
        np.testing.assert_array_equal(got, expected)

    capsys.readouterr()
    assert main(["--voc_root", str(voc), "--sbd_root", str(sbd), "--num_workers", "0"]) == 0
    assert "0 written, 6 already done" in capsys.readouterr().out


def test_missing_mat_names_the_file(roots, capsys):
    voc, sbd = roots
    (sbd / "cls" / "2008_e.mat").unlink()
    with pytest.raises(SystemExit):
        main(["--voc_root", str(voc), "--sbd_root", str(sbd), "--num_workers", "0"])
    assert "2008_e.mat" in capsys.readouterr().err


def test_corrupt_mat_is_reported_and_exit_code_nonzero(roots, capsys):
    voc, sbd = roots
    (sbd / "cls" / "2008_f.mat").write_bytes(b"not a mat file")
    assert main(["--voc_root", str(voc), "--sbd_root", str(sbd), "--num_workers", "0"]) == 1
    assert "2008_f.mat" in capsys.readouterr().err
    assert (voc / "SegmentationClassAug" / "2008_e.png").exists()  # the rest were converted


def test_missing_voc_root_or_empty_list_is_one_line(roots, tmp_path, capsys):
    voc, sbd = roots
    with pytest.raises(SystemExit) as e:
        main(["--voc_root", str(tmp_path / "nowhere"), "--sbd_root", str(sbd), "--num_workers", "0"])
    err = capsys.readouterr().err.strip()
    assert e.value.code != 0 and len(err.splitlines()) == 1 and str(tmp_path / "nowhere") in err
    (sbd / "val.txt").write_text("\n")
    with pytest.raises(SystemExit) as e:
        main(["--voc_root", str(voc), "--sbd_root", str(sbd), "--num_workers", "0"])
    err = capsys.readouterr().err.strip()
    assert e.value.code != 0 and err == f"error: {sbd / 'val.txt'}: list file is empty"
