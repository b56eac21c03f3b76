"""How ``musc-calibrate`` shows things: percentages, ages, histograms, setting changes, JSON."""
from __future__ import annotations

import json
from dataclasses import asdict

import numpy as np


def pct(value: float) -> str:
    return f"{100 * value:6.2f} %"


def age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    for unit, size in (("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f} {unit}"
    return f"{seconds:.0f} s"


def histogram(scores: np.ndarray, threshold: float, bins: int = 10, width: int = 40) -> list[str]:
    """A terminal histogram of ``scores`` with the threshold's bin marked; the top 2 % of scores beyond the
    threshold share one overflow line so a few extreme parts do not squash the rest."""
    scores = np.asarray(scores, np.float64)
    lo = min(float(scores.min()), threshold)
    hi = max(float(np.quantile(scores, 0.98)), threshold)
    if hi <= lo:
        hi = lo + 1e-6
    edges = np.linspace(lo, hi, bins + 1)
    counts = np.histogram(np.minimum(scores, hi), edges)[0]
    overflow = int(np.count_nonzero(scores > hi))
    counts[-1] -= overflow
    mark = min(int(np.searchsorted(edges, threshold, side="right")) - 1, bins - 1)
    top = max(int(counts.max()), overflow, 1)
    lines = [f"  {edges[i]:9.4f} .. {edges[i + 1]:9.4f} |{'#' * round(width * c / top):<{width}}| {c:>5}"
             + ("  <- threshold" if i == mark else "") for i, c in enumerate(counts)]
    if overflow:
        lines.append(f"  {'above':>9}    {hi:9.4f} |{'#' * round(width * overflow / top):<{width}}| {overflow:>5}")
    return lines


def _flatten(value, prefix: str = "") -> dict[str, object]:
    if isinstance(value, dict):
        out: dict[str, object] = {}
        for key, item in value.items():
            out.update(_flatten(item, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: value}


def describe_change(old: dict | None, new: dict) -> list[str]:
    """``key: old -> new`` for every setting that differs (version and file hashes left out)."""
    before, after = _flatten(old or {}), _flatten(new)
    keys = [k for k in dict.fromkeys([*before, *after]) if k not in ("version", "file_sha256")]
    def shown(value) -> str:
        return f"{value:.6g}" if isinstance(value, float) else str(value)
    return [f"{k}: {shown(before.get(k, '-'))} -> {shown(after.get(k, '-'))}" for k in keys
            if before.get(k) != after.get(k)]


def print_json(value) -> None:
    print(json.dumps(value, indent=2, default=lambda o: asdict(o) if hasattr(o, "__dataclass_fields__") else str(o)))


# -- status ----------------------------------------------------------------------------------------------------
