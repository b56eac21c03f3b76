"""The one data type that travels through the pipeline: a part and what happened to it."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from enum import Enum, IntEnum

import numpy as np


# Largest threshold any entry (YAML, current.json, control `apply`) accepts: re-scored scores are about 1 at
# the pool's 90th percentile, so anything near this is a typo or an attempt to accept every part.
MAX_THRESHOLD = 1e6


class Verdict(str, Enum):
    ACCEPT = "ACCEPT"
    REJECT = "REJECT"
    NO_VERDICT = "NO_VERDICT"


class Reason(IntEnum):
    """Why a verdict was given; the integer is what goes over the wire (docs/wire-protocol.md)."""

    OK = 0             # scored, below threshold
    ANOMALY = 1        # scored, at or above threshold
    WARMUP = 2         # pool too small to score yet
    DEADLINE = 3       # scoring would finish after the part's deadline
    OVERLOAD = 4       # queue full: parts arrive faster than the engine scores them
    DECODE_ERROR = 5   # the frame could not be decoded / is truncated / wrong shape
    ENGINE_ERROR = 6   # feature engine or scoring raised
    TEST_FIRE = 7      # technician's test reject of a marked test part
    SCANNER_ERROR = 8  # 3D frame missing, empty, or not aligned with the image

    @property
    def label(self) -> str:
        return self.name.lower()


class FailSafe(str, Enum):
    """What is signalled when no verdict can be given."""

    REJECT = "reject"          # default: the part is rejected
    STOP_LINE = "stop_line"    # reject and raise a line-stop alarm
    PASS_FLAGGED = "pass_flagged"  # accept, but flagged in ledger and counters (non-critical checks only)


@dataclass
class StageTimes:
    """Seconds spent per stage (monotonic clock)."""

    decode: float = 0.0
    features: float = 0.0
    scoring: float = 0.0
    link: float = 0.0
    total: float = 0.0
    wait: float = 0.0      # of total: waiting for look-ahead parts while the worker was free (bounded by the deadline)


@dataclass
class PartRecord:
    """A part from trigger to ledger. Created by a frame source; filled in by each stage."""

    part_id: str
    recipe: str
    capture_time: float                 # UTC epoch seconds at capture
    capture_monotonic: float = field(default_factory=time.monotonic)
    deadline: float | None = None       # monotonic time by which the PLC must have the verdict
    encoder: int | None = None          # encoder count at capture, if the line has one
    image: np.ndarray | None = None     # RGB uint8 [H, W, 3]; None until decoded
    raw: bytes | None = None            # encoded frame as received (PNG/JPEG), if any
    source_ref: str | None = None       # file path / URL the frame came from, for the ledger and archive
    cloud: np.ndarray | None = None     # organised point cloud [H, W, 3] float32, NaN = missing (3D recipes)
    test_part: bool = False             # a marked test part (test-fire)

    verdict: Verdict | None = None
    reason: Reason | None = None
    signalled: Verdict | None = None    # what was sent to the PLC (fail-safe may differ from verdict)
    raw_score: float | None = None
    score: float | None = None          # re-scored, the value compared with the threshold
    threshold: float | None = None
    anomaly_map: np.ndarray | None = None   # 2d: patch-grid map [h, w]; 3d / 2d+3d: pixel map [size, size]
    look_ahead: int = 0                 # later parts it was also scored against (runtime/look_ahead.py)
    detail: str = ""                    # human-readable extra (error message, ...)
    times: StageTimes = field(default_factory=StageTimes)
    seq: int | None = None              # wire sequence number (= ledger row id)
    acked: bool = False

    def decide(self, verdict: Verdict, reason: Reason, detail: str = "") -> "PartRecord":
        self.verdict, self.reason, self.detail = verdict, reason, detail
        return self
