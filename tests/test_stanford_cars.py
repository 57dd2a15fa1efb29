"""Stanford Cars loader on tiny fake trees written by the tests (devkit .mat files and class folders)."""
import csv
import hashlib
import json
import shutil

import numpy as np
import pytest
from PIL import Image

from nha_plugin.datasets.stanford_cars import StanfordCars, model_year, read_colour_labels

scipy_io = pytest.importorskip("scipy.io")

CLASSES = ["AM General Hummer SUV 2000", "Acura RL Sedan 2012", "Ram C-V Cargo Van Minivan 2012",
           "Chevrolet Corvette Convertible 2007"]
# (file, class index 1-based, bbox) -- file names are shared between train and test as in the real release
TRAIN = [("00001.jpg", 1, (2, 3, 20, 18)), ("00002.jpg", 2, (0, 0, 31, 23)), ("00003.jpg", 4, (5, 5, 9, 9)),
         ("00004.jpg", 2, (1, 1, 10, 10)), ("00005.jpg", 3, (4, 2, 30, 20))]
TEST = [("00001.jpg", 3, (0, 0, 10, 10)), ("00002.jpg", 4, (1, 2, 3, 4))]


def _colour(seed):
    return np.random.default_rng(seed).integers(30, 226, 3, dtype=np.uint8)


def _write_image(path, seed, size=(32, 24)):
    """A flat image of a seeded colour (JPEG keeps flat colours almost exactly)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.broadcast_to(_colour(seed), (size[1], size[0], 3)).copy()).save(path)


def _annos(rows):
    dt = [("bbox_x1", "O"), ("bbox_y1", "O"), ("bbox_x2", "O"), ("bbox_y2", "O"), ("class", "O"), ("fname", "O")]
    arr = np.zeros((1, len(rows)), dtype=dt)
    for i, (fname, cls, (x1, y1, x2, y2)) in enumerate(rows):
        arr[0, i] = (np.uint16(x1), np.uint16(y1), np.uint16(x2), np.uint16(y2), np.uint8(cls), fname)
    return {"annotations": arr}


@pytest.fixture
def devkit_tree(tmp_path):
    root = tmp_path / "stanford_cars"
    (root / "devkit").mkdir(parents=True)
    scipy_io.savemat(root / "devkit" / "cars_meta.mat", {"class_names": np.array(CLASSES, dtype=object)[None, :]})
    scipy_io.savemat(root / "devkit" / "cars_train_annos.mat", _annos(TRAIN))
    scipy_io.savemat(root / "cars_test_annos_withlabels.mat", _annos(TEST))
    for i, (f, _, _) in enumerate(TRAIN):
        _write_image(root / "cars_train" / f, i)
    for i, (f, _, _) in enumerate(TEST):
        _write_image(root / "cars_test" / f, 100 + i)
    return tmp_path          # the loader must find the stanford_cars/ sub-folder itself


def _write_csv(path, header, rows):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def test_model_year():
    assert model_year("AM General Hummer SUV 2000") == 2000
    with pytest.raises(ValueError, match="model year"):
        model_year("Some Car Sedan")


def test_devkit_train_records_match_the_annotations(devkit_tree):
    cars = StanfordCars(devkit_tree, split="train")
    assert cars.layout == "devkit" and len(cars) == len(TRAIN)
    for rec, (fname, cls, box) in zip(cars.records, TRAIN):
        assert rec.path.name == fname and rec.class_name == CLASSES[cls - 1]
        assert rec.year == int(CLASSES[cls - 1].split()[-1]) and rec.bbox == box and rec.colour is None
    image, name, year, colour = cars[1]
    assert image.size == (32, 24) and image.mode == "RGB"
    assert np.abs(np.asarray(image, int) - _colour(1).astype(int)).max() <= 3
    assert (name, year, colour) == (CLASSES[1], 2012, None)
    assert cars.by_year() == {2000: [0], 2007: [2], 2012: [1, 3, 4]}


def test_devkit_crop_uses_inclusive_boxes(devkit_tree):
    cars = StanfordCars(devkit_tree, split="train", crop=True)
    x1, y1, x2, y2 = TRAIN[0][2]
    assert cars.image(0).size == (x2 - x1 + 1, y2 - y1 + 1)


def test_devkit_test_split_and_colours_by_relative_path(devkit_tree, tmp_path):
    csv_path = _write_csv(tmp_path / "colours.csv", ["image", "colour", "convertible"],
                          [["cars_train/00001.jpg", "white", "0"], ["cars_test/00001.jpg", "yellow", "0"],
                           ["cars_test/00002.jpg", "red", "1"]])
    test = StanfordCars(devkit_tree, split="test", colours=csv_path)
    assert [r.class_name for r in test.records] == [CLASSES[2], CLASSES[3]]
    assert [r.colour for r in test.records] == ["yellow", "red"]
    assert [test.column(i, "convertible") for i in range(2)] == [False, True]
    train = StanfordCars(devkit_tree, split="train", colours=csv_path)
    assert [r.colour for r in train.records] == ["white", None, None, None, None]
    assert train.column(1, "convertible") is None
    with pytest.raises(KeyError, match="extra column"):
        train.column(0, "sunroof")


def test_colour_csv_errors(devkit_tree, tmp_path):
    bad = _write_csv(tmp_path / "bad.csv", ["file", "colour"], [["00001.jpg", "red"]])
    with pytest.raises(ValueError, match="'image' and 'colour'"):
        StanfordCars(devkit_tree, colours=bad)
    dup = _write_csv(tmp_path / "dup.csv", ["image", "colour"], [["00001.jpg", "red"], ["00001.jpg", "blue"]])
    with pytest.raises(ValueError, match="listed twice"):
        StanfordCars(devkit_tree, colours=dup)
    rows, col = read_colour_labels(_write_csv(tmp_path / "us.csv", ["image", "color"], [["a.jpg", "red"]]))
    assert col == "color" and rows["a.jpg"]["color"] == "red"


def test_folder_layout_with_bare_file_names(tmp_path):
    root = tmp_path / "cars"
    files = {"Acura RL Sedan 2012": ["a.jpg", "b.jpg"], "AM General Hummer SUV 2000": ["c.jpg"]}
    for k, (cls, names) in enumerate(files.items()):
        for j, n in enumerate(names):
            _write_image(root / "train" / cls / n, 10 * k + j)
    (root / "train" / "Acura RL Sedan 2012" / "notes.txt").write_text("not an image")
    csv_path = _write_csv(tmp_path / "c.csv", ["image", "colour"], [["a.jpg", "Yellow"], ["c.jpg", "black"]])
    cars = StanfordCars(root, split="train", colours=csv_path)
    assert cars.layout == "folders"
    assert [(r.path.name, r.year, r.colour) for r in cars.records] == [
        ("c.jpg", 2000, "black"), ("a.jpg", 2012, "Yellow"), ("b.jpg", 2012, None)]
    assert cars.by_year() == {2000: [0], 2012: [1, 2]}
    with pytest.raises(FileNotFoundError, match="test"):
        StanfordCars(root, split="test")
    _write_image(root / "train" / "AM General Hummer SUV 2000" / "a.jpg", 99)
    with pytest.raises(ValueError, match="relative paths"):
        StanfordCars(root, split="train", colours=csv_path)   # "a.jpg" now names two images


def test_missing_layout_is_explained(tmp_path):
    with pytest.raises(FileNotFoundError, match="devkit"):
        StanfordCars(tmp_path)
    (tmp_path / "train" / "No Year Here").mkdir(parents=True)
    with pytest.raises(ValueError, match="model year"):
        StanfordCars(tmp_path)


def test_fingerprint_follows_files_and_labels_not_the_folder(devkit_tree, tmp_path):
    csv_path = _write_csv(tmp_path / "colours.csv", ["image", "colour"], [["cars_train/00001.jpg", "white"]])
    cars = StanfordCars(devkit_tree, split="train", colours=csv_path)
    root = devkit_tree / "stanford_cars"
    rows = [[f"cars_train/{f}", (root / "cars_train" / f).stat().st_size, CLASSES[c - 1], list(box),
             "white" if i == 0 else None, []] for i, (f, c, box) in enumerate(TRAIN)]
    before = cars.fingerprint()
    assert before == hashlib.sha256(json.dumps(rows).encode()).hexdigest()               # the documented recipe
    assert cars.fingerprint([2, 0]) == hashlib.sha256(json.dumps([rows[2], rows[0]]).encode()).hexdigest()
    moved = tmp_path / "elsewhere"
    shutil.copytree(devkit_tree / "stanford_cars", moved / "stanford_cars")
    assert StanfordCars(moved, split="train", colours=csv_path).fingerprint() == before
    relabelled = _write_csv(tmp_path / "other.csv", ["image", "colour"], [["cars_train/00001.jpg", "black"]])
    assert StanfordCars(devkit_tree, split="train", colours=relabelled).fingerprint() != before
    replaced = root / "cars_train" / "00002.jpg"
    replaced.write_bytes(replaced.read_bytes() + b"another image")
    assert StanfordCars(devkit_tree, split="train", colours=csv_path).fingerprint() != before
    (root / "cars_train" / "00003.jpg").unlink()
    with pytest.raises(FileNotFoundError, match="00003.jpg"):
        StanfordCars(devkit_tree, split="train").fingerprint()
