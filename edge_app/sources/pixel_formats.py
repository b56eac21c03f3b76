"""GenICam pixel formats (PFNC) to the model's input: an RGB uint8 ``[H, W, 3]`` image.

Pure array functions, no camera library: a source hands over the payload bytes of one image, its PFNC
pixel format (name or 32-bit code) and its size. Supported: ``Mono8``, ``Mono10``/``Mono12``/``Mono14``/
``Mono16`` (unpacked, little-endian 16-bit containers), ``BayerRG8``/``BayerGR8``/``BayerBG8``/``BayerGB8``
and their unpacked 10/12/16-bit variants, ``RGB8`` and ``BGR8``. Packed formats (``Mono12p``, ``Mono10Packed``,
...) and YUV are refused with :class:`PixelFormatError` naming the format: set the camera to one of the above.

>>> rgb = to_rgb(payload, "BayerRG8", width=1440, height=1080)
"""
from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np


class PixelFormatError(ValueError):
    """A payload cannot be converted: unsupported pixel format, or a size that does not match."""


@dataclass(frozen=True)
class PixelFormat:
    """One PFNC format: its name, 32-bit code, significant bits per channel, and layout."""

    name: str
    code: int
    bits: int          # significant bits per sample (8, 10, 12, 14, 16)
    layout: str        # "mono" | "bayer" | "rgb" | "bgr"
    bayer: str = ""    # colours of the top-left 2x2 cell, row by row: "RGGB", "GRBG", "GBRG", "BGGR"

    @property
    def container_bytes(self) -> int:
        """Bytes per sample in the payload (1 for 8-bit, 2 for unpacked 10..16-bit)."""
        return 1 if self.bits == 8 else 2

    @property
    def channels(self) -> int:
        return 3 if self.layout in ("rgb", "bgr") else 1


# PFNC names and codes (GenICam Pixel Format Naming Convention 2.x; the same values as Aravis' ARV_PIXEL_FORMAT_*).
FORMATS: dict[str, PixelFormat] = {f.name: f for f in (
    PixelFormat("Mono8", 0x01080001, 8, "mono"),
    PixelFormat("Mono10", 0x01100003, 10, "mono"),
    PixelFormat("Mono12", 0x01100005, 12, "mono"),
    PixelFormat("Mono14", 0x01100025, 14, "mono"),
    PixelFormat("Mono16", 0x01100007, 16, "mono"),
    PixelFormat("BayerGR8", 0x01080008, 8, "bayer", "GRBG"),
    PixelFormat("BayerRG8", 0x01080009, 8, "bayer", "RGGB"),
    PixelFormat("BayerGB8", 0x0108000A, 8, "bayer", "GBRG"),
    PixelFormat("BayerBG8", 0x0108000B, 8, "bayer", "BGGR"),
    PixelFormat("BayerGR10", 0x0110000C, 10, "bayer", "GRBG"),
    PixelFormat("BayerRG10", 0x0110000D, 10, "bayer", "RGGB"),
    PixelFormat("BayerGB10", 0x0110000E, 10, "bayer", "GBRG"),
    PixelFormat("BayerBG10", 0x0110000F, 10, "bayer", "BGGR"),
    PixelFormat("BayerGR12", 0x01100010, 12, "bayer", "GRBG"),
    PixelFormat("BayerRG12", 0x01100011, 12, "bayer", "RGGB"),
    PixelFormat("BayerGB12", 0x01100012, 12, "bayer", "GBRG"),
    PixelFormat("BayerBG12", 0x01100013, 12, "bayer", "BGGR"),
    PixelFormat("BayerGR16", 0x0110002E, 16, "bayer", "GRBG"),
    PixelFormat("BayerRG16", 0x0110002F, 16, "bayer", "RGGB"),
    PixelFormat("BayerGB16", 0x01100030, 16, "bayer", "GBRG"),
    PixelFormat("BayerBG16", 0x01100031, 16, "bayer", "BGGR"),
    PixelFormat("RGB8", 0x02180014, 8, "rgb"),
    PixelFormat("BGR8", 0x02180015, 8, "bgr"),
)}
BY_CODE: dict[int, PixelFormat] = {f.code: f for f in FORMATS.values()}

# OpenCV names a Bayer pattern by the colours of the second row's second and third pixels, PFNC by the
# top-left cell; these are the OpenCV codes that give RGB for each PFNC top-left cell.
_CV_BAYER_TO_RGB = {"RGGB": cv2.COLOR_BayerBG2RGB, "GRBG": cv2.COLOR_BayerGB2RGB,
                    "GBRG": cv2.COLOR_BayerGR2RGB, "BGGR": cv2.COLOR_BayerRG2RGB}


def pixel_format(fmt: str | int) -> PixelFormat:
    """The supported format named ``fmt`` (PFNC name, case as in PFNC) or with PFNC code ``fmt``."""
    found = BY_CODE.get(fmt) if isinstance(fmt, int) else FORMATS.get(fmt)
    if found is None:
        shown = f"0x{fmt:08X}" if isinstance(fmt, int) else repr(fmt)
        raise PixelFormatError(f"pixel format {shown} is not supported; set the camera's PixelFormat to one of "
                               f"{', '.join(FORMATS)}")
    return found


def payload_bytes(fmt: str | int, width: int, height: int) -> int:
    """Bytes one ``width`` x ``height`` image of ``fmt`` needs (no line padding)."""
    spec = pixel_format(fmt)
    return width * height * spec.channels * spec.container_bytes


def to_rgb(payload: bytes | memoryview | np.ndarray, fmt: str | int, width: int, height: int) -> np.ndarray:
    """One image's payload as RGB uint8 ``[height, width, 3]`` (a new array).

    Deeper than 8 bits keeps the most significant 8 of the significant bits (``Mono12`` value 4095 -> 255).
    Bayer mosaics are demosaiced bilinearly. Raises :class:`PixelFormatError` for an unsupported format or a
    payload shorter than the image (an incomplete frame); bytes beyond the image (padding) are ignored.
    """
    spec = pixel_format(fmt)
    if width <= 0 or height <= 0:
        raise PixelFormatError(f"{spec.name} image of {width} x {height} pixels has no area")
    needed = payload_bytes(spec.code, width, height)
    flat = np.frombuffer(payload, dtype=np.uint8) if not isinstance(payload, np.ndarray) else payload.reshape(-1)
    if flat.dtype != np.uint8:
        flat = flat.view(np.uint8)
    if flat.size < needed:
        raise PixelFormatError(f"{spec.name} {width} x {height} needs {needed} bytes, the payload has {flat.size}")
    samples = flat[:needed]
    if spec.container_bytes == 2:
        wide = samples.view("<u2")
        samples = (np.minimum(wide, (1 << spec.bits) - 1) >> (spec.bits - 8)).astype(np.uint8)
    if spec.layout == "mono":
        gray = samples.reshape(height, width)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if spec.layout == "bayer":
        if width < 2 or height < 2:
            raise PixelFormatError(f"{spec.name} image of {width} x {height} pixels is smaller than one Bayer cell")
        return cv2.cvtColor(np.ascontiguousarray(samples.reshape(height, width)), _CV_BAYER_TO_RGB[spec.bayer])
    image = samples.reshape(height, width, 3)
    return image.copy() if spec.layout == "rgb" else np.ascontiguousarray(image[:, :, ::-1])


def mosaic(rgb: np.ndarray, pattern: str) -> np.ndarray:
    """The Bayer mosaic a sensor with top-left cell ``pattern`` (``"RGGB"``, ...) records of ``rgb``.

    The inverse of demosaicing for flat colours; used to build test frames and the fake camera's checks.
    """
    if sorted(pattern) != sorted("RGGB"):
        raise PixelFormatError(f"Bayer pattern {pattern!r} is not a 2x2 arrangement of R, G, G, B")
    out = np.empty(rgb.shape[:2], dtype=rgb.dtype)
    for i, colour in enumerate(pattern):
        dy, dx = divmod(i, 2)
        out[dy::2, dx::2] = rgb[dy::2, dx::2, "RGB".index(colour)]
    return out


# -- 3D components (GenICam 3D: Scan3d, PFNC Coord3D_*) ---------------------------------------------------------
COORD3D_FORMATS = {"Coord3D_ABC32f": 0x026000C0, "Coord3D_ABC32f_Planar": 0x026000C1}
_COORD3D_BY_CODE = {code: name for name, code in COORD3D_FORMATS.items()}


def is_coord3d(fmt: str | int) -> bool:
    """Whether ``fmt`` is a supported point-cloud format (Cartesian ``Coord3D_ABC32f``, interleaved or planar)."""
    return fmt in COORD3D_FORMATS or fmt in _COORD3D_BY_CODE


def to_cloud(payload: bytes | memoryview | np.ndarray, fmt: str | int, width: int, height: int,
             invalid: float | None = None) -> np.ndarray:
    """One 3D component as an organised cloud ``[height, width, 3]`` float32 (x, y, z), missing points NaN.

    ``Coord3D_ABC32f`` holds A, B, C per pixel, ``..._Planar`` an A plane, a B plane, a C plane; in the
    camera's Cartesian coordinate system they are x, y, z. A point whose C equals ``invalid`` (the camera's
    ``Scan3dInvalidDataValue``) or that has a non-finite coordinate is missing. Range-only formats
    (``Coord3D_C*``) need the camera's projection to become points and are refused, as are packed ones.
    """
    name = fmt if isinstance(fmt, str) else _COORD3D_BY_CODE.get(fmt)
    if name not in COORD3D_FORMATS:
        shown = f"0x{fmt:08X}" if isinstance(fmt, int) else repr(fmt)
        raise PixelFormatError(f"3D pixel format {shown} is not supported; set the camera's 3D component to "
                               f"{' or '.join(COORD3D_FORMATS)} in a Cartesian coordinate system")
    if width <= 0 or height <= 0:
        raise PixelFormatError(f"{name} component of {width} x {height} points has no area")
    needed = width * height * 3 * 4
    flat = np.frombuffer(payload, dtype=np.uint8) if not isinstance(payload, np.ndarray) else payload.reshape(-1)
    if flat.dtype != np.uint8:
        flat = flat.view(np.uint8)
    if flat.size < needed:
        raise PixelFormatError(f"{name} {width} x {height} needs {needed} bytes, the payload has {flat.size}")
    values = flat[:needed].view("<f4")
    if name.endswith("_Planar"):
        cloud = values.reshape(3, height, width).transpose(1, 2, 0).astype(np.float32)
    else:
        cloud = values.reshape(height, width, 3).astype(np.float32)
    missing = ~np.isfinite(cloud).all(axis=2)
    if invalid is not None and np.isfinite(invalid):
        missing |= cloud[..., 2] == np.float32(invalid)
    cloud[missing] = np.nan
    return cloud
