"""ImageNet-Segmentation loader on a tiny gtsegs_ijcv.mat written here in the same layout (HDF5 references)."""
import numpy as np
import pytest

from nha_plugin.datasets.imagenet_s import load_imagenet_segmentation, resize_centre_crop


def test_resize_centre_crop_geometry():
    arr = np.zeros((40, 80), np.uint8)
    arr[:, 40:] = 1                                  # right half
    out = resize_centre_crop(arr, 20, nearest=True)  # -> 20x40, crop columns 10..30
    assert out.shape == (20, 20)
    assert (out[:, :10] == 0).all() and (out[:, 10:] == 1).all()


def _write_tiny_mat(path, images, masks):
    h5py = pytest.importorskip("h5py")
    with h5py.File(path, "w") as f:
        refs = f.create_group("#refs#")
        img_refs = np.empty((len(images), 1), dtype=h5py.ref_dtype)
        gt_refs = np.empty((len(images), 1), dtype=h5py.ref_dtype)
        for i, (im, gt) in enumerate(zip(images, masks)):
            stored = im.T if im.ndim == 2 else im.transpose(2, 1, 0)                          # MATLAB layout
            img_refs[i, 0] = refs.create_dataset(f"img{i}", data=stored).ref
            gt_refs[i, 0] = refs.create_dataset(f"gt{i}", data=gt.astype(np.uint8).T).ref
        value = f.create_group("value")
        value.create_dataset("img", data=img_refs)
        value.create_dataset("gt", data=gt_refs)


def test_loader_reads_the_mat_layout(tmp_path):
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (30, 60, 3), dtype=np.uint8), rng.integers(0, 255, (50, 50, 3), dtype=np.uint8)]
    masks = [np.zeros((30, 60), bool), np.zeros((50, 50), bool)]
    masks[0][:, 45:] = True                          # the right quarter: partly cropped away by the centre crop
    masks[1][10:20, 10:20] = True
    path = tmp_path / "gtsegs_ijcv.mat"
    _write_tiny_mat(path, images, masks)
    ims, mks = load_imagenet_segmentation(str(path), size=24)
    assert ims.shape == (2, 24, 24, 3) and ims.dtype == np.uint8 and mks.dtype == bool
    # image 0: 30x60 -> 24x48, crop columns 12..36; mask columns >= 45/60*48 = 36 fall outside the crop
    assert not mks[0].any()
    legacy = load_imagenet_segmentation(str(path), size=24, legacy=True)[1]
    assert legacy[0][:, 18:].all()                   # the reference's uncropped mask: misaligned with the image
    np.testing.assert_array_equal(mks[1], resize_centre_crop(masks[1].astype(np.uint8), 24, nearest=True) > 0)
    assert mks[1].sum() > 0


def test_grey_images_are_read_as_three_equal_channels(tmp_path):
    rng = np.random.default_rng(1)
    grey = rng.integers(0, 255, (20, 36), dtype=np.uint8)                 # stored (W, H) by MATLAB, no channel axis
    mask = np.zeros((20, 36), bool)
    mask[5:15, 10:20] = True
    path = tmp_path / "gtsegs_ijcv.mat"
    _write_tiny_mat(path, [grey], [mask])
    ims, mks = load_imagenet_segmentation(str(path), size=20)
    expected = resize_centre_crop(np.stack([grey] * 3, -1), 20)
    np.testing.assert_array_equal(ims[0], expected)
    assert (ims[0, ..., 0] == ims[0, ..., 2]).all()
    np.testing.assert_array_equal(mks[0], resize_centre_crop(mask.astype(np.uint8), 20, nearest=True) > 0)


def test_a_file_without_the_datasets_is_refused(tmp_path):
    h5py = pytest.importorskip("h5py")
    path = tmp_path / "other.mat"
    with h5py.File(path, "w") as f:
        f.create_dataset("x", data=np.zeros(3))
    with pytest.raises(ValueError, match="no value/img and value/gt"):
        load_imagenet_segmentation(str(path))
