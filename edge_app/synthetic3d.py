"""Seeded synthetic 3D scanner + camera: pixel-aligned RGB images and organised clouds of one part type.

The scene is imaged orthographically (like a laser profiler over a conveyor) on a ``size x size`` grid
covering a 100 mm field, in metres, camera looking along +z. The part lies on a slightly tilted table
(background plane) with a small pose jitter: a rounded plate (flat top, sharp outer edges) carrying a
cylindrical bulge across its width (curved surface, creased edges) and a printed label, next to a separate
rail (a discontinuous second surface 1.5-3 mm lower across a 0.8-2 mm gap, both varying per part like an
assembly tolerance).

Lighting is a diffuse dome, so colours are albedo only: geometric defects (dent, bump, cut) are invisible
in 2D, a stain is invisible in 3D, a burn (dent + discolouration) shows in both. Missing points are NaN.
``write_mvtec3d`` writes a set as an MVTec 3D-AD tree, so everything that reads real data reads this too.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import tifffile

DEFECT_MODALITY = {"dent": "3d", "bump": "3d", "cut": "3d", "stain": "2d", "burn": "both"}
FIELD_OF_VIEW = 0.1        # metres covered by the grid side
TABLE_DEPTH = 0.5          # metres from the sensor to the table
_MM = 1e-3
_PLATE = (28 * _MM, 18 * _MM, 4 * _MM, 12 * _MM)          # half-width, half-height, corner radius, height
_CYLINDER = (-12 * _MM, 12 * _MM, 4 * _MM)                 # axis x (along y, across the plate), radius, height
_LABEL = (8 * _MM, 20 * _MM, -10 * _MM, 10 * _MM)          # x0, x1, y0, y1
_RAIL_WIDTH = 8 * _MM
_FLAT_AREA = ((0.0, 22 * _MM), (-13 * _MM, 13 * _MM))      # where flat-surface defects go
_CURVED_AREA = ((-16 * _MM, -8 * _MM), (-10 * _MM, 10 * _MM))
_COLOURS = {"table": (60, 62, 66), "plate": (150, 152, 158), "cylinder": (168, 160, 146),
            "label": (232, 232, 220), "ink": (30, 30, 34), "rail": (70, 90, 140)}


@dataclass(frozen=True)
class SyntheticPart:
    image: np.ndarray     # [H, W, 3] uint8 RGB
    cloud: np.ndarray     # [H, W, 3] float32 xyz in metres, NaN = missing
    mask: np.ndarray      # [H, W] bool ground-truth defect pixels
    kind: str             # "good" or a key of DEFECT_MODALITY
    gap_band: np.ndarray  # [H, W] bool pixels within 2.5 mm of the part-rail gap


@dataclass(frozen=True)
class SyntheticSet:
    images: np.ndarray           # [n, H, W, 3] uint8
    clouds: np.ndarray           # [n, H, W, 3] float32
    masks: np.ndarray            # [n, H, W] bool
    labels: np.ndarray           # [n] int8, 1 = defective
    kinds: tuple[str, ...]       # "good" | dent | bump | cut | stain | burn
    modalities: tuple[str, ...]  # "none" | "3d" | "2d" | "both": where the defect is visible
    gap_bands: np.ndarray        # [n, H, W] bool


def _gaussian(d2: np.ndarray, sigma: float) -> np.ndarray:
    return np.exp(-d2 / (2.0 * sigma ** 2))


def _defect_geometry(rng: np.random.Generator, kind: str, x: np.ndarray,
                     y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(height change in metres, footprint weight in [0, 1]) of one defect in part coordinates."""
    area = _FLAT_AREA if kind == "stain" or rng.random() < 0.6 else _CURVED_AREA
    cx, cy = rng.uniform(*area[0]), rng.uniform(*area[1])
    if kind == "cut":
        angle = rng.uniform(0, np.pi)
        length = rng.uniform(8, 14) * _MM
        direction = np.array([np.cos(angle), np.sin(angle)])
        ax, ay = cx - direction[0] * length / 2, cy - direction[1] * length / 2
        t = np.clip((x - ax) * direction[0] + (y - ay) * direction[1], 0.0, length)
        footprint = _gaussian((x - ax - t * direction[0]) ** 2 + (y - ay - t * direction[1]) ** 2,
                              rng.uniform(0.6, 0.9) * _MM)
        return -rng.uniform(1.0, 1.5) * _MM * footprint, footprint
    radius = rng.uniform(1.3, 2.0) * _MM if kind != "stain" else rng.uniform(2.5, 4.0) * _MM
    footprint = _gaussian((x - cx) ** 2 + (y - cy) ** 2, radius)
    if kind == "stain":
        return np.zeros_like(x), footprint
    depth = rng.uniform(1.5, 2.5) * _MM
    return (depth if kind == "bump" else -depth) * footprint, footprint


def render_part(rng: np.random.Generator, size: int = 224, kind: str = "good") -> SyntheticPart:
    """One scanned part with an optional defect of ``kind``."""
    if kind != "good" and kind not in DEFECT_MODALITY:
        raise ValueError(f"unknown defect kind {kind!r}: expected 'good' or one of {sorted(DEFECT_MODALITY)}")
    pitch = FIELD_OF_VIEW / size
    coords = (np.arange(size) + 0.5) * pitch - FIELD_OF_VIEW / 2
    gy, gx = np.meshgrid(coords, coords, indexing="ij")
    angle = np.deg2rad(rng.uniform(-4, 4))
    tx, ty = rng.uniform(-2, 2, size=2) * _MM
    x = np.cos(angle) * (gx - tx) + np.sin(angle) * (gy - ty)        # part coordinates
    y = -np.sin(angle) * (gx - tx) + np.cos(angle) * (gy - ty)

    half_w, half_h, corner, plate_h = _PLATE
    qx = np.maximum(np.abs(x) - (half_w - corner), 0)
    qy = np.maximum(np.abs(y) - (half_h - corner), 0)
    plate = qx ** 2 + qy ** 2 <= corner ** 2
    cyl_x, cyl_r, cyl_h = _CYLINDER
    bulge = np.sqrt(np.maximum(cyl_r ** 2 - (x - cyl_x) ** 2, 0)) - (cyl_r - cyl_h)
    cylinder = plate & (bulge > 0)
    gap, drop = rng.uniform(0.8, 2.0) * _MM, rng.uniform(1.5, 3.0) * _MM
    rail = (x >= half_w + gap) & (x <= half_w + gap + _RAIL_WIDTH) & (np.abs(y) <= half_h - 2 * _MM)
    height = np.where(plate, plate_h, 0.0)
    height = np.where(cylinder, plate_h + bulge, height)
    height = np.where(rail, plate_h - drop, height)

    image = np.empty((size, size, 3))
    image[:] = _COLOURS["table"]
    image[plate] = _COLOURS["plate"]
    image[cylinder] = _COLOURS["cylinder"]
    x0, x1, y0, y1 = _LABEL
    label = plate & (x >= x0) & (x <= x1) & (y >= y0) & (y <= y1)
    image[label] = _COLOURS["label"]
    image[label & (np.abs(y) < 4 * _MM) & (np.abs(x - (x0 + x1) / 2) < 3 * _MM)] = _COLOURS["ink"]
    image[rail] = _COLOURS["rail"]

    # Nuisances first and the defect last: the same seed renders the same part with or without a defect.
    gain, colour_noise = rng.uniform(0.97, 1.03), rng.normal(0, 3, image.shape)
    tilt_x, tilt_y = rng.uniform(-0.03, 0.03, size=2)
    depth_noise = rng.normal(0, 0.03 * _MM, height.shape)
    dropout = rng.random((size, size)) < 0.003
    mask = np.zeros((size, size), dtype=bool)
    if kind != "good":
        delta, footprint = _defect_geometry(rng, kind, x, y)
        on_part = plate.astype(float)
        height += delta * on_part
        if kind in ("stain", "burn"):
            colour = np.array((150, 80, 30)) if kind == "stain" else np.array((100, 45, 110))   # rust, heat tint
            alpha = (0.9 * footprint * on_part)[..., None]
            image = image * (1 - alpha) + colour * alpha
        mask = (footprint > 0.25) & plate

    image = image * gain + colour_noise
    depth = TABLE_DEPTH + tilt_x * gx + tilt_y * gy - height + depth_noise
    cloud = np.stack([gx, gy, depth], axis=-1).astype(np.float32)
    cloud[dropout] = np.nan
    band = (x >= half_w - 2.5 * _MM) & (x <= half_w + gap + 2.5 * _MM) & (np.abs(y) <= half_h)
    return SyntheticPart(np.clip(image, 0, 255).astype(np.uint8), cloud, mask, kind, band)


def generate_set(n: int, seed: int = 0, defect_fraction: float = 1 / 3, size: int = 224) -> SyntheticSet:
    """``n`` parts, ``round(defect_fraction * n)`` of them defective with the kinds cycled, order shuffled."""
    if n < 1 or not 0.0 <= defect_fraction <= 1.0:
        raise ValueError(f"need n >= 1 and defect_fraction in [0, 1], got n={n}, fraction={defect_fraction}")
    order = list(DEFECT_MODALITY)
    n_defective = round(defect_fraction * n)
    kinds = [order[i % len(order)] for i in range(n_defective)] + ["good"] * (n - n_defective)
    kinds = [kinds[i] for i in np.random.default_rng(seed).permutation(n)]
    parts = [render_part(np.random.default_rng([seed, i]), size, kind) for i, kind in enumerate(kinds)]
    return SyntheticSet(
        images=np.stack([p.image for p in parts]),
        clouds=np.stack([p.cloud for p in parts]),
        masks=np.stack([p.mask for p in parts]),
        labels=np.array([k != "good" for k in kinds], dtype=np.int8),
        kinds=tuple(kinds),
        modalities=tuple("none" if k == "good" else DEFECT_MODALITY[k] for k in kinds),
        gap_bands=np.stack([p.gap_band for p in parts]),
    )


def write_mvtec3d(data: SyntheticSet, root: str | Path) -> Path:
    """Write ``data`` as an MVTec 3D-AD category under ``root`` and return ``root``.

    Layout: ``test/<kind>/rgb/NNN.png``, ``test/<kind>/xyz/NNN.tiff`` (float32 ``[H, W, 3]``, missing points
    written as ``(0, 0, 0)`` like MVTec's) and ``test/<kind>/gt/NNN.png`` (0 / 255; all zero for good parts),
    numbered per kind in set order.
    """
    root = Path(root)
    counters: dict[str, int] = {}
    for image, cloud, mask, kind in zip(data.images, data.clouds, data.masks, data.kinds):
        index = counters.get(kind, 0)
        counters[kind] = index + 1
        folder = root / "test" / kind
        for sub in ("rgb", "xyz", "gt"):
            (folder / sub).mkdir(parents=True, exist_ok=True)
        name = f"{index:03d}"
        cv2.imwrite(str(folder / "rgb" / f"{name}.png"), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
        cv2.imwrite(str(folder / "gt" / f"{name}.png"), mask.astype(np.uint8) * 255)
        tifffile.imwrite(folder / "xyz" / f"{name}.tiff", np.nan_to_num(cloud, nan=0.0), photometric="rgb")
    return root
