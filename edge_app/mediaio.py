"""The one image reader: formats, truncation rules and the pixel budget.

Every image that enters musc-edge (a frame from a source, a file for seeding or evaluation, a ground-truth
mask, an archived image the operator view shows, export verify's images) goes through :func:`decode_image`
or :func:`read_image`. Writing is not here: the archive, overlays, view thumbnails and synthetic sets encode
with OpenCV where they write; point clouds are read by ``pointcloud/io.py``.

Formats: PNG, JPEG, BMP. A file is refused *before* it is decoded when it is truncated (PNG without its final
IEND chunk, JPEG without EOI, BMP shorter than its declared size) or when its header declares more pixels
than the budget: a 2.7 MB PNG can declare 30000 x 30000 pixels and would take 2.7 GB to decode. Errors are
:class:`MediaError` naming ``where``.
"""
from __future__ import annotations

import struct
from pathlib import Path

import cv2
import numpy as np

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_IEND_CHUNK = b"\x00\x00\x00\x00IEND\xaeB`\x82"
JPEG_SOI = b"\xff\xd8\xff"
JPEG_EOI = b"\xff\xd9"
BMP_SIGNATURE = b"BM"
JPEG_TAIL = 64                   # bytes searched for EOI: some cameras pad a JPEG with zeros after the marker
DEFAULT_MAX_PIXELS = 40_000_000  # 40 MP: above any line camera we know of, 120 MB as RGB
HARD_MAX_PIXELS = 1 << 28        # 268 MP: no budget setting goes beyond this (0.8 GB as RGB)

# JPEG start-of-frame markers (baseline, progressive, lossless, ...): not DHT (C4), JPG (C8) or DAC (CC).
_JPEG_SOF = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})


class MediaError(ValueError):
    """Image bytes that cannot become an RGB uint8 image: empty, unknown format, truncated, too large."""


def image_format(data: bytes) -> str | None:
    """``png``, ``jpeg`` or ``bmp`` from the leading bytes, or None."""
    if data.startswith(PNG_SIGNATURE):
        return "png"
    if data.startswith(JPEG_SOI):
        return "jpeg"
    if data.startswith(BMP_SIGNATURE):
        return "bmp"
    return None


def declared_size(data: bytes) -> tuple[int, int] | None:
    """(height, width) the header declares, read without decoding; None when the header has none."""
    kind = image_format(data)
    if kind == "png" and len(data) >= 24 and data[12:16] == b"IHDR":
        width, height = struct.unpack(">II", data[16:24])
        return height, width
    if kind == "bmp" and len(data) >= 26:
        header_size = struct.unpack("<I", data[14:18])[0]
        if header_size == 12:   # OS/2 BITMAPCOREHEADER: 16-bit sizes
            width, height = struct.unpack("<HH", data[18:22])
        else:
            width, height = struct.unpack("<ii", data[18:26])
        return abs(height), abs(width)
    if kind == "jpeg":
        return _jpeg_size(data)
    return None


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
    """(height, width) of the first start-of-frame (SOFn), found the way libjpeg finds markers.

    libjpeg's ``next_marker`` skips any bytes that are not 0xFF ("extraneous bytes before marker"), any
    run of 0xFF fill bytes, and stuffed ``FF 00`` pairs; a walk that stopped at the first stray byte
    would miss a SOF that the decoder still reads. None when there is no SOF before SOS or EOI, or the
    walk runs out of bytes: the decoder would refuse such a file too.
    """
    pos, end = 2, len(data)
    while pos < end:
        pos = data.find(b"\xff", pos)           # skip extraneous (non-FF) bytes
        if pos < 0:
            return None
        while pos < end and data[pos] == 0xFF:   # and fill bytes
            pos += 1
        if pos >= end:
            return None
        marker = data[pos]
        pos += 1
        if marker == 0x00 or marker == 0x01 or 0xD0 <= marker <= 0xD7:   # stuffed zero, TEM, RSTn
            continue
        if marker in (0xD8, 0xD9, 0xDA):         # SOI again, EOI or SOS before any SOF: no image size
            return None
        if pos + 2 > end:
            return None
        length = struct.unpack(">H", data[pos:pos + 2])[0]
        if marker in _JPEG_SOF:
            if length < 8 or pos + 7 > end:
                return None
            height, width = struct.unpack(">HH", data[pos + 3:pos + 7])
            return height, width
        if length < 2:
            return None
        pos += length
    return None


def truncation(data: bytes) -> str | None:
    """Why the bytes are not a complete PNG/JPEG/BMP file, or None."""
    kind = image_format(data)
    if kind == "png" and not data.endswith(PNG_IEND_CHUNK):
        return f"truncated PNG ({len(data)} bytes, no IEND chunk at the end)"
    if kind == "jpeg" and not data[-JPEG_TAIL:].rstrip(b"\x00").endswith(JPEG_EOI):
        return f"truncated JPEG ({len(data)} bytes, no JPEG end-of-image (EOI) marker at the end)"
    if kind == "bmp" and len(data) >= 6 and struct.unpack("<I", data[2:6])[0] > len(data):
        return f"truncated BMP ({len(data)} bytes, the header says {struct.unpack('<I', data[2:6])[0]})"
    return None


def pixel_budget_problem(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> str | None:
    """Why the header's declared size is over ``max_pixels`` (or zero), or None; reads the header only."""
    size = declared_size(data)
    if size is None:
        return None
    height, width = size
    if height * width > max_pixels:
        return (f"header declares {width} x {height} = {height * width / 1e6:.1f} MP, over the pixel budget of "
                f"{max_pixels / 1e6:g} MP (source key max_pixels)")
    if height == 0 or width == 0:
        return f"header declares an empty {width} x {height} image"
    return None


def frame_to_rgb(frame: np.ndarray, where: str) -> np.ndarray:
    """An OpenCV frame (gray, BGR or BGRA, uint8) as RGB uint8 ``[H, W, 3]``; 3-channel frames in place."""
    if frame.dtype != np.uint8:
        raise MediaError(f"{where}: expected 8-bit pixels, got {frame.dtype}")
    if frame.ndim == 2 or (frame.ndim == 3 and frame.shape[2] == 1):
        return cv2.cvtColor(frame, cv2.COLOR_GRAY2RGB)
    if frame.ndim == 3 and frame.shape[2] == 3:
        return cv2.cvtColor(frame, cv2.COLOR_BGR2RGB, dst=frame)
    if frame.ndim == 3 and frame.shape[2] == 4:
        return cv2.cvtColor(frame, cv2.COLOR_BGRA2RGB)
    raise MediaError(f"{where}: expected 1, 3 or 4 channels, got an array of shape {frame.shape}")


def decode_image(data: bytes, where: str, max_pixels: int = DEFAULT_MAX_PIXELS, *,
                 scale_16bit: bool = False) -> np.ndarray:
    """PNG/JPEG/BMP bytes -> RGB uint8 ``[H, W, 3]``; MediaError naming ``where`` for empty, unknown,
    truncated, over-budget (checked on the header, before decoding) or corrupt bytes. 16-bit images are
    refused (a camera misconfigured) unless ``scale_16bit`` (files: keep the top 8 bits)."""
    if len(data) == 0:
        raise MediaError(f"{where}: empty frame (0 bytes)")
    kind = image_format(data)
    if kind is None:
        raise MediaError(f"{where}: cannot decode {len(data)}-byte image (unrecognised format: not a PNG or JPEG or BMP file)")
    problem = truncation(data) or pixel_budget_problem(data, min(max_pixels, HARD_MAX_PIXELS))
    if problem is None and declared_size(data) is None:   # the decoder would find a size we could not check
        problem = f"the {kind.upper()} header declares no image size that can be checked before decoding"
    if problem is not None:
        raise MediaError(f"{where}: {problem}")
    frame = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_UNCHANGED)
    if frame is None:
        raise MediaError(f"cannot decode image {where}: the {len(data)}-byte {kind.upper()} is corrupt")
    if frame.shape[0] * frame.shape[1] > max_pixels:   # a header we could not read
        raise MediaError(f"{where}: decoded {frame.shape[1]} x {frame.shape[0]}, over the pixel budget")
    if scale_16bit and frame.dtype == np.uint16:
        frame = (frame >> 8).astype(np.uint8)
    return frame_to_rgb(frame, where)


def read_image(path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """A complete PNG/JPEG/BMP file as RGB uint8 ``[H, W, 3]`` (grey replicated, 16-bit scaled to 8);
    MediaError naming the file."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise MediaError(f"cannot read image file {path}: {exc.strerror or exc}") from exc
    return decode_image(data, str(path), max_pixels, scale_16bit=True)
