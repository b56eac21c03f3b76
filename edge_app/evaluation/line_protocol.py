"""``musc-edge eval --mode line``: a category scored the way a line would meet it.

The category's good reference images (``train/good``) are mixed into its test images, defective ones thinned
to ``--defect-rate`` if asked, all in one seeded order, and streamed through the line's own recipe (pool,
admission, guard, look-ahead): see :mod:`.stream`. The line gives the parts that arrive while its pool warms up
no verdict; here they are scored once the pool is ready, against it, as a seeded line's first parts would be.
The batch figure on the same images goes in the same report, and each image's result in a CSV
(:func:`write_scores`), with its verdict at the label-free threshold a technician's first calibration would
set (the stream's own scores, no labels: ``musc-calibrate threshold suggest``).
"""
from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ...calibration.thresholds import ThresholdError, fit_threshold
from ..errors import UsageError
from .datasets import Sample, load_dataset

# The first calibration's target: 1 % of good parts rejected (docs/calibration.md).
TARGET_FALSE_REJECTS = 0.01
CSV_COLUMNS = ("image", "label", "defect_type", "split", "score", "verdict", "refs", "warmup")


def line_samples(folder: Path, defect_rate: float | None = None, seed: int = 0) -> list[Sample]:
    """The category's test images and its ``train/good`` ones (where it has them); with ``defect_rate``,
    defective images dropped at random (seeded) until they are that share of the stream."""
    samples = load_dataset(folder, include_train=(Path(folder) / "train" / "good").is_dir())
    if defect_rate is None:
        return samples
    if not 0 < defect_rate < 1:
        raise UsageError(f"--defect-rate must be in (0, 1), e.g. 0.1 for 10 %; got {defect_rate}")
    good = [s for s in samples if s.label == 0]
    bad = [s for s in samples if s.label == 1]
    keep = min(len(bad), int(round(defect_rate * len(good) / (1 - defect_rate))))
    if keep < 1:
        raise UsageError(f"--defect-rate {defect_rate} leaves no defective image among {len(good)} good ones")
    picked = np.sort(np.random.default_rng(seed).choice(len(bad), keep, replace=False))
    return good + [bad[i] for i in picked]


@dataclass(frozen=True)
class LabelFree:
    """The verdicts a first label-free calibration would give the stream."""

    threshold: float | None
    good_rejected: float | None      # share of good images at or above it
    defects_rejected: float | None   # share of defective images at or above it
    problem: str = ""                # why no threshold could be fitted


def label_free(scores: np.ndarray, labels: np.ndarray, target: float = TARGET_FALSE_REJECTS) -> LabelFree:
    """Fit the label-free threshold for ``target`` false rejects on the unlabeled ``scores`` and measure it
    against the ``labels`` (which the fit never sees)."""
    try:
        threshold = fit_threshold(np.asarray(scores, np.float64), target).threshold
    except ThresholdError as exc:
        return LabelFree(None, None, None, str(exc))
    rejected = np.asarray(scores) >= threshold
    share = lambda mask: float(rejected[mask].mean()) if mask.any() else None  # noqa: E731
    return LabelFree(float(threshold), share(labels == 0), share(labels == 1))


def write_scores(path: Path, samples: Sequence[Sample], scores: np.ndarray, threshold: float | None,
                 refs: np.ndarray, warmup: np.ndarray) -> None:
    """One row per image: path, label, defect type, split, score, verdict at ``threshold``, how many references it
    was scored against (pool members and look-ahead parts) and whether it arrived during warm-up."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(CSV_COLUMNS)
        for sample, score, n_refs, warm in zip(samples, scores, refs, warmup):
            verdict = "" if threshold is None else ("REJECT" if score >= threshold else "ACCEPT")
            writer.writerow([str(sample.path), sample.label, sample.defect_type, sample.split, f"{score:.6f}",
                             verdict, int(n_refs), int(bool(warm))])
