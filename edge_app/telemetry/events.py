"""The small JSON events published per part and per alarm (no images, no maps)."""
from __future__ import annotations

import time
from typing import Any

from musc_edge.edge.record import PartRecord

STAGES = ("decode", "features", "scoring", "link", "total")


def part_event(part: PartRecord, line: str, calibration_version: str) -> dict[str, Any]:
    """One part as the plant sees it: identity, verdict, score, timing in milliseconds."""
    return {
        "kind": "part", "line": line, "seq": part.seq, "part_id": part.part_id, "recipe": part.recipe,
        "capture_time": part.capture_time,
        "verdict": part.verdict.value if part.verdict is not None else None,
        "signalled": part.signalled.value if part.signalled is not None else None,
        "reason": part.reason.label if part.reason is not None else None,
        "score": _rounded(part.score), "threshold": _rounded(part.threshold), "acked": part.acked,
        "test_part": part.test_part, "calibration_version": calibration_version,
        "latency_ms": {stage: _rounded(getattr(part.times, stage, None), 1000.0) for stage in STAGES},
    }


def alarm_event(text: str, line: str) -> dict[str, Any]:
    return {"kind": "alarm", "line": line, "text": text, "time": time.time()}


def _rounded(value: float | None, scale: float = 1.0) -> float | None:
    return None if value is None else round(float(value) * scale, 3)
