"""Point clouds as sources deliver them: a part's cloud travels in its :class:`PartRecord` (a scanner is a
frame source whose frames carry a cloud, e.g. the ZeroMQ source's third frame).

A cloud is ``[H, W, 3]`` float32 in sensor coordinates, pixel-aligned with the RGB frame, NaN = missing
point (clouds that mark missing points with 0, such as MVTec 3D-AD, are converted at ingest).
"""
from __future__ import annotations

import numpy as np

CLOUD_SUFFIXES = (".npy", ".tiff", ".tif", ".ply", ".pcd")   # what edge_app/pointcloud/io.py reads


def normalize_cloud(cloud: np.ndarray, zero_is_missing: bool = False) -> np.ndarray:
    """A float32 copy of an ``[H, W, 3]`` cloud, with all-zero points set to NaN when ``zero_is_missing``."""
    out = cloud.astype(np.float32)
    if zero_is_missing:
        out[~out.any(axis=2)] = np.nan
    return out


def cloud_problem(cloud: np.ndarray | None) -> str | None:
    """Why ``cloud`` cannot be scored (None: it can): missing, not ``[H, W, 3]`` float32, or no valid point."""
    if cloud is None:
        return "the scanner delivered no cloud"
    if not isinstance(cloud, np.ndarray) or cloud.ndim != 3 or cloud.shape[2] != 3:
        return f"cloud of shape {getattr(cloud, 'shape', None)} is not [H, W, 3]"
    if cloud.dtype != np.float32:
        return f"cloud dtype {cloud.dtype} is not float32"
    if cloud.size == 0 or not np.isfinite(cloud[..., 2]).any():
        return f"cloud of shape {cloud.shape} has no valid point"
    return None
