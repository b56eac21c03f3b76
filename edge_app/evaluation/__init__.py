"""Offline evaluation: MVTec-style dataset loaders and MuSc-style anomaly-detection metrics."""
from __future__ import annotations

from .datasets import DatasetError, Sample, detect_layout, load_dataset, load_masks, read_image, read_mask
from .metrics import METRIC_KEYS, MetricsError, binary_metrics, compute_metrics, pro_score

__all__ = ["DatasetError", "Sample", "detect_layout", "load_dataset", "load_masks", "read_image", "read_mask",
           "METRIC_KEYS", "MetricsError", "binary_metrics", "compute_metrics", "pro_score"]
