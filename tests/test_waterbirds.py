"""Waterbirds loader on a tiny fake tree in the official layout (metadata.csv + image folders)."""
import numpy as np
import pytest
from PIL import Image

from nha_plugin.datasets.waterbirds import GROUP_NAMES, WaterbirdsDataset

# (img_id, y, split, place): ids chosen so every split and group is exercised, with uneven counts
ROWS = [(1, 0, 0, 0), (2, 0, 0, 0), (3, 1, 0, 1), (4, 1, 1, 0), (5, 0, 2, 1), (6, 1, 2, 1), (7, 1, 2, 0),
        (8, 0, 2, 0), (9, 1, 2, 1)]


def _colour(img_id):
    return (20 * img_id, 255 - 20 * img_id, (37 * img_id) % 256)


@pytest.fixture
def tree(tmp_path):
    lines = ["img_id,img_filename,y,split,place,place_filename"]
    for img_id, y, split, place in ROWS:
        name = f"{100 + img_id:03d}.Species_{y}/bird_{img_id}.jpg"
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        # 40 x 60 (landscape): the resize to 32 px short side then a centre crop keeps the middle 32 columns;
        # mark the left edge so the crop is visible
        arr = np.zeros((40, 60, 3), np.uint8)
        arr[:] = _colour(img_id)
        arr[:, :5] = 0
        Image.fromarray(arr).save(tmp_path / name, format="PNG")   # lossless despite the .jpg name
        lines.append(f"{img_id},{name},{y},{split},{place},/l/lake/natural/{img_id}.jpg")
    (tmp_path / "metadata.csv").write_text("\n".join(lines) + "\n")
    return tmp_path


def test_splits_groups_and_images(tree):
    test = WaterbirdsDataset(tree, split="test", size=32)
    expected = [r for r in ROWS if r[2] == 2]
    assert len(test) == len(expected) == 5
    assert test.labels.tolist() == [r[1] for r in expected]
    assert test.places.tolist() == [r[3] for r in expected]
    assert test.groups.tolist() == [2 * r[1] + r[3] for r in expected]
    # hand count: test rows (y, place) = (0,1) (1,1) (1,0) (0,0) (1,1)
    assert test.group_counts() == {"landbird on land": 1, "landbird on water": 1, "waterbird on land": 1,
                                   "waterbird on water": 2}
    assert list(test.group_counts()) == list(GROUP_NAMES)
    item = test[2]
    assert (item.label, item.place, item.group) == (1, 0, 2) and item.filename.endswith("bird_7.jpg")
    assert item.image.shape == (32, 32, 3) and item.image.dtype == np.uint8
    # centre crop: 60 -> 48 wide, cols 8..40 kept, so the black left edge (5 px -> 4 px) is gone
    assert np.abs(item.image.astype(int) - np.array(_colour(7))).max() <= 2
    assert test.images().shape == (5, 32, 32, 3)
    assert len(WaterbirdsDataset(tree, split="train")) == 3 and len(WaterbirdsDataset(tree, split=1)) == 1
    assert len(WaterbirdsDataset(tree, split="all")) == len(ROWS)
    assert len(WaterbirdsDataset(tree, split="test", n=2)) == 2


def test_errors_say_what_to_do(tree, tmp_path_factory):
    with pytest.raises(FileNotFoundError, match="metadata.csv"):
        WaterbirdsDataset(tmp_path_factory.mktemp("empty"))
    with pytest.raises(ValueError, match="unknown split"):
        WaterbirdsDataset(tree, split="dev")
    bad = tmp_path_factory.mktemp("bad")
    (bad / "metadata.csv").write_text("img_id,img_filename,y,split\n1,a.jpg,0,2\n")
    with pytest.raises(ValueError, match=r"lacks column\(s\) \['place'\]"):
        WaterbirdsDataset(bad)
    (bad / "metadata.csv").write_text("img_id,img_filename,y,split,place\n1,a.jpg,3,2,0\n")
    with pytest.raises(ValueError, match="y and place in"):
        WaterbirdsDataset(bad)
    (bad / "metadata.csv").write_text("img_id,img_filename,y,split,place\n1,a.jpg,0,2,0\n")
    with pytest.raises(FileNotFoundError, match="missing"):
        WaterbirdsDataset(bad)[0]
