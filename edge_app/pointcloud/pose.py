"""A part's canonical view: the scan and its image cropped to the part, turned to its principal axis.

Parts on a conveyor or a table lie in any orientation, and often small in the frame. Patch matching compares
the same grid cell across parts, so it meets pose before it meets defects, and a small part gets few
patches. The canonical view puts every part the same way up before any feature is computed:

* the centre is the centroid of the part's foreground pixels, the x axis its principal axis (the larger
  eigenvector of the pixel covariance), turned so that the part's longer tail of pixels along it points
  right (positive third moment): an elongated part keeps one end on the left;
* the scale fits the part's largest extent from the centre, times ``margin``, into half the grid.

It is a rotation (never a mirror) and a scale, one 2 x 3 affine per part. The image is warped with it
(bilinear), the organised cloud with nearest neighbours (so every point stays a measured point), and the
maps scored in the canonical grid go back to the frame's grid with :func:`to_frame`.
"""
from __future__ import annotations

import cv2
import numpy as np

DEFAULT_MARGIN = 1.3


def canonical_affine(foreground: np.ndarray, size: int, margin: float = DEFAULT_MARGIN) -> np.ndarray:
    """``[2, 3]`` affine from source pixel ``(x, y)`` to the ``size x size`` canonical grid of the part
    whose pixels are ``foreground [H, W]`` (bool)."""
    if margin < 1.0:
        raise ValueError(f"margin {margin} would crop the part; use 1.0 or more")
    ys, xs = np.nonzero(foreground)
    if len(xs) < 3:
        raise ValueError(f"{len(xs)} foreground pixels are too few to find the part's axis")
    centre = np.array([xs.mean(), ys.mean()])
    offsets = np.stack([xs, ys], axis=1) - centre
    axis = np.linalg.eigh(offsets.T @ offsets)[1][:, 1]
    along = offsets @ axis
    if np.mean(along ** 3) < 0:
        axis, along = -axis, -along
    across = np.array([-axis[1], axis[0]])
    extent = max(np.abs(along).max(), np.abs(offsets @ across).max(), 0.5) * margin
    scale = (size / 2) / extent
    rotation = np.stack([axis, across])
    affine = np.empty((2, 3))
    affine[:, :2] = scale * rotation
    affine[:, 2] = (size - 1) / 2 - scale * rotation @ centre
    return affine


def frame_to_canonical(affine: np.ndarray, frame_shape: tuple[int, int], size: int) -> np.ndarray:
    """``[2, 3]`` affine from the frame resized to ``size x size`` (pixel centres as ``cv2.resize``) to the
    canonical grid, for a source frame of ``frame_shape (H, W)``."""
    h, w = frame_shape
    to_source = np.array([[w / size, 0.0, 0.5 * w / size - 0.5],
                          [0.0, h / size, 0.5 * h / size - 0.5],
                          [0.0, 0.0, 1.0]])
    return affine @ to_source


def warp_image(image: np.ndarray, affine: np.ndarray, size: int) -> np.ndarray:
    """The image in the canonical grid (bilinear; black outside the frame)."""
    return cv2.warpAffine(image, affine, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT)


def warp_cloud(cloud: np.ndarray, affine: np.ndarray, size: int) -> np.ndarray:
    """The organised cloud ``[H, W, 3]`` in the canonical grid: the nearest point, NaN where none.

    Each source point lands on at most one grid pixel (the first in raster order that samples it): where the
    view zooms in, the other pixels stay empty, as in a sparser scan, instead of holding coincident copies.
    """
    h, w = cloud.shape[:2]
    source = np.arange(h * w, dtype=np.float64).reshape(h, w)   # exact in float64 for any frame size
    index = cv2.warpAffine(source, affine, (size, size), flags=cv2.INTER_NEAREST, borderMode=cv2.BORDER_CONSTANT,
                           borderValue=-1.0).ravel().astype(np.int64)
    out = np.full((size * size, 3), np.nan, np.float32)
    inside = np.flatnonzero(index >= 0)
    _, first = np.unique(index[inside], return_index=True)
    keep = inside[first]
    out[keep] = cloud.reshape(-1, 3)[index[keep]]
    return out.reshape(size, size, 3)


def to_frame(canonical_map: np.ndarray, view: np.ndarray | None) -> np.ndarray:
    """A map of the canonical grid on the frame's ``size x size`` grid (``view``: :func:`frame_to_canonical`;
    None: the map already is on the frame's grid). Off the canonical grid the map is 0."""
    if view is None:
        return canonical_map
    size = canonical_map.shape[1], canonical_map.shape[0]
    return cv2.warpAffine(canonical_map.astype(np.float32, copy=False), view, size,
                          flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP, borderMode=cv2.BORDER_CONSTANT)
