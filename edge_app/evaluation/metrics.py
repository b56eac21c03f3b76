"""Anomaly-detection metrics as reported by MuSc / MuSc-V2 (their code's ``utils/metrics.py``).

Image level: AUROC, AP and F1-max of one score per image. Pixel level: the same three over every pixel of
every image, plus PRO (area under the per-region-overlap curve up to FPR 0.3, FPR axis rescaled to [0, 1]).
The ROC curve comes from scikit-learn (precision follows from its counts); PRO is a histogram formulation that touches each pixel once.
"""
from __future__ import annotations

import cv2
import numpy as np
from sklearn.metrics import auc, roc_curve

PRO_STEPS = 200
PRO_MAX_FPR = 0.3
METRIC_KEYS = ("image_auroc", "image_ap", "image_f1max", "pixel_auroc", "pixel_ap", "pixel_f1max", "pro")


class MetricsError(ValueError):
    """The inputs cannot be scored (shape mismatch, non-finite values, a single class)."""


def _require_finite(values: np.ndarray, name: str) -> None:
    if not np.isfinite(values).all():
        raise MetricsError(f"{name} contains NaN or infinite values")


def _require_both_classes(truth: np.ndarray, name: str) -> None:
    positives = int(np.count_nonzero(truth))
    if positives == 0 or positives == truth.size:
        kind = "anomalous" if positives else "normal"
        raise MetricsError(f"{name} holds only one class (all {kind}); AUROC/AP/F1 need both normal and anomalous")


def binary_metrics(truth: np.ndarray, scores: np.ndarray, name: str = "truth") -> tuple[float, float, float]:
    """AUROC, average precision and F1-max (all in [0, 1]) of ``scores`` against boolean ``truth``.

    One full ROC curve (every distinct threshold) gives all three, so large pixel sets are sorted once:
    precision = TP / (TP + FP) at each threshold, AP is the step-wise sum of precision over recall increments
    (the value of ``sklearn.metrics.average_precision_score``) and F1-max the best F1 over the thresholds.
    ``truth`` must hold both classes; ``name`` labels it in the error otherwise.
    """
    truth = np.asarray(truth, dtype=bool).ravel()
    _require_both_classes(truth, name)
    fpr, tpr, _ = roc_curve(truth, np.asarray(scores).ravel(), drop_intermediate=False)
    n_pos = int(np.count_nonzero(truth))
    true_pos = tpr[1:] * n_pos                      # point 0 is the "nothing predicted" corner
    predicted = true_pos + fpr[1:] * (truth.size - n_pos)
    precision = true_pos / predicted                # predicted >= 1 past the corner
    average_precision = float(np.sum(np.diff(tpr) * precision))
    f1 = 2.0 * precision * tpr[1:] / np.maximum(precision + tpr[1:], np.finfo(float).tiny)
    return float(auc(fpr, tpr)), average_precision, float(f1.max())


def pro_score(masks: np.ndarray, maps: np.ndarray, steps: int = PRO_STEPS, max_fpr: float = PRO_MAX_FPR) -> float:
    """Normalised area under the PRO curve up to ``max_fpr``, in [0, 1].

    ``steps`` thresholds ``min + k * (max - min) / steps`` (k = 0..steps-1) over all maps; a pixel is
    predicted anomalous when its value exceeds the threshold. Regions are the 8-connected components of each
    mask; PRO at a threshold is the mean detected fraction over all regions. Points with FPR < ``max_fpr`` are
    kept and their FPRs min-max rescaled to [0, 1] before the trapezoidal area, as in the MuSc reference.
    When every kept point has the same FPR the curve collapses to one abscissa and the best PRO there is
    returned (a perfect map gives 1, a constant map 0); no point below ``max_fpr`` gives 0.
    """
    masks, maps = _check_pixel_inputs(masks, maps)
    lo, hi = float(maps.min()), float(maps.max())
    thresholds = lo + (hi - lo) / steps * np.arange(steps)
    normal_hist = np.zeros(steps + 1, dtype=np.int64)
    region_hists: list[np.ndarray] = []
    for mask, amap in zip(masks, maps):
        # levels[i] = number of thresholds strictly below the pixel value = thresholds at which it is positive
        levels = np.searchsorted(thresholds, amap, side="left")
        normal_hist += np.bincount(levels[~mask], minlength=steps + 1)
        if not mask.any():
            continue
        n_labels, regions = cv2.connectedComponents(mask.view(np.uint8), connectivity=8)
        flat = regions[mask].astype(np.int64) - 1
        hist = np.bincount(flat * (steps + 1) + levels[mask], minlength=(n_labels - 1) * (steps + 1))
        region_hists.append(hist.reshape(n_labels - 1, steps + 1))
    if not region_hists:
        raise MetricsError("masks contain no anomalous pixel: PRO needs at least one ground-truth region")
    n_normal = int(normal_hist.sum())
    if n_normal == 0:
        raise MetricsError("masks contain no normal pixel: PRO needs false-positive rates")
    per_region = np.concatenate(region_hists)
    areas = per_region.sum(axis=1, keepdims=True)
    detected = areas - np.cumsum(per_region, axis=1)[:, :steps]
    pro = (detected / areas).mean(axis=0)
    fpr = (n_normal - np.cumsum(normal_hist)[:steps]) / n_normal
    keep = fpr < max_fpr
    if not keep.any():
        return 0.0
    fpr, pro = fpr[keep], pro[keep]
    span = fpr.max() - fpr.min()
    if span == 0:
        return float(pro.max())
    return float(auc((fpr - fpr.min()) / span, pro))


def _check_pixel_inputs(masks: np.ndarray, maps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    masks = np.asarray(masks)
    maps = np.asarray(maps)
    if masks.ndim != 3 or masks.shape != maps.shape:
        raise MetricsError(f"masks {masks.shape} and maps {maps.shape} must both be [N, H, W] of the same shape")
    _require_finite(maps, "maps")
    return np.ascontiguousarray(masks.astype(bool, copy=False)), maps


def compute_metrics(labels: np.ndarray, image_scores: np.ndarray, masks: np.ndarray | None = None,
                    maps: np.ndarray | None = None) -> dict[str, float | None]:
    """All metrics of one category, **in percent**, under the keys of ``METRIC_KEYS``.

    ``labels`` [N] are 0 (good) / 1 (anomalous), ``image_scores`` [N]; optional ``masks`` [N, H, W] (bool or
    0/1) and ``maps`` [N, H, W] give the pixel metrics and PRO, which are None when they are not given.
    """
    labels = np.asarray(labels)
    image_scores = np.asarray(image_scores, dtype=np.float64)
    if labels.ndim != 1 or labels.shape != image_scores.shape:
        raise MetricsError(f"labels {labels.shape} and image_scores {image_scores.shape} must be 1-D and equal")
    if not np.isin(labels, (0, 1)).all():
        raise MetricsError(f"labels must be 0 or 1, got values {np.unique(labels).tolist()}")
    _require_finite(image_scores, "image_scores")
    image = binary_metrics(labels, image_scores, "labels")
    result: dict[str, float | None] = dict(zip(METRIC_KEYS[:3], (100.0 * v for v in image)))
    if masks is None and maps is None:
        result.update(dict.fromkeys(METRIC_KEYS[3:]))
        return result
    if masks is None or maps is None:
        raise MetricsError("pixel metrics need both masks and maps; got only one of them")
    masks, maps = _check_pixel_inputs(masks, maps)
    if masks.shape[0] != labels.shape[0]:
        raise MetricsError(f"{masks.shape[0]} masks/maps for {labels.shape[0]} labels")
    pixel = binary_metrics(masks, maps, "masks")
    result.update(zip(METRIC_KEYS[3:6], (100.0 * v for v in pixel)))
    result["pro"] = 100.0 * pro_score(masks, maps)
    return result
