"""Caption files: BLIP-2 (a tiny random-weight model built offline), COCO first caption,
class names; resume, and a corrupt image that is reported while the rest are captioned."""
import json

import numpy as np
import pytest
from PIL import Image

from utils import prepare_captions
from utils.prepare_captions import caption_split
from utils.prepare_voc_blip2_captions import main as voc_blip2_main


def _byte_alphabet():
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1))
    extra = [256 + n for n in range(256 - len(printable))]
    return [chr(c) for c in printable + extra]


@pytest.fixture(scope="module")
def tiny_blip2(tmp_path_factory):
    """A BLIP-2 folder (OPT text model, GPT-2 style byte-level BPE tokenizer) in the hub layout."""
    import torch
    from transformers import (Blip2Config, Blip2ForConditionalGeneration, Blip2Processor,
                              BlipImageProcessor, GPT2Tokenizer)

    out = tmp_path_factory.mktemp("tiny_blip2")
    merges = ["Ġ a", "Ġ c", "a t", "Ġc at", "Ġ s", "o f", "Ġs of", "Ġsof a"]
    vocab = {t: i for i, t in enumerate(["<pad>", "</s>", "<unk>"] + _byte_alphabet())}
    for m in merges:
        vocab.setdefault(m.replace(" ", ""), len(vocab))
    (out / "src").mkdir()
    (out / "src" / "vocab.json").write_text(json.dumps(vocab))
    (out / "src" / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    tokenizer = GPT2Tokenizer(str(out / "src" / "vocab.json"), str(out / "src" / "merges.txt"),
                              bos_token="</s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>")
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    processor = Blip2Processor(BlipImageProcessor(size={"height": 32, "width": 32}), tokenizer,
                               num_query_tokens=4)
    config = Blip2Config(
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                           num_attention_heads=2, image_size=32, patch_size=8),
        qformer_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                            num_attention_heads=2, encoder_hidden_size=16, vocab_size=len(tokenizer)),
        text_config=dict(model_type="opt", vocab_size=len(tokenizer), hidden_size=16,
                         word_embed_proj_dim=16, ffn_dim=32, num_hidden_layers=1, num_attention_heads=2,
                         max_position_embeddings=64, bos_token_id=1, eos_token_id=1, pad_token_id=0),
        num_query_tokens=4, image_token_index=tokenizer.convert_tokens_to_ids("<image>"))
    torch.manual_seed(0)
    Blip2ForConditionalGeneration(config).save_pretrained(out / "model")
    processor.save_pretrained(out / "model")
    return out / "model"


def make_voc(root, names, corrupt=()):
    (root / "JPEGImages").mkdir(parents=True, exist_ok=True)
    (root / "ImageSets" / "Segmentation").mkdir(parents=True, exist_ok=True)
    (root / "ImageSets" / "Segmentation" / "trainaug.txt").write_text("".join(f"{n}\n" for n in names))
    rng = np.random.default_rng(0)
    for n in names:
        path = root / "JPEGImages" / f"{n}.jpg"
        pixels = rng.integers(0, 255, (24 + len(n), 30, 3), dtype=np.uint8)  # drawn for every name
        if n in corrupt:
            path.write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
        else:
            Image.fromarray(pixels).save(path)


def test_blip2_captions_corrupt_image_and_resume(tiny_blip2, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    root = tmp_path / "VOC2012"
    names = [f"2007_{i:06d}" for i in range(5)]
    make_voc(root, names, corrupt={names[2]})
    args = ["--data_root", str(root), "--model", str(tiny_blip2), "--batch_size", "2",
            "--max_new_tokens", "4", "--device", "cpu", "--num_workers", "1"]

    assert voc_blip2_main(args) == 1  # one image failed
    err = capsys.readouterr().err
    assert str(root / "JPEGImages" / f"{names[2]}.jpg") in err
    out = root / "captions" / "trainaug.json"
    captions = json.loads(out.read_text())
    assert sorted(captions) == [n for n in names if n != names[2]]
    assert all(isinstance(c, str) for c in captions.values())
    failures = json.loads((root / "captions" / "trainaug.failures.json").read_text())
    assert list(failures) == [names[2]] and names[2] in failures[names[2]]
    assert not (root / "captions" / "trainaug.partial.jsonl").exists()

    # fix the image: only it is captioned, the others keep their captions
    make_voc(root, names)
    assert voc_blip2_main(args) == 0
    assert "5/5 captioned, 1 new" in capsys.readouterr().out
    second = json.loads(out.read_text())
    assert sorted(second) == names
    assert {n: second[n] for n in captions} == captions
    assert not (root / "captions" / "trainaug.failures.json").exists()

    # third run: nothing new, and the model is not even loaded
    def no_model(*a, **k):
        raise AssertionError("model loaded although every image is captioned")

    monkeypatch.setattr(prepare_captions, "blip2_captioner", no_model)
    assert voc_blip2_main(args) == 0
    assert "5/5 captioned, 0 new" in capsys.readouterr().out
    assert json.loads(out.read_text()) == second
    monkeypatch.undo()

    # an uninterrupted run in one go (other batch size) gives the same captions
    fresh = tmp_path / "fresh.json"
    assert voc_blip2_main(args + ["--output", str(fresh), "--batch_size", "5"]) == 0
    assert json.loads(fresh.read_text()) == second


def test_unloadable_model_is_a_clear_error(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    root = tmp_path / "VOC2012"
    make_voc(root, ["2007_000001"])
    with pytest.raises(SystemExit) as e:
        voc_blip2_main(["--data_root", str(root), "--model", str(tmp_path / "no_such_model"), "--device", "cpu"])
    assert e.value.code == 2
    assert "no_such_model" in capsys.readouterr().err


def test_interrupted_run_resumes_where_it_stopped(tmp_path):
    names = [f"img{i}" for i in range(7)]
    calls = []

    def captioner(batch):
        calls.append(list(batch))
        if len(calls) == 3:
            raise KeyboardInterrupt  # a crash in the third batch
        return {n: f"caption of {n}" for n in batch}, {}

    out = tmp_path / "captions" / "train.json"
    with pytest.raises(KeyboardInterrupt):
        caption_split(names, lambda: captioner, out, batch_size=2)
    assert not out.exists()  # no final file that looks complete
    assert len((tmp_path / "captions" / "train.partial.jsonl").read_text().splitlines()) == 4

    calls.clear()
    result, failed, new = caption_split(names, lambda: captioner, out, batch_size=2)
    assert calls == [["img4", "img5"], ["img6"]]  # only what was left
    assert new == 3 and not failed
    assert json.loads(out.read_text()) == {n: f"caption of {n}" for n in names}


def test_class_name_captions(tmp_path, capsys):
    root = tmp_path / "VOC2012"
    names = ["a", "b", "c"]
    make_voc(root, names)
    (root / "SegmentationClassAug").mkdir()
    m = np.zeros((8, 8), np.uint8)
    m[1:4, 1:4] = 8  # cat
    m[5:7, 5:7] = 18  # sofa
    m[0, :] = 255  # boundary: not a class
    Image.fromarray(m).save(root / "SegmentationClassAug" / "a.png")
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(root / "SegmentationClassAug" / "b.png")
    (root / "SegmentationClassAug" / "c.png").write_bytes(b"broken")
    rc = prepare_captions.main(["--dataset", "voc", "--mode", "class_names", "--data_root", str(root)])
    assert rc == 1
    assert str(root / "SegmentationClassAug" / "c.png") in capsys.readouterr().err
    captions = json.loads((root / "captions" / "trainaug.json").read_text())
    assert captions == {"a": "a photo of cat, sofa", "b": "a photo of background"}


def test_coco_first_caption(tmp_path, capsys):
    root = tmp_path / "coco"
    (root / "annotations").mkdir(parents=True)
    data = {
        "images": [{"id": 9, "file_name": "000000000009.jpg"}, {"id": 25, "file_name": "000000000025.jpg"},
                   {"id": 30, "file_name": "000000000030.jpg"}],
        "annotations": [  # not in id order, as in the real files
            {"id": 700, "image_id": 9, "caption": "A later caption."},
            {"id": 41, "image_id": 25, "caption": "A giraffe eating leaves \n"},
            {"id": 12, "image_id": 9, "caption": " Closeup of bins of food  that include broccoli."},
            {"id": 300, "image_id": 25, "caption": "Another giraffe."},
        ],
    }
    (root / "annotations" / "captions_val2017.json").write_text(json.dumps(data))
    rc = prepare_captions.main(["--dataset", "coco", "--split", "val", "--data_root", str(root)])
    assert rc == 1  # image 30 has no caption
    assert "000000000030" in capsys.readouterr().err
    captions = json.loads((root / "captions" / "val2017.json").read_text())
    assert captions == {"000000000009": "Closeup of bins of food that include broccoli.",
                        "000000000025": "A giraffe eating leaves"}


def test_bad_arguments_are_clear_errors(tmp_path, capsys):
    from utils.prepare_ade20k_blip2_captions import main as ade_blip2_main

    with pytest.raises(SystemExit) as e:
        prepare_captions.main(["--split", "train"])
    assert e.value.code == 2 and "--dataset" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        ade_blip2_main(["--data_root", str(tmp_path)])  # the alias fills in ade20k + blip2
    assert e.value.code == 2 and str(tmp_path / "images" / "training") in capsys.readouterr().err


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and "Traceback" not in err
    return err


@pytest.mark.parametrize("content", ["", "{not json", "[1, 2]", '{"a": 3}'])
def test_broken_earlier_caption_file_is_one_line(tmp_path, capsys, content):
    root = tmp_path / "VOC2012"
    make_voc(root, ["a"])
    out = root / "captions" / "trainaug.json"
    out.parent.mkdir(parents=True)
    out.write_text(content)
    with pytest.raises(SystemExit) as e:
        prepare_captions.main(["--dataset", "voc", "--mode", "class_names", "--data_root", str(root)])
    assert e.value.code != 0 and str(out) in _one_error_line(capsys)
    assert out.read_text() == content  # left for the user to look at


def test_broken_resume_sidecar_is_one_line(tmp_path, capsys):
    out = tmp_path / "captions" / "train.json"
    out.parent.mkdir(parents=True)
    (tmp_path / "captions" / "train.partial.jsonl").write_text('{"name": "a", "caption": "x"}\n[3]\n')
    with pytest.raises(SystemExit) as e:
        caption_split(["a", "b"], lambda: None, out, batch_size=2)
    assert e.value.code != 0 and "train.partial.jsonl: line 2" in _one_error_line(capsys)


@pytest.mark.parametrize("content", ["", '{"images": [{"id": 9, "file_name": "000000000009.jpg"}], "annotations": []}',
                                     '{"images": [], "annotations": [{"id": 1, "image_id": 9}]}'])
def test_empty_or_broken_coco_caption_source_is_one_line(tmp_path, capsys, content):
    path = tmp_path / "coco" / "annotations" / "captions_val2017.json"
    path.parent.mkdir(parents=True)
    path.write_text(content)
    with pytest.raises(SystemExit) as e:
        prepare_captions.main(["--dataset", "coco", "--split", "val", "--data_root", str(tmp_path / "coco")])
    assert e.value.code != 0 and str(path) in _one_error_line(capsys)
    assert not (tmp_path / "coco" / "captions" / "val2017.json").exists()


def test_class_name_captions_reject_labels_outside_the_classes(tmp_path, capsys):
    root = tmp_path / "VOC2012"
    make_voc(root, ["a", "b"])
    (root / "SegmentationClassAug").mkdir()
    Image.fromarray(np.full((8, 8), 8, np.uint8)).save(root / "SegmentationClassAug" / "a.png")
    Image.fromarray(np.full((8, 8), 40, np.uint8)).save(root / "SegmentationClassAug" / "b.png")  # VOC: 0..20
    assert prepare_captions.main(["--dataset", "voc", "--mode", "class_names", "--data_root", str(root)]) == 1
    err = capsys.readouterr().err
    assert str(root / "SegmentationClassAug" / "b.png") in err and "mask values [40]" in err
    assert json.loads((root / "captions" / "trainaug.json").read_text()) == {"a": "a photo of cat"}
