"""Aspect-preserving model input: plan square model windows over an image, and map patch maps back.

A ViT takes ``size x size`` inputs. Squeezing a 1:2.5 image into a square thins a vertical crack 2.5 times
along one axis; instead the image is resized *keeping its aspect* and covered by square windows:

``tile``   the short side becomes ``size`` and windows tile the long side (overlapping evenly when it is not
           a multiple of ``size``): every pixel keeps the same scale on both axes.
``pad``    the long side becomes ``size`` and the short side is padded (letterbox): one window, coarser.
``squash`` the old square resize (distorts the aspect; kept for comparison).

Images within ``max_stretch`` of square are squashed in every mode (a 5 % stretch costs less than a second
window). Images smaller than ``size`` are upsampled so their short side fills the window: ViT patches are
``patch`` pixels wide, and a 100 px crop at its own scale would give a handful of patches. ``max_tiles``
bounds the cost of very long images: beyond it the image is scaled down and padded across.

Window origins and the scaled image are multiples of the patch size, so every window's patch grid lies on
one common patch grid of the scaled image: :func:`stitch` averages the windows' patch maps on that grid
(where windows overlap) and :func:`to_image` brings it back to the original pixel geometry. Pure functions.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

from .scoring.maps import upsample

FITS = ("tile", "pad", "squash")
DEFAULT_MAX_STRETCH = 1.15
DEFAULT_MAX_TILES = 8


@dataclass(frozen=True)
class InputPlan:
    """How an image of shape ``source`` becomes ``len(origins)`` model windows of ``size x size``."""

    source: tuple[int, int]                     # (H, W) of the image
    scaled: tuple[int, int]                     # (H', W') it is resized to, multiples of ``patch``
    size: int                                   # model input side
    patch: int                                  # model patch side
    origins: tuple[tuple[int, int], ...]        # (y, x) of each window in the scaled image (< 0: padded)

    @property
    def n_windows(self) -> int:
        return len(self.origins)

    @property
    def window_grid(self) -> tuple[int, int]:
        """Patch grid of one window."""
        return self.size // self.patch, self.size // self.patch

    @property
    def grid(self) -> tuple[int, int]:
        """Patch grid of the whole scaled image (what :func:`stitch` returns)."""
        return self.scaled[0] // self.patch, self.scaled[1] // self.patch

    @property
    def stacked_grid(self) -> tuple[int, int]:
        """The windows' patch grids stacked vertically: the grid of one sample's concatenated patches."""
        t = self.size // self.patch
        return t * self.n_windows, t


def _snap(length: float, patch: int) -> int:
    return max(patch, int(round(length / patch)) * patch)


def _origins(scaled: int, size: int, patch: int) -> list[int]:
    """Window starts along one axis: centred (padded) when the axis is short, else evenly spread."""
    if scaled <= size:
        return [-((size - scaled) // patch // 2) * patch]
    n = math.ceil(scaled / size)
    steps = (scaled - size) // patch
    return [int(round(i * steps / (n - 1))) * patch for i in range(n)]


def plan_input(shape: tuple[int, int], size: int, patch: int, fit: str = "tile",
               max_stretch: float = DEFAULT_MAX_STRETCH, max_tiles: int = DEFAULT_MAX_TILES) -> InputPlan:
    """The windows that cover an image of ``shape`` (H, W) at model input ``size`` (see the module doc)."""
    h, w = int(shape[0]), int(shape[1])
    if h < 1 or w < 1:
        raise ValueError(f"image shape must be positive, got {shape}")
    if size % patch:
        raise ValueError(f"input size {size} is not a multiple of the patch size {patch}")
    if fit not in FITS:
        raise ValueError(f"unknown fit {fit!r}: expected one of {FITS}")
    if max_tiles < 1:
        raise ValueError(f"max_tiles must be >= 1, got {max_tiles}")
    if fit == "squash" or max(h, w) <= max_stretch * min(h, w):
        return InputPlan((h, w), (size, size), size, patch, ((0, 0),))
    if fit == "pad":
        scale = size / max(h, w)
    else:
        scale = min(size / min(h, w), max_tiles * size / max(h, w))
    cap = max_tiles * size   # rounding to the patch grid must not add a window
    scaled = (min(_snap(h * scale, patch), cap), min(_snap(w * scale, patch), cap))
    ys, xs = _origins(scaled[0], size, patch), _origins(scaled[1], size, patch)
    return InputPlan((h, w), scaled, size, patch, tuple((y, x) for y in ys for x in xs))


def plan_for(shapes: list[tuple[int, int]], size: int, patch: int, fit: str = "tile",
             max_stretch: float = DEFAULT_MAX_STRETCH, max_tiles: int = DEFAULT_MAX_TILES) -> InputPlan:
    """One plan for a set of images (a category, a recipe), from their median shape.

    Mutual scoring needs the same number of patches per image; crops of varying size (e.g. 100-600 px)
    are each resized to this plan's scaled shape, which changes their aspect only by their spread.
    """
    if not shapes:
        raise ValueError("no image shapes to plan for")
    arr = np.asarray(shapes, dtype=float)
    return plan_input((int(np.median(arr[:, 0])), int(np.median(arr[:, 1]))), size, patch, fit,
                      max_stretch, max_tiles)


def windows(image: np.ndarray, plan: InputPlan, interpolation: int = cv2.INTER_CUBIC) -> list[np.ndarray]:
    """The ``size x size`` windows of ``image`` ([H, W] or [H, W, C]) under ``plan``.

    Any image shape is accepted (it is resized to ``plan.scaled``); padding mirrors the image
    (no artificial edge for the model to find anomalous).
    """
    sh, sw = plan.scaled
    if image.shape[:2] != (sh, sw):
        image = cv2.resize(image, (sw, sh), interpolation=interpolation)
    size = plan.size
    top = max(0, -min(y for y, _ in plan.origins))
    left = max(0, -min(x for _, x in plan.origins))
    if top or left:
        image = cv2.copyMakeBorder(image, top, top, left, left, cv2.BORDER_REFLECT_101)
    return [np.ascontiguousarray(image[y + top:y + top + size, x + left:x + left + size])
            for y, x in plan.origins]


def stitch(window_maps: np.ndarray, plan: InputPlan) -> np.ndarray:
    """``[..., n_windows, t, t]`` window patch maps -> ``[..., gh, gw]`` map of the scaled image.

    Overlapping windows are averaged; padded cells (outside the scaled image) are dropped.
    """
    t = plan.size // plan.patch
    if window_maps.shape[-3:] != (plan.n_windows, t, t):
        raise ValueError(f"expected window maps [..., {plan.n_windows}, {t}, {t}], got {window_maps.shape}")
    gh, gw = plan.grid
    lead = window_maps.shape[:-3]
    total = np.zeros((*lead, gh, gw), np.float32)
    count = np.zeros((gh, gw), np.float32)
    for k, (y, x) in enumerate(plan.origins):
        py, px = y // plan.patch, x // plan.patch
        y0, x0 = max(py, 0), max(px, 0)
        y1, x1 = min(py + t, gh), min(px + t, gw)
        total[..., y0:y1, x0:x1] += window_maps[..., k, y0 - py:y1 - py, x0 - px:x1 - px]
        count[y0:y1, x0:x1] += 1
    return total / np.maximum(count, 1)


def to_image(grid_maps: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """``[..., gh, gw]`` patch maps of the scaled image -> ``[..., H, W]`` (bilinear, corners aligned)."""
    return upsample(grid_maps, (int(shape[0]), int(shape[1])))
