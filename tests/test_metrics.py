"""Metrics on tiny hand-made inputs with known answers, plus a brute-force PRO reference."""
from __future__ import annotations

import cv2
import numpy as np
import pytest
from sklearn.metrics import auc, average_precision_score, precision_recall_curve

from musc_edge.edge.evaluation.metrics import METRIC_KEYS, MetricsError, binary_metrics, compute_metrics, pro_score

IMAGE_CASES = {
    # name: (labels, scores, (auroc, ap, f1max) in percent)
    "perfect": ([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9], (100.0, 100.0, 100.0)),
    "inverted": ([0, 0, 1, 1], [0.9, 0.8, 0.2, 0.1], (0.0, 100 * (1 / 3 + 2 / 4) / 2, 100 * 2 / 3)),
    "one_swap": ([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8], (75.0, 100 * (1 + 2 / 3) / 2, 80.0)),
    "all_tied": ([0, 1, 0, 1], [0.5, 0.5, 0.5, 0.5], (50.0, 50.0, 100 * 2 / 3)),
    "unbalanced": ([0, 0, 0, 1], [0.1, 0.2, 0.9, 0.5], (100 * 2 / 3, 50.0, 100 * 2 / 3)),
}


@pytest.mark.parametrize("name", IMAGE_CASES)
def test_image_metrics_known_answers(name):
    labels, scores, expected = IMAGE_CASES[name]
    result = compute_metrics(np.array(labels), np.array(scores))
    got = (result["image_auroc"], result["image_ap"], result["image_f1max"])
    assert got == pytest.approx(expected, abs=1e-9)
    assert all(result[key] is None for key in ("pixel_auroc", "pixel_ap", "pixel_f1max", "pro"))
    assert tuple(result) == METRIC_KEYS


@pytest.mark.parametrize("seed", range(4))
def test_ap_and_f1_agree_with_sklearn_pr_curve(seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, 400)
    scores = np.round(rng.random(400) + 0.4 * labels, 2)  # rounding creates ties
    _, ap, f1max = binary_metrics(labels, scores)
    precision, recall, _ = precision_recall_curve(labels, scores)
    with np.errstate(invalid="ignore"):
        f1 = 2 * precision * recall / (precision + recall)
    assert ap == pytest.approx(average_precision_score(labels, scores), abs=1e-12)
    assert f1max == pytest.approx(np.nanmax(f1), abs=1e-12)


def _two_regions(big: int = 10, small: int = 2) -> np.ndarray:
    masks = np.zeros((2, 24, 24), dtype=bool)
    masks[0, 2:2 + big, 2:2 + big] = True
    masks[1, 18:18 + small, 18:18 + small] = True
    return masks


def _noise(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0.1, 1.0, shape)


def test_perfect_map_scores_100_everywhere():
    masks = _two_regions()
    result = compute_metrics(np.array([1, 1, 0]), np.array([1.0, 1.0, 0.0]),
                             np.concatenate([masks, np.zeros((1, 24, 24), bool)]),
                             np.concatenate([masks, np.zeros((1, 24, 24), bool)]).astype(float))
    assert [result[k] for k in ("pixel_auroc", "pixel_ap", "pixel_f1max", "pro")] == pytest.approx([100.0] * 4)


def test_constant_map_has_zero_pro_and_chance_auroc():
    masks = _two_regions()
    result = compute_metrics(np.array([1, 0]), np.array([1.0, 0.0]), masks, np.full(masks.shape, 0.7))
    assert result["pro"] == 0.0
    assert result["pixel_auroc"] == pytest.approx(50.0)


def test_map_covering_the_big_region_only_scores_half_pro():
    """PRO averages over regions, not pixels: missing a 4-pixel region costs as much as a 100-pixel one."""
    masks = _two_regions()
    maps = _noise(masks.shape)
    maps[0][masks[0]] = 2.0
    maps[1][masks[1]] = 0.0
    assert pro_score(masks, maps) == pytest.approx(0.5, abs=1e-9)


def test_uninformative_map_pro_is_about_fifteen():
    """With PRO ~ FPR and the FPR axis stretched from [0, 0.3) to [0, 1], the area is ~0.15."""
    masks = np.zeros((8, 64, 64), dtype=bool)
    masks[:, 16:48, 16:48] = True
    assert pro_score(masks, _noise(masks.shape, seed=1)) == pytest.approx(0.15, abs=0.01)


def test_regions_are_8_connected():
    """A 4x4 block touching a 2x2 block at a corner is one region: detecting the block alone gives 16/20."""
    masks = np.zeros((1, 16, 16), dtype=bool)
    masks[0, 2:6, 2:6] = True
    masks[0, 6:8, 6:8] = True
    maps = _noise(masks.shape)
    maps[0, 2:6, 2:6] = 2.0
    maps[0, 6:8, 6:8] = 0.0
    assert pro_score(masks, maps) == pytest.approx(0.8, abs=1e-9)


def _reference_pro(masks: np.ndarray, maps: np.ndarray, steps: int = 200, max_fpr: float = 0.3) -> float:
    """Straight transcription of the MuSc reference loop (threshold x region)."""
    lo, hi = maps.min(), maps.max()
    fprs, pros = [], []
    for k in range(steps):
        predicted = maps > lo + k * ((hi - lo) / steps)  # np.arange(lo, hi, delta), as in MuSc
        overlaps = []
        for image, mask in enumerate(masks):
            n, labels = cv2.connectedComponents(mask.astype(np.uint8), connectivity=8)
            overlaps += [predicted[image][labels == r].mean() for r in range(1, n)]
        pros.append(np.mean(overlaps))
        fprs.append((predicted & ~masks).sum() / (~masks).sum())
    fprs, pros = np.array(fprs), np.array(pros)
    keep = fprs < max_fpr
    x = (fprs[keep] - fprs[keep].min()) / (fprs[keep].max() - fprs[keep].min())
    return float(auc(x, pros[keep]))


@pytest.mark.parametrize("seed, ties", [(0, False), (1, False), (2, True)])
def test_pro_matches_brute_force_reference(seed, ties):
    rng = np.random.default_rng(seed)
    masks = np.zeros((3, 20, 20), dtype=bool)
    for image in range(2):
        for _ in range(3):
            y, x = rng.integers(0, 16, 2)
            masks[image, y:y + rng.integers(1, 5), x:x + rng.integers(1, 5)] = True
    if ties:  # integer maps spanning 0..200: every value sits exactly on a threshold (step 1)
        maps = np.minimum(rng.integers(0, 150, masks.shape) + 60 * masks, 200).astype(float)
        maps[2, 0, :5] = 0.0, 200.0, 199.0, 199.0, 199.0  # ">" vs ">=" changes the lowest-FPR point
    else:
        maps = rng.random(masks.shape) + 0.6 * masks * rng.random(masks.shape)
    assert pro_score(masks, maps) == pytest.approx(_reference_pro(masks, maps), abs=1e-12)


def test_only_one_image_class_is_rejected():
    with pytest.raises(MetricsError, match="only one class"):
        compute_metrics(np.array([1, 1, 1]), np.array([0.1, 0.2, 0.3]))


def test_masks_without_anomalous_pixels_are_rejected():
    masks = np.zeros((2, 8, 8), dtype=bool)
    with pytest.raises(MetricsError, match="masks holds only one class"):
        compute_metrics(np.array([0, 1]), np.array([0.1, 0.9]), masks, np.zeros((2, 8, 8)))
    with pytest.raises(MetricsError, match="no anomalous pixel"):
        pro_score(masks, np.zeros((2, 8, 8)))


@pytest.mark.parametrize("masks, maps, match", [
    (np.ones((2, 8, 8), bool), None, "both masks and maps"),
    (np.ones((2, 8, 8), bool), np.zeros((2, 8, 9)), "same shape"),
    (_two_regions(), np.full((2, 24, 24), np.nan), "NaN"),
])
def test_bad_pixel_inputs_are_rejected(masks, maps, match):
    with pytest.raises(MetricsError, match=match):
        compute_metrics(np.array([0, 1]), np.array([0.1, 0.9]), masks, maps)


@pytest.mark.parametrize("labels, scores, match", [
    ([0, 1, 2], [0.1, 0.2, 0.3], "0 or 1"),
    ([0, 1], [0.1, 0.2, 0.3], "must be 1-D and equal"),
    ([0, 1], [0.1, np.inf], "NaN or infinite"),
])
def test_bad_image_inputs_are_rejected(labels, scores, match):
    with pytest.raises(MetricsError, match=match):
        compute_metrics(np.array(labels), np.array(scores))
