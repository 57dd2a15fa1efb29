"""PASCAL Context-59 loader on a tiny fake tree in the official / mmseg layout, and `nha segment` on it."""
import json

import numpy as np
import pytest
from PIL import Image

from nha_plugin.datasets.pascal_context import CONTEXT59_CLASSES, PascalContext59

IDS = ["2008_000008", "2008_000021", "2010_001234"]
SIZES = [(150, 200), (200, 130), (96, 96)]      # (H, W)


def _tree(root, ids=IDS, sizes=SIZES):
    voc = root / "VOCdevkit" / "VOC2010"
    for sub in ("JPEGImages", "SegmentationClassContext", "ImageSets/SegmentationContext"):
        (voc / sub).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    labels = {}
    for i, (h, w) in zip(ids, sizes):
        Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)).save(voc / "JPEGImages" / f"{i}.jpg")
        lab = rng.integers(0, 60, size=(h, w)).astype(np.uint8)
        lab[:5] = 255
        Image.fromarray(lab).save(voc / "SegmentationClassContext" / f"{i}.png")
        labels[i] = lab
    (voc / "ImageSets" / "SegmentationContext" / "val.txt").write_text("\n".join(ids) + "\n")
    return voc, labels


def test_loads_images_labels_and_the_59_classes(tmp_path):
    voc, labels = _tree(tmp_path)
    assert len(CONTEXT59_CLASSES) == 59 == len(set(CONTEXT59_CLASSES))
    assert CONTEXT59_CLASSES[0] == "aeroplane" and CONTEXT59_CLASSES[36] == "person" and CONTEXT59_CLASSES[-1] == "wood"
    for root in (tmp_path, tmp_path / "VOCdevkit", voc):
        ds = PascalContext59(root)
        assert ds.voc == voc and len(ds) == 3 and ds.ids == IDS and ds.no_background
        for i, (image, label) in enumerate(ds):
            assert image.mode == "RGB" and (image.height, image.width) == SIZES[i]
            assert label.dtype == np.uint8 and np.array_equal(label, labels[IDS[i]])
    with pytest.raises(IndexError):
        PascalContext59(tmp_path)[3]


def test_errors_name_the_missing_file_and_the_layout(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a folder"):
        PascalContext59(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="no VOC2010 folder.*SegmentationClassContext"):
        PascalContext59(tmp_path)
    voc, _ = _tree(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"missing split file .*train\.txt.*expected the layout"):
        PascalContext59(tmp_path, split="train")
    (voc / "JPEGImages" / f"{IDS[1]}.jpg").unlink()
    ds = PascalContext59(tmp_path)
    with pytest.raises(FileNotFoundError, match=rf"{IDS[1]}\.jpg is missing"):
        ds[1]
    (voc / "SegmentationClassContext" / f"{IDS[0]}.png").unlink()
    with pytest.raises(FileNotFoundError, match=rf"{IDS[0]}\.png \(the first id"):
        PascalContext59(tmp_path)


def test_rejects_full_459_class_labels_and_rgb_labels(tmp_path):
    voc, _ = _tree(tmp_path)
    Image.fromarray(np.full(SIZES[0], 100, dtype=np.uint8)).save(voc / "SegmentationClassContext" / f"{IDS[0]}.png")
    Image.fromarray(np.zeros((*SIZES[1], 3), dtype=np.uint8)).save(voc / "SegmentationClassContext" / f"{IDS[1]}.png")
    ds = PascalContext59(tmp_path)
    with pytest.raises(ValueError, match="label 100"):
        ds[0]
    with pytest.raises(ValueError, match="mode RGB"):
        ds[1]


def test_segment_cli_on_pascal_context_ignores_background(tmp_path):
    from nha_plugin.cli.segment import main
    _tree(tmp_path / "data")
    out = tmp_path / "out"
    assert main(["--dataset", "pascal-context", "--root", str(tmp_path / "data"), "--templates", "photo",
                 "--method", "maskclip", "--method", "nad", "--k", "100", "--out", str(out), "--quiet",
                 "--show", "1"]) == 0
    res = json.loads((out / "results.json").read_text())
    ds = PascalContext59(tmp_path / "data")
    scored = sum(int(((lab != 0) & (lab != 255)).sum()) for _, lab in ds)
    assert res["n"] == 3 and res["no_background"] and len(res["class_names"]) == 59
    assert res["methods"]["nad"]["pixels"] == scored == res["methods"]["maskclip"]["pixels"]
    assert len(res["methods"]["nad"]["iou"]) == 59
    assert (out / "predictions.png").exists() and (out / "run.json").is_file()


def test_identity_tells_copies_and_id_lists_apart(tmp_path):
    from nha_plugin.runs import texts_fingerprint
    voc, _ = _tree(tmp_path / "a")
    _tree(tmp_path / "b")
    a = PascalContext59(tmp_path / "a")
    assert a.identity() == PascalContext59(voc).identity()                 # the same folder, reached another way
    assert a.identity()["ids"] == texts_fingerprint(IDS) and a.identity()["voc"] == str(voc.resolve())
    assert a.identity()["voc"] != PascalContext59(tmp_path / "b").identity()["voc"]
    (voc / "ImageSets" / "SegmentationContext" / "val.txt").write_text("\n".join(IDS[:2]) + "\n")
    assert PascalContext59(voc).identity()["ids"] == texts_fingerprint(IDS[:2])


def test_segment_cli_refuses_to_resume_on_another_id_list(tmp_path, capsys):
    from nha_plugin.cli.segment import main
    voc, _ = _tree(tmp_path / "data")
    argv = ["--dataset", "pascal-context", "--root", str(tmp_path / "data"), "--templates", "photo", "--method",
            "maskclip", "--out", str(tmp_path / "out"), "--quiet", "--show", "0"]
    assert main(argv) == 0
    (voc / "ImageSets" / "SegmentationContext" / "val.txt").write_text("\n".join(IDS[::-1]) + "\n")
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "data.dataset.ids" in err and "--fresh" in err
