"""Read organised point clouds into one convention: ``[H, W, 3]`` float32 with NaN = missing point.

Sources disagree on how a missing point looks (MVTec 3D-AD writes ``(0, 0, 0)``, Zivid / ROS write NaN),
so both become NaN at ingest and :func:`valid_mask` is the single test for "has a point". Formats:
MVTec 3D-AD ``xyz/*.tiff`` (tifffile), ``.npy``, ASCII / binary ``.ply`` and ASCII / binary ``.pcd``.
Every error names the offending file.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..limits import MAX_CLOUD_POINTS, LimitError, checked_shape

MAX_ABS_COORDINATE = 1e4   # larger coordinates are unit or decoding errors, not geometry

_PLY_TYPES = {
    "char": "i1", "int8": "i1", "uchar": "u1", "uint8": "u1", "short": "i2", "int16": "i2",
    "ushort": "u2", "uint16": "u2", "int": "i4", "int32": "i4", "uint": "u4", "uint32": "u4",
    "float": "f4", "float32": "f4", "double": "f8", "float64": "f8",
}
_PLY_ENDIAN = {"ascii": None, "binary_little_endian": "<", "binary_big_endian": ">"}
_PCD_KINDS = {"F": "f", "I": "i", "U": "u"}


class CloudError(ValueError):
    """A point cloud that cannot be used: unreadable, wrong shape, empty, absurd or misaligned."""


def valid_mask(cloud: np.ndarray) -> np.ndarray:
    """``[H, W]`` True where the organised cloud has a point."""
    finite = np.isfinite(cloud[..., 0])
    for axis in range(1, cloud.shape[-1]):   # per coordinate: much faster than all() over a length-3 axis
        finite &= np.isfinite(cloud[..., axis])
    return finite


def to_organised(xyz: np.ndarray, source: str = "<array>",
                 image_shape: tuple[int, ...] | None = None,
                 max_abs: float = MAX_ABS_COORDINATE) -> np.ndarray:
    """Validate and convert raw coordinates to ``[H, W, 3]`` float32 with NaN = missing.

    ``xyz`` is ``[H, W, 3]``, or ``[H*W, 3]`` together with ``image_shape`` (its first two entries are
    used). ``(0, 0, 0)`` and non-finite points become missing. Raises :class:`CloudError` (naming
    ``source``) for a wrong shape, no valid point, a finite coordinate beyond ``max_abs``, or an
    ``H x W`` that differs from ``image_shape``.
    """
    xyz = np.asarray(xyz)
    if xyz.dtype.kind not in "fiu":
        raise CloudError(f"{source}: point coordinates must be numeric, got dtype {xyz.dtype}")
    if xyz.ndim == 2 and xyz.shape[1] == 3:
        if image_shape is None:
            raise CloudError(f"{source}: unorganised cloud of {xyz.shape[0]} points; "
                             "pass the paired image shape to organise it")
        h, w = image_shape[:2]
        if xyz.shape[0] != h * w:
            raise CloudError(f"{source}: {xyz.shape[0]} points cannot fill the paired image grid {h}x{w}")
        xyz = xyz.reshape(h, w, 3)
    if xyz.ndim != 3 or xyz.shape[2] != 3 or xyz.shape[0] == 0 or xyz.shape[1] == 0:
        raise CloudError(f"{source}: expected an organised cloud [H, W, 3], got shape {xyz.shape}")
    if image_shape is not None and xyz.shape[:2] != tuple(image_shape[:2]):
        raise CloudError(f"{source}: cloud is {xyz.shape[0]}x{xyz.shape[1]} but the paired image is "
                         f"{image_shape[0]}x{image_shape[1]}; 2D and 3D must be pixel-aligned")
    coords = xyz.astype(np.float64, copy=False)
    finite = np.isfinite(coords)
    magnitude = np.abs(np.where(finite, coords, 0.0))
    if magnitude.max() > max_abs:
        row, col, axis = np.unravel_index(int(magnitude.argmax()), magnitude.shape)
        raise CloudError(f"{source}: absurd coordinate {coords[row, col, axis]:.6g} at pixel ({row}, {col}) "
                         f"(|value| > {max_abs:g}); wrong units or a corrupt file")
    missing = ~finite.all(axis=-1) | (coords == 0.0).all(axis=-1)
    if missing.all():
        raise CloudError(f"{source}: cloud has no valid point (all missing, zero or non-finite)")
    cloud = coords.astype(np.float32)
    cloud[missing] = np.nan
    return cloud


def read_cloud(path: str | Path, image_shape: tuple[int, ...] | None = None) -> np.ndarray:
    """Read ``.tif/.tiff``, ``.npy``, ``.ply`` or ``.pcd`` into ``[H, W, 3]`` float32, NaN = missing.

    ``image_shape`` (the paired RGB image's shape) organises unorganised files and is checked against
    organised ones.
    """
    path = Path(path)
    readers = {".tif": _read_tiff, ".tiff": _read_tiff, ".npy": _read_npy, ".ply": _read_ply, ".pcd": _read_pcd}
    reader = readers.get(path.suffix.lower())
    if reader is None:
        raise CloudError(f"{path}: unsupported point-cloud format {path.suffix!r} "
                         f"(expected one of {', '.join(sorted(readers))})")
    if not path.is_file():
        raise CloudError(f"{path}: no such file")
    try:
        xyz, shape = reader(path)
    except CloudError:
        raise
    except Exception as exc:  # a decoder's own error type says little; name the file instead
        raise CloudError(f"{path}: unreadable point cloud ({type(exc).__name__}: {exc})") from exc
    if shape is not None:
        if image_shape is not None and tuple(image_shape[:2]) != shape:
            raise CloudError(f"{path}: cloud is {shape[0]}x{shape[1]} but the paired image is "
                             f"{image_shape[0]}x{image_shape[1]}; 2D and 3D must be pixel-aligned")
        xyz = xyz.reshape(*shape, 3)
    return to_organised(xyz, str(path), image_shape)


def declared_cloud_shape(shape: tuple[int, ...], path: Path, max_points: int = MAX_CLOUD_POINTS) -> tuple[int, ...]:
    """``shape`` as a file's header declares it, checked (``limits.checked_shape``) before its data is read:
    at most ``max_points`` points (``3 * max_points`` values; an unorganised ``[N, 3]`` file may have a side
    that long). Whether the shape is an organised cloud is :func:`to_organised`'s question, asked after.
    CloudError otherwise."""
    try:
        return checked_shape(list(shape), where=str(path), ndim=(1, 2, 3, 4), min_side=0, max_side=max_points,
                             max_elements=3 * max_points)
    except LimitError as exc:
        raise CloudError(f"{exc} (checked on the header, before reading)") from None


def _read_tiff(path: Path) -> tuple[np.ndarray, None]:
    try:
        import tifffile
    except ImportError as exc:
        raise CloudError(f"{path}: reading TIFF clouds needs the 'tifffile' package") from exc
    with tifffile.TiffFile(path) as tiff:
        if not tiff.series:
            raise CloudError(f"{path}: TIFF holds no image")
        declared_cloud_shape(tuple(int(v) for v in tiff.series[0].shape), path)
        return tiff.series[0].asarray(), None


def _read_npy(path: Path) -> tuple[np.ndarray, None]:
    mapped = np.load(path, mmap_mode="r", allow_pickle=False)   # maps, allocates nothing: shape checked first
    declared_cloud_shape(mapped.shape, path)
    return np.array(mapped), None


def _header_lines(raw: bytes, terminator: str, path: Path, max_lines: int = 200) -> tuple[list[str], int]:
    """Text header lines up to and including the one starting with ``terminator``; and the byte offset after it."""
    lines, offset = [], 0
    for _ in range(max_lines):
        end = raw.find(b"\n", offset)
        if end < 0:
            break
        line = raw[offset:end].decode("ascii", errors="replace").strip()
        offset = end + 1
        lines.append(line)
        if line.split(" ", 1)[0].upper() == terminator.upper():
            return lines, offset
    raise CloudError(f"{path}: header has no {terminator!r} line")


def _read_ply(path: Path) -> tuple[np.ndarray, None]:
    raw = path.read_bytes()
    if not raw.startswith(b"ply"):
        raise CloudError(f"{path}: not a PLY file (missing 'ply' magic)")
    lines, offset = _header_lines(raw, "end_header", path)
    fmt, elements = None, []
    for line in lines:
        words = line.split()
        if not words:
            continue
        if words[0] == "format":
            fmt = words[1]
        elif words[0] == "element":
            elements.append((words[1], int(words[2]), []))
        elif words[0] == "property" and elements:
            if words[1] == "list":
                elements[-1][2].append((words[-1], None))
            else:
                elements[-1][2].append((words[2], words[1]))
    if fmt not in _PLY_ENDIAN:
        raise CloudError(f"{path}: unsupported PLY format {fmt!r}")
    if not elements or elements[0][0] != "vertex":
        raise CloudError(f"{path}: the first PLY element must be 'vertex'")
    _, count, props = elements[0]
    declared_cloud_shape((count, 3), path)
    names = [name for name, _ in props]
    if any(kind is None for _, kind in props) or not {"x", "y", "z"} <= set(names):
        raise CloudError(f"{path}: PLY vertices need scalar x, y, z properties, got {names}")
    if any(kind not in _PLY_TYPES for _, kind in props):
        raise CloudError(f"{path}: unknown PLY property type in {props}")
    endian = _PLY_ENDIAN[fmt]
    if endian is None:
        body = raw[offset:].decode("ascii").split("\n", count)[:count]
        table = np.loadtxt(body, dtype=np.float64, ndmin=2)
        if table.shape != (count, len(props)):
            raise CloudError(f"{path}: expected {count} vertex rows of {len(props)} values, got {table.shape}")
        xyz = table[:, [names.index(a) for a in "xyz"]]
    else:
        dtype = np.dtype([(name, endian + _PLY_TYPES[kind]) for name, kind in props])
        if len(raw) - offset < count * dtype.itemsize:
            raise CloudError(f"{path}: truncated: {count} vertices need {count * dtype.itemsize} bytes")
        table = np.frombuffer(raw, dtype=dtype, count=count, offset=offset)
        xyz = np.stack([table[a].astype(np.float64) for a in "xyz"], axis=1)
    return xyz, None


def _read_pcd(path: Path) -> tuple[np.ndarray, tuple[int, int] | None]:
    raw = path.read_bytes()
    lines, offset = _header_lines(raw, "DATA", path)
    header = {}
    for line in lines:
        if line and not line.startswith("#"):
            key, _, value = line.partition(" ")
            header[key.upper()] = value.split()
    fields = header.get("FIELDS", [])
    if not {"x", "y", "z"} <= set(fields):
        raise CloudError(f"{path}: PCD needs fields x, y, z, got {fields}")
    sizes = [int(s) for s in header.get("SIZE", [])]
    kinds = header.get("TYPE", [])
    counts = [int(c) for c in header.get("COUNT", ["1"] * len(fields))]
    if not len(fields) == len(sizes) == len(kinds) == len(counts):
        raise CloudError(f"{path}: FIELDS/SIZE/TYPE/COUNT lengths differ")
    width, height = int(header["WIDTH"][0]), int(header["HEIGHT"][0])
    declared_cloud_shape((height, width, 3), path)
    points = int(header.get("POINTS", [width * height])[0])
    if points != width * height:
        raise CloudError(f"{path}: POINTS {points} != WIDTH*HEIGHT {width}*{height}")
    mode = header["DATA"][0].lower()
    if mode == "ascii":
        body = raw[offset:].decode("ascii").split("\n", points)[:points]
        table = np.loadtxt(body, dtype=np.float64, ndmin=2)
        columns = np.cumsum([0] + counts)
        if table.shape != (points, columns[-1]):
            raise CloudError(f"{path}: expected {points} rows of {columns[-1]} values, got {table.shape}")
        xyz = table[:, [columns[fields.index(a)] for a in "xyz"]]
    elif mode == "binary":
        dtype = np.dtype([(name, "<" + _PCD_KINDS[kind] + str(size), (count,) if count > 1 else ())
                          for name, size, kind, count in zip(fields, sizes, kinds, counts)])
        if len(raw) - offset < points * dtype.itemsize:
            raise CloudError(f"{path}: truncated: {points} points need {points * dtype.itemsize} bytes")
        table = np.frombuffer(raw, dtype=dtype, count=points, offset=offset)
        xyz = np.stack([table[a].astype(np.float64) for a in "xyz"], axis=1)
    else:
        raise CloudError(f"{path}: unsupported PCD DATA mode {mode!r} (ascii and binary are supported; "
                         "re-save binary_compressed clouds as binary)")
    return xyz, ((height, width) if height > 1 else None)
