"""Sizes checked before anything is allocated: array shapes from a header and JSON from a peer.

A header is a promise made by whoever sent it. Before a buffer is allocated or a parser recurses on its
word, the promise is checked here, with Python integers (a product of declared sides never wraps the way
``np.prod`` does in int64) and against per-dimension and total limits:

* :func:`checked_shape`: a declared array shape (``[H, W, 3]`` of a ZeroMQ frame or cloud, a TIFF's or a
  ``.npy``'s shape), every side a positive integer within ``max_side``, the element count within
  ``max_elements``.
* :func:`loads_bounded`: JSON text of at most ``max_bytes`` and ``max_depth`` levels of nesting, the depth
  counted without recursion before ``json.loads`` sees it (100,000 nested ``[`` would overflow its stack).

Both raise :class:`LimitError` (a ``ValueError``) naming ``where`` and the limit.
"""
from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import Any

MAX_SIDE = 65_535                 # a JPEG's own limit; no camera or scanner row/column count goes beyond
MAX_CLOUD_POINTS = 1 << 24        # 16.8 M points (4096 x 4096): 0.2 GB as float32 xyz, 0.4 GB as float64
MAX_JSON_DEPTH = 32               # a frame header is flat; a control request nests 3 or 4 levels
MAX_HEADER_BYTES = 64 << 10       # a ZeroMQ frame header (a few hundred bytes in practice)


class LimitError(ValueError):
    """A declared size or a document that is over its limit, or not a size at all."""


def checked_shape(value: Any, *, where: str, ndim: int | Sequence[int] | None = None,
                  fixed: dict[int, int] | None = None, min_side: int = 1, max_side: int = MAX_SIDE,
                  max_elements: int | None = None) -> tuple[int, ...]:
    """``value`` (a list or tuple of ints) as a shape tuple, checked before any allocation.

    ``ndim``: the allowed number of dimensions; ``fixed``: {axis: required length} (e.g. ``{2: 3}`` for xyz);
    every side is an int (not a bool) in ``min_side..max_side``; the product (exact, Python ints) is at most
    ``max_elements``. LimitError naming ``where`` otherwise.
    """
    if not isinstance(value, (list, tuple)) or not all(type(v) is int for v in value):
        raise LimitError(f"{where}: a shape is a list of integers, got {_shown(value)}")
    allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim or ())
    if allowed and len(value) not in allowed:
        raise LimitError(f"{where}: shape {_shown(value)} must have {' or '.join(map(str, allowed))} dimensions")
    for axis, length in (fixed or {}).items():
        if len(value) <= axis or value[axis] != length:
            raise LimitError(f"{where}: shape {_shown(value)} must have {length} in dimension {axis}")
    if any(not min_side <= v <= max_side for v in value):
        raise LimitError(f"{where}: shape {_shown(value)} has a side outside {min_side}..{max_side}")
    elements = math.prod(value)
    if max_elements is not None and elements > max_elements:
        raise LimitError(f"{where}: shape {_shown(value)} holds {elements:,} elements, over the limit of "
                         f"{max_elements:,}")
    return tuple(value)


def shape_bytes(shape: Sequence[int], itemsize: int) -> int:
    """Bytes an array of ``shape`` and ``itemsize`` needs, exactly (Python ints never wrap)."""
    return math.prod(int(v) for v in shape) * int(itemsize)


def json_depth(text: bytes | str) -> int:
    """Deepest nesting of ``[`` / ``{`` in JSON text, brackets inside strings ignored; no recursion."""
    data = text.encode("utf-8", "surrogatepass") if isinstance(text, str) else bytes(text)
    if b"[" not in data and b"{" not in data:
        return 0
    depth = deepest = 0
    in_string = escaped = False
    for byte in data:
        if in_string:
            if escaped:
                escaped = False
            elif byte == 0x5C:        # backslash
                escaped = True
            elif byte == 0x22:        # closing quote
                in_string = False
        elif byte == 0x22:
            in_string = True
        elif byte in (0x5B, 0x7B):    # [ {
            depth += 1
            deepest = max(deepest, depth)
        elif byte in (0x5D, 0x7D):    # ] }
            depth -= 1
    return deepest


def loads_bounded(text: bytes | str, *, where: str, max_bytes: int = MAX_HEADER_BYTES,
                  max_depth: int = MAX_JSON_DEPTH, allow_nan: bool = False) -> Any:
    """``json.loads`` of at most ``max_bytes`` and ``max_depth`` levels, checked before parsing.

    ``NaN`` / ``Infinity`` literals (not JSON, but Python's json accepts them) are refused unless
    ``allow_nan``. LimitError naming ``where`` for anything over a limit or not JSON (UTF-8 included).
    """
    size = len(text.encode("utf-8", "surrogatepass")) if isinstance(text, str) else len(text)
    if size > max_bytes:
        raise LimitError(f"{where}: {size:,} bytes of JSON, over the limit of {max_bytes:,}")
    if isinstance(text, (bytes, bytearray, memoryview)):
        try:
            text = bytes(text).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise LimitError(f"{where}: not UTF-8 ({exc})") from None
    if text.count("[") + text.count("{") > max_depth and (depth := json_depth(text)) > max_depth:
        raise LimitError(f"{where}: JSON nested {depth} levels deep, over the limit of {max_depth}")

    def refuse_constant(name: str) -> Any:
        raise LimitError(f"{where}: {name} is not a JSON number")

    try:
        return json.loads(text, parse_constant=None if allow_nan else refuse_constant)
    except LimitError:
        raise
    except (ValueError, RecursionError) as exc:
        raise LimitError(f"{where}: not JSON ({exc})") from None


def _shown(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."
