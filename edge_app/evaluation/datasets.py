"""Category loaders for the MVTec AD and MVTec 3D-AD folder layouts, with strict file checks.

MVTec AD:    <root>/test/<type>/<id>.png, masks <root>/ground_truth/<type>/<id>_mask.png, <root>/train/good/
MVTec 3D-AD: <root>/test/<type>/rgb/<id>.png, masks .../gt/<id>.png (> 0 is anomalous), optional .../xyz/<id>.tiff,
             plus <root>/validation/good/ and <root>/train/good/ with the same sub-folders.

Loading checks every file cheaply (PNG signature, header size and the IEND trailer that a truncated file lacks),
so a broken dataset fails at load time with a ``DatasetError`` naming the file, not deep inside a decoder.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

MVTEC_AD = "mvtec_ad"
MVTEC_3D_AD = "mvtec_3d_ad"
GOOD = "good"
SPLIT_ORDER = ("train", "validation", "test")

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_IEND = b"\x00\x00\x00\x00IEND\xaeB`\x82"
_JPEG_SOI = b"\xff\xd8"
_JPEG_EOI = b"\xff\xd9"


class DatasetError(ValueError):
    """A dataset folder or file is missing, malformed or inconsistent."""


@dataclass(frozen=True)
class Sample:
    """One image of a category, with its ground truth."""

    path: Path
    label: int                # 0 good, 1 anomalous
    defect_type: str          # "good" or the defect folder name
    mask_path: Path | None    # None when the layout has no mask for this (good) image
    split: str                # "train", "validation" or "test"
    xyz_path: Path | None = None


def _png_size(path: Path) -> tuple[int, int]:
    """(height, width) from a PNG header, after checking the signature and the IEND trailer."""
    try:
        with path.open("rb") as f:
            head = f.read(24)
            f.seek(0, 2)
            length = f.tell()
            f.seek(max(length - len(_PNG_IEND), 0))
            tail = f.read()
    except OSError as exc:
        raise DatasetError(f"cannot read image file {path}: {exc}") from exc
    if not head.startswith(_PNG_SIGNATURE) or head[12:16] != b"IHDR":
        raise DatasetError(f"{path} is not a PNG file (bad signature or header)")
    if tail != _PNG_IEND:
        raise DatasetError(f"{path} is truncated (no PNG IEND chunk at the end)")
    return int.from_bytes(head[20:24], "big"), int.from_bytes(head[16:20], "big")


def _check_png_chunks(data: bytes, path: Path) -> None:
    """Walk the PNG chunk list; the file must end exactly with an IEND chunk."""
    pos = len(_PNG_SIGNATURE)
    while pos + 12 <= len(data):
        length = int.from_bytes(data[pos:pos + 4], "big")
        kind = data[pos + 4:pos + 8]
        pos += 12 + length
        if kind == b"IEND":
            if pos == len(data):
                return
            break
    raise DatasetError(f"{path} is truncated or corrupt (PNG chunks do not end with IEND)")


def _read_checked(path: str | Path) -> np.ndarray:
    """The bytes of a complete PNG or JPEG file, as a uint8 buffer for ``cv2.imdecode``."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DatasetError(f"cannot read image file {path}: {exc}") from exc
    if data.startswith(_PNG_SIGNATURE):
        _check_png_chunks(data, path)
    elif data.startswith(_JPEG_SOI):
        if not data.rstrip(b"\x00").endswith(_JPEG_EOI):
            raise DatasetError(f"{path} is truncated (no JPEG end-of-image marker)")
    else:
        raise DatasetError(f"{path} is not a PNG or JPEG file")
    return np.frombuffer(data, dtype=np.uint8)


def read_image(path: str | Path) -> np.ndarray:
    """A complete PNG/JPEG/BMP file as an RGB uint8 ``[H, W, 3]`` array (edge_app/mediaio.py)."""
    from ..mediaio import MediaError, read_image as read_media

    try:
        return read_media(path)
    except MediaError as exc:
        raise DatasetError(str(exc)) from None


def read_mask(path: str | Path, size: int) -> np.ndarray:
    """Ground-truth mask resized to ``[size, size]`` and thresholded at half its maximum, as bool.

    Area interpolation when shrinking, bilinear when enlarging; an all-zero mask stays all False.
    Any non-zero class id (MVTec 3D-AD uses 253..255) counts as anomalous.
    """
    if size <= 0:
        raise DatasetError(f"mask size must be positive, got {size}")
    from ..mediaio import MediaError, decode_image

    data = _read_checked(path).tobytes()
    try:   # one decoder for every file: the header's size is held to the pixel budget before decoding
        mask = decode_image(data, str(path), scale_16bit=True)[..., 0]
    except MediaError as exc:
        raise DatasetError(f"cannot decode mask: {exc}") from None
    peak = float(mask.max())
    if peak == 0:
        return np.zeros((size, size), dtype=bool)
    shrinking = size < min(mask.shape)
    resized = cv2.resize(mask.astype(np.float32), (size, size),
                         interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR)
    return resized > 0.5 * peak


def load_masks(samples: list[Sample], size: int) -> np.ndarray:
    """``[N, size, size]`` bool masks of ``samples``; all False where a sample has no mask file."""
    masks = np.zeros((len(samples), size, size), dtype=bool)
    for i, sample in enumerate(samples):
        if sample.mask_path is not None:
            masks[i] = read_mask(sample.mask_path, size)
    return masks


def _subfolders(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _test_types(root: Path) -> list[Path]:
    if not root.is_dir():
        raise DatasetError(f"dataset root {root} does not exist or is not a folder")
    test = root / "test"
    if not test.is_dir():
        raise DatasetError(f"no test folder in {root} (expected a category folder such as mvtec_ad/bottle)")
    types = _subfolders(test)
    if not types:
        raise DatasetError(f"{test} has no defect-type folders")
    return types


def _layout_of(test_types: list[Path]) -> str:
    with_rgb = [t for t in test_types if (t / "rgb").is_dir()]
    if not with_rgb:
        return MVTEC_AD
    if len(with_rgb) == len(test_types):
        return MVTEC_3D_AD
    plain = [str(t) for t in test_types if t not in with_rgb]
    raise DatasetError(f"mixed layouts: {plain} have no rgb folder while {[str(t) for t in with_rgb]} do")


def detect_layout(root: str | Path) -> str:
    """``MVTEC_3D_AD`` when every ``test/<type>`` has an ``rgb`` folder, ``MVTEC_AD`` when none has."""
    return _layout_of(_test_types(Path(root)))


def _pngs(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise DatasetError(f"missing folder {folder}")
    images = sorted(p for p in folder.glob("*.png") if not p.name.startswith("."))
    if not images:
        raise DatasetError(f"empty category: no .png images in {folder}")
    return images


def _check_mask_size(mask: Path, image: Path, image_size: tuple[int, int]) -> None:
    mask_size = _png_size(mask)
    if mask_size != image_size:
        raise DatasetError(f"mask {mask} is {mask_size[1]}x{mask_size[0]} but its image {image} is "
                           f"{image_size[1]}x{image_size[0]}")


def _load_mvtec_ad_folder(root: Path, type_dir: Path, split: str) -> list[Sample]:
    defect = type_dir.name
    samples = []
    for image in _pngs(type_dir):
        size = _png_size(image)
        mask = None
        if defect != GOOD:
            mask = root / "ground_truth" / defect / f"{image.stem}_mask.png"
            if not mask.is_file():
                raise DatasetError(f"missing mask {mask} for anomalous image {image}")
            _check_mask_size(mask, image, size)
        samples.append(Sample(image, int(defect != GOOD), defect, mask, split))
    return samples


def _load_mvtec_3d_folder(type_dir: Path, split: str) -> list[Sample]:
    defect = type_dir.name
    gt_dir, xyz_dir = type_dir / "gt", type_dir / "xyz"
    has_xyz = xyz_dir.is_dir()
    samples = []
    for image in _pngs(type_dir / "rgb"):
        size = _png_size(image)
        mask: Path | None = gt_dir / image.name
        if mask.is_file():
            _check_mask_size(mask, image, size)
        elif defect != GOOD:
            raise DatasetError(f"missing mask {mask} for anomalous image {image}")
        else:
            mask = None
        xyz = xyz_dir / f"{image.stem}.tiff" if has_xyz else None
        if xyz is not None and not xyz.is_file():
            raise DatasetError(f"missing point cloud {xyz} for image {image} ({xyz_dir} exists)")
        samples.append(Sample(image, int(defect != GOOD), defect, mask, split, xyz))
    return samples


def load_dataset(root: str | Path, *, include_train: bool = False,
                 include_validation: bool = False) -> list[Sample]:
    """All test samples of one category folder (layout detected), optionally with its good reference splits.

    ``include_train`` adds ``train/good`` and ``include_validation`` adds ``validation/good`` (MVTec 3D-AD only),
    both labelled good; asking for a split the folder lacks is an error. Samples are sorted by split
    (train, validation, test), defect type, then file name.
    """
    root = Path(root)
    test_types = _test_types(root)
    layout = _layout_of(test_types)
    if include_validation and layout == MVTEC_AD:
        raise DatasetError(f"{root} has the MVTec AD layout, which has no validation split")
    folders = [(type_dir, "test") for type_dir in test_types]
    if include_train:
        folders.append((root / "train" / GOOD, "train"))
    if include_validation:
        folders.append((root / "validation" / GOOD, "validation"))
    samples = [sample for folder, split in folders for sample in
               (_load_mvtec_ad_folder(root, folder, split) if layout == MVTEC_AD
                else _load_mvtec_3d_folder(folder, split))]
    return sorted(samples, key=lambda s: (SPLIT_ORDER.index(s.split), s.defect_type, s.path.name))
