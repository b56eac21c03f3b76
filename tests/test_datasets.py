"""Loaders on tiny synthetic MVTec AD / MVTec 3D-AD trees (every bad-input case), plus the real folders."""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pytest

from musc_edge.edge.evaluation.datasets import (MVTEC_3D_AD, MVTEC_AD, DatasetError, detect_layout, load_dataset,
                                          load_masks, read_image, read_mask)

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
H, W = 12, 16


def _write_png(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), array)
    return path


def _image(seed: int = 0, shape: tuple[int, int] = (H, W)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (*shape, 3), dtype=np.uint8)


def _mask(value: int = 255, shape: tuple[int, int] = (H, W)) -> np.ndarray:
    mask = np.zeros(shape, dtype=np.uint8)
    mask[2:6, 3:9] = value
    return mask


def make_mvtec_ad(root: Path) -> Path:
    """test/good 2, test/crack 2, test/scratch 1 (with masks), train/good 3."""
    for i in range(2):
        _write_png(root / "test" / "good" / f"{i:03d}.png", _image(i))
    for defect, count in (("crack", 2), ("scratch", 1)):
        for i in range(count):
            _write_png(root / "test" / defect / f"{i:03d}.png", _image(10 + i))
            _write_png(root / "ground_truth" / defect / f"{i:03d}_mask.png", _mask())
    for i in range(3):
        _write_png(root / "train" / "good" / f"{i:03d}.png", _image(20 + i))
    return root


def make_mvtec_3d(root: Path, xyz: bool = True) -> Path:
    """test/good 2 (all-zero gt), test/hole 2 (gt id 253), validation/good 2, optional xyz tiffs."""
    for defect, count, value in (("good", 2, 0), ("hole", 2, 253)):
        for i in range(count):
            folder = root / "test" / defect
            _write_png(folder / "rgb" / f"{i:03d}.png", _image(i))
            _write_png(folder / "gt" / f"{i:03d}.png", _mask(value))
            if xyz:
                (folder / "xyz").mkdir(exist_ok=True)
                (folder / "xyz" / f"{i:03d}.tiff").write_bytes(b"II*\x00")
    for i in range(2):
        _write_png(root / "validation" / "good" / "rgb" / f"{i:03d}.png", _image(30 + i))
    return root


def test_mvtec_ad_tree_loads_sorted_with_masks(tmp_path):
    root = make_mvtec_ad(tmp_path / "cat")
    assert detect_layout(root) == MVTEC_AD
    samples = load_dataset(root)
    assert [(s.defect_type, s.path.name, s.label, s.split) for s in samples] == [
        ("crack", "000.png", 1, "test"), ("crack", "001.png", 1, "test"),
        ("good", "000.png", 0, "test"), ("good", "001.png", 0, "test"), ("scratch", "000.png", 1, "test")]
    assert samples[1].mask_path == root / "ground_truth" / "crack" / "001_mask.png"
    assert all(s.mask_path is None and s.xyz_path is None for s in samples if s.label == 0)
    with_train = load_dataset(root, include_train=True)
    assert [s.split for s in with_train] == ["train"] * 3 + ["test"] * 5
    assert all(s.label == 0 and s.defect_type == "good" for s in with_train[:3])


def test_mvtec_3d_tree_loads_gt_xyz_and_validation(tmp_path):
    root = make_mvtec_3d(tmp_path / "tire")
    assert detect_layout(root) == MVTEC_3D_AD
    samples = load_dataset(root, include_validation=True)
    assert Counter((s.split, s.defect_type) for s in samples) == {
        ("validation", "good"): 2, ("test", "good"): 2, ("test", "hole"): 2}
    hole = samples[-1]
    assert hole.label == 1
    assert hole.mask_path == root / "test" / "hole" / "gt" / "001.png"
    assert hole.xyz_path == root / "test" / "hole" / "xyz" / "001.tiff"
    masks = load_masks([s for s in samples if s.split == "test"], 8)
    assert masks.reshape(4, -1).any(axis=1).tolist() == [False, False, True, True]
    validation = [s for s in samples if s.split == "validation"]
    assert all(s.mask_path is None and s.xyz_path is None for s in validation)


def test_mvtec_3d_without_xyz_folder_has_no_point_clouds(tmp_path):
    samples = load_dataset(make_mvtec_3d(tmp_path / "tire", xyz=False))
    assert all(s.xyz_path is None for s in samples)


def test_read_image_returns_rgb_and_grey_as_three_channels(tmp_path):
    bgr = np.zeros((H, W, 3), dtype=np.uint8)
    bgr[..., 0] = 255  # blue in OpenCV's BGR order
    rgb = read_image(_write_png(tmp_path / "blue.png", bgr))
    assert rgb.dtype == np.uint8 and rgb.shape == (H, W, 3)
    assert rgb[..., 2].min() == 255 and rgb[..., :2].max() == 0
    grey = read_image(_write_png(tmp_path / "grey.png", np.full((H, W), 77, np.uint8)))
    assert grey.shape == (H, W, 3) and (grey == 77).all()
    jpeg = tmp_path / "x.jpg"
    assert cv2.imwrite(str(jpeg), _image())
    assert read_image(jpeg).shape == (H, W, 3)


@pytest.mark.parametrize("value", [1, 253, 255])
def test_read_mask_resizes_then_thresholds_at_half_max(tmp_path, value):
    mask = np.zeros((8, 8), dtype=np.uint8)
    mask[:, :4] = value  # left half
    got = read_mask(_write_png(tmp_path / "m.png", mask), 4)
    assert got.dtype == bool and got.shape == (4, 4)
    assert got[:, :2].all() and not got[:, 2:].any()
    up = read_mask(tmp_path / "m.png", 16)
    assert up[:, :7].all() and not up[:, 9:].any()


def test_read_mask_of_all_zero_file_is_empty(tmp_path):
    got = read_mask(_write_png(tmp_path / "zero.png", np.zeros((H, W), np.uint8)), 6)
    assert got.shape == (6, 6) and not got.any()


def test_read_mask_thin_line_survives_shrinking(tmp_path):
    """Area interpolation keeps a 2-pixel line of a 16-pixel mask when shrinking to 8 (half coverage > 0.5)."""
    mask = np.zeros((16, 16), dtype=np.uint8)
    mask[:, 4:7] = 255
    got = read_mask(_write_png(tmp_path / "line.png", mask), 8)
    assert got[:, 2].all() and got.sum() == 8


# ---- bad input: every case must raise DatasetError naming the offending path ----

def _truncate(path: Path) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def test_missing_root(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        load_dataset(tmp_path / "nope")


def test_missing_test_folder(tmp_path):
    (tmp_path / "cat" / "train").mkdir(parents=True)
    with pytest.raises(DatasetError, match="no test folder"):
        detect_layout(tmp_path / "cat")


def test_test_folder_without_defect_types(tmp_path):
    (tmp_path / "cat" / "test").mkdir(parents=True)
    with pytest.raises(DatasetError, match="no defect-type folders"):
        load_dataset(tmp_path / "cat")


@pytest.mark.parametrize("make, empty", [
    (make_mvtec_ad, Path("test") / "dent"),
    (make_mvtec_3d, Path("test") / "cut" / "rgb"),
])
def test_empty_category(tmp_path, make, empty):
    root = make(tmp_path / "cat")
    (root / empty).mkdir(parents=True)
    with pytest.raises(DatasetError, match="empty category") as err:
        load_dataset(root)
    assert str(root / empty) in str(err.value)


def test_mixed_layouts_are_rejected(tmp_path):
    root = make_mvtec_3d(tmp_path / "cat")
    _write_png(root / "test" / "flat" / "000.png", _image())
    with pytest.raises(DatasetError, match="mixed layouts"):
        detect_layout(root)


@pytest.mark.parametrize("make, image", [
    (make_mvtec_ad, Path("test") / "crack" / "001.png"),
    (make_mvtec_3d, Path("test") / "good" / "rgb" / "000.png"),
])
def test_truncated_png_fails_at_load_and_read(tmp_path, make, image):
    root = make(tmp_path / "cat")
    _truncate(root / image)
    with pytest.raises(DatasetError, match="truncated") as err:
        load_dataset(root)
    assert str(root / image) in str(err.value)
    with pytest.raises(DatasetError, match="truncated"):
        read_image(root / image)


def test_not_an_image_fails_at_load(tmp_path):
    root = make_mvtec_ad(tmp_path / "cat")
    (root / "test" / "good" / "000.png").write_text("not a picture")
    with pytest.raises(DatasetError, match="not a PNG"):
        load_dataset(root)
    with pytest.raises(DatasetError, match="not a PNG or JPEG"):
        read_image(root / "test" / "good" / "000.png")


def test_corrupt_png_data_fails_to_decode(tmp_path):
    """Chunk structure intact (passes the load-time check) but the compressed data is garbage."""
    path = _write_png(tmp_path / "bad.png", _image())
    data = bytearray(path.read_bytes())
    start = data.index(b"IDAT") + 6
    data[start:start + 20] = bytes(20)
    path.write_bytes(bytes(data))
    with pytest.raises(DatasetError, match="cannot decode image .*bad.png"):
        read_image(path)


def test_truncated_jpeg_is_rejected(tmp_path):
    path = tmp_path / "x.jpg"
    assert cv2.imwrite(str(path), _image(shape=(64, 64)))
    _truncate(path)
    with pytest.raises(DatasetError, match="no JPEG end-of-image"):
        read_image(path)


def test_truncated_mask_is_rejected(tmp_path):
    path = _truncate(_write_png(tmp_path / "m.png", _mask()))
    with pytest.raises(DatasetError, match="m.png is truncated"):
        read_mask(path, 8)


@pytest.mark.parametrize("make, mask", [
    (make_mvtec_ad, Path("ground_truth") / "scratch" / "000_mask.png"),
    (make_mvtec_3d, Path("test") / "hole" / "gt" / "001.png"),
])
def test_missing_mask_for_anomalous_image(tmp_path, make, mask):
    root = make(tmp_path / "cat")
    (root / mask).unlink()
    with pytest.raises(DatasetError, match="missing mask") as err:
        load_dataset(root)
    assert str(root / mask) in str(err.value)


def test_missing_gt_for_good_3d_image_is_allowed(tmp_path):
    root = make_mvtec_3d(tmp_path / "cat")
    (root / "test" / "good" / "gt" / "000.png").unlink()
    good = [s for s in load_dataset(root) if s.label == 0]
    assert [s.mask_path is None for s in good] == [True, False]


@pytest.mark.parametrize("make, mask", [
    (make_mvtec_ad, Path("ground_truth") / "crack" / "000_mask.png"),
    (make_mvtec_3d, Path("test") / "good" / "gt" / "001.png"),
])
def test_mask_size_differs_from_image(tmp_path, make, mask):
    root = make(tmp_path / "cat")
    _write_png(root / mask, _mask(shape=(H, W + 1)))
    with pytest.raises(DatasetError, match=f"mask .* is {W + 1}x{H} but its image .* is {W}x{H}") as err:
        load_dataset(root)
    assert str(root / mask) in str(err.value)


def test_missing_point_cloud_when_xyz_folder_exists(tmp_path):
    root = make_mvtec_3d(tmp_path / "cat")
    (root / "test" / "hole" / "xyz" / "000.tiff").unlink()
    with pytest.raises(DatasetError, match="missing point cloud .*000.tiff"):
        load_dataset(root)


def test_requested_split_must_exist(tmp_path):
    with pytest.raises(DatasetError, match="missing folder .*train"):
        load_dataset(make_mvtec_3d(tmp_path / "tire"), include_train=True)
    with pytest.raises(DatasetError, match="no validation split"):
        load_dataset(make_mvtec_ad(tmp_path / "cat"), include_validation=True)


# ---- real data (skipped when ../shared/data is absent) ----

@pytest.mark.data
@pytest.mark.skipif(not (DATA / "mvtec_ad" / "bottle").is_dir(), reason="real MVTec AD bottle data absent")
def test_real_bottle_counts():
    samples = load_dataset(DATA / "mvtec_ad" / "bottle", include_train=True)
    counts = Counter((s.split, s.label) for s in samples)
    assert counts == {("test", 0): 20, ("test", 1): 63, ("train", 0): 209}
    assert all(s.mask_path is not None for s in samples if s.label == 1)


@pytest.mark.data
@pytest.mark.skipif(not (DATA / "mvtec_3d_ad" / "tire").is_dir(), reason="real MVTec 3D-AD tire data absent")
def test_real_tire_counts_and_masks():
    samples = load_dataset(DATA / "mvtec_3d_ad" / "tire", include_validation=True)
    counts = Counter((s.split, s.label) for s in samples)
    assert counts == {("test", 0): 25, ("test", 1): 87, ("validation", 0): 29}
    assert all(s.xyz_path is None for s in samples)
    first_good = next(s for s in samples if s.split == "test" and s.label == 0)
    first_bad = next(s for s in samples if s.label == 1)
    assert not read_mask(first_good.mask_path, 224).any()
    assert read_mask(first_bad.mask_path, 224).any()
    assert read_image(first_bad.path).shape == (800, 600, 3)  # 600 wide, 800 high
