"""Heat-map overlays that a technician can read at a glance."""
from __future__ import annotations

import cv2
import numpy as np

from .scoring.maps import upsample


def render_overlay(image: np.ndarray, anomaly_map: np.ndarray, vmin: float | None = None,
                   vmax: float | None = None, alpha: float = 0.45, caption: str | None = None) -> np.ndarray:
    """RGB uint8 image with the anomaly map (any resolution) blended on top as a jet heat map.

    ``vmin``/``vmax`` fix the colour scale (use the same scale for every part of a run so colours compare);
    by default the map's own range is used.
    """
    h, w = image.shape[:2]
    heat = anomaly_map if anomaly_map.shape == (h, w) else upsample(anomaly_map, (h, w))
    lo = float(np.min(heat)) if vmin is None else vmin
    hi = float(np.max(heat)) if vmax is None else vmax
    scaled = np.clip((heat - lo) / (hi - lo if hi > lo else 1.0), 0.0, 1.0)
    colour = cv2.applyColorMap((scaled * 255).astype(np.uint8), cv2.COLORMAP_JET)[..., ::-1]
    out = cv2.addWeighted(image.astype(np.uint8), 1.0 - alpha, colour, alpha, 0.0)
    if caption:  # white on a dark banner: readable on any heat-map colour, one text call
        scale = max(0.4, w / 900)
        banner = int(30 * scale)
        out[:banner] = (out[:banner] * 0.35).astype(np.uint8)
        cv2.putText(out, caption, (6, int(21 * scale)), cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255),
                    max(1, int(round(scale))), cv2.LINE_AA)
    return out


def side_by_side(image: np.ndarray, overlay: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """[image | overlay | ground-truth contour] panel for reports."""
    panels = [image, overlay]
    if mask is not None:
        outlined = image.copy()
        m = cv2.resize(mask.astype(np.uint8), (image.shape[1], image.shape[0]), interpolation=cv2.INTER_NEAREST)
        contours, _ = cv2.findContours(m, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(outlined, contours, -1, (255, 0, 0), max(1, image.shape[1] // 300))
        panels.append(outlined)
    return np.concatenate(panels, axis=1)
