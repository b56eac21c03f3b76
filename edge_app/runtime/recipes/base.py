"""One recipe protocol for 2D, 3D and 2D+3D: identity, prepare, inspect, admit, seed, persist.

A recipe owns one pool (:class:`musc_edge.edge.pool.FeaturePool` for images, :class:`musc_edge.edge.scan_pool.ScanPool`
for scans) and everything that differs between feature kinds: how a decoded part is prepared, how it is
scored against the pool, and how its files are read for seeding. What must be the same for every kind lives
here, once: the verdict rule, the admission policy (accepted parts only, never near-duplicates, warm-up
curation) and seeding. The inspector, the seed command, the control socket's pool operations and stream
evaluation all go through these methods, with no dispatch on the recipe's type.
"""
from __future__ import annotations

import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ...config import RecipeSettings
from ...mediaio import IMAGE_SUFFIXES
from ...pointcloud import CloudError
from ...pool import PoolMembers
from ...record import PartRecord, Reason, Verdict
from ...score import PoolScore
from ...scoring import MuscParams
from ..pool_guard import PoolGuard
from ..verdict import verdict_from_pool

log = logging.getLogger(__name__)


FeatureStage = Callable[[list[np.ndarray]], list[list[np.ndarray]]]
"""RGB images -> each image's aggregated 2D feature sets (``[P, D]`` each), in one engine call."""


@dataclass(frozen=True)
class Scoring:
    """What every recipe of a line shares: the feature stage and the scoring settings."""

    features: FeatureStage
    grid: tuple[int, int]        # patch grid of the feature model
    params: MuscParams
    image_size: int              # model.size: side of the image (and of a scan's grid)
    model_identity: dict         # what a stored pool must have been built with (feature model, aggregation)
    frame_map: Callable[[np.ndarray], np.ndarray] = lambda patch_map: patch_map   # scored map -> frame's geometry
    scorer: str = "numpy"        # one-vs-pool MSM backend of 2D pools (scoring.backend; see scoring/onnx_msm.py)


class Recipe(ABC):
    """A recipe of the line: its pool, threshold and the stages a part goes through."""

    modality: str
    pool: PoolMembers

    def __init__(self, name: str, settings: RecipeSettings, scoring: Scoring):
        self.name, self.settings, self.scoring = name, settings, scoring
        self.threshold = settings.threshold
        self.rejected_duplicates = 0
        self.near_duplicate_distance = settings.pool.near_duplicate_distance
        if self.near_duplicate_distance is None:
            self.near_duplicate_distance = self.default_near_duplicate_distance(settings)
        self.guard = PoolGuard(settings.guard)

    @staticmethod
    def default_near_duplicate_distance(settings: RecipeSettings) -> float:
        """Below this mean nearest-patch distance to a member a part is the same part seen again: a noisy
        re-capture of one real part measures about 0.01 (0.04-0.07 shifted by a few pixels), different synthetic
        scans on the whole frame 0.09 and more. Different real bottles measure 0.08-0.12, so this refuses about
        40 % of them: the pool fills more slowly, with no measurable cost (line AUROC 99.40 against 99.44 at 0.05,
        4 orders; KolektorSDD 86.63 against 86.51)."""
        return 0.1

    # -- identity & persistence ----------------------------------------------------------------------------
    def identity(self) -> dict:
        """What a stored pool of this recipe must have been built with to be reusable."""
        return dict(self.scoring.model_identity)

    def state(self) -> dict[str, np.ndarray]:
        """The pool's arrays to persist (see :mod:`musc_edge.edge.runtime.pool_store`)."""
        return self.pool.state()

    def load_state(self, state: dict[str, np.ndarray]) -> None:
        self.pool.load_state(state)

    # -- what differs per feature kind ---------------------------------------------------------------------
    @abstractmethod
    def prepare(self, part: PartRecord) -> Any:
        """A decoded part's scoring inputs (an object with ``sets``, ``feature`` and ``nearest``). Raises
        :class:`~musc_edge.edge.pointcloud.CloudError` for an unusable scan, anything else for an engine failure."""

    @abstractmethod
    def score(self, prepared: Any, part_id: str | None = None, look_ahead: Sequence[Any] = ()) -> PoolScore:
        """One-vs-pool score of a prepared part, excluding members with its own ``part_id``; ``look_ahead``
        (prepared parts that arrived after it) are extra references. The pool's own :class:`PoolScore`, its map
        on the frame's geometry. Raises
        :class:`~musc_edge.edge.scoring.PoolTooSmallError` while the pool is warming up."""

    @abstractmethod
    def read_seed(self, folder: str | Path, progress: bool = False) -> list[tuple[PartRecord, Any]]:
        """Read and prepare the recent captures under ``folder`` for :meth:`seed`. Touches no pool, so a
        reseed fails before anything changes; raises naming the file that cannot be used."""

    @abstractmethod
    def _nearest(self, prepared: Any) -> float:
        """Distance of a prepared part to its closest member (the near-duplicate measure)."""

    @abstractmethod
    def _store(self, part_id: str, prepared: Any, raw_score: float, now: float) -> int | None:
        """Add a member; its slot, or None when the pool declined it."""

    # -- the stages every kind shares ----------------------------------------------------------------------
    def inspect(self, part: PartRecord) -> tuple[PartRecord, Any | None]:
        """Fill a decoded ``part``'s verdict, reason, scores, map and stage times. Never raises for a bad
        part: an unusable scan is SCANNER_ERROR, a failing engine or scorer ENGINE_ERROR, a pool still
        warming up WARMUP."""
        prepared = self.extract(part)
        return (part, None) if prepared is None else self.decide(part, prepared)

    def extract(self, part: PartRecord) -> Any | None:
        """A decoded part's prepared inputs (the stage the line runs one part ahead of scoring); None, with
        the part's NO_VERDICT decided, when it cannot be prepared."""
        t0 = time.monotonic()
        try:
            prepared = self.prepare(part)
        except CloudError as exc:
            part.times.features = time.monotonic() - t0
            part.decide(Verdict.NO_VERDICT, Reason.SCANNER_ERROR, str(exc))
            return None
        except Exception as exc:  # the engine must never take the line down with it
            log.exception("feature stage failed on part %s", part.part_id)
            part.times.features = time.monotonic() - t0
            part.decide(Verdict.NO_VERDICT, Reason.ENGINE_ERROR, f"{type(exc).__name__}: {exc}")
            return None
        part.times.features = time.monotonic() - t0
        return prepared

    def decide(self, part: PartRecord, prepared: Any, look_ahead: Sequence[Any] = ()) -> tuple[PartRecord, Any | None]:
        """Score a prepared part against the pool (and the later parts in ``look_ahead``) and turn the score
        into its verdict."""
        part, prepared, result = verdict_from_pool(part, prepared, self.threshold,
                                                   lambda: self.score(prepared, part.part_id, look_ahead))
        if result is not None:
            part.anomaly_map, prepared.nearest = result.map, result.nearest
        return part, prepared

    def admit(self, part: PartRecord, prepared: Any | None, now: float | None = None) -> bool:
        """Pool admission after a verdict: accepted parts (or all, by config), never test parts, never
        near-duplicates of a member, never what the guard refuses (a look-alike of a recent reject, a score
        above the pool's range: :meth:`PoolGuard.admission_ceiling`). During warm-up every decodable part is
        admitted; when the pool reaches its minimum size the members are scored among themselves and outliers
        dropped (:meth:`curate`)."""
        if prepared is None:
            return False
        settings = self.settings.pool
        warming = part.reason == Reason.WARMUP
        if not warming and settings.admit == "accepted" and part.verdict != Verdict.ACCEPT:
            return False
        if part.test_part:
            return False
        nearest = prepared.nearest if prepared.nearest is not None else self._nearest(prepared)
        if nearest < self.near_duplicate_distance:
            self.rejected_duplicates += 1
            return False
        if not self.guard.allow_admission(part, prepared, pool_fill=self.pool.size / self.pool.capacity):
            return False
        slot = self._store(part.part_id, prepared, part.raw_score or 0.0, time.time() if now is None else now)
        if slot is not None and warming and self.pool.size == self.pool.min_size:  # the pool has just become ready
            self.curate(live=not getattr(self, "_seeding", False))  # defective warm-up parts out; warm-up goes on
        return slot is not None

    def curate(self, live: bool = False) -> None:
        """Score the members among themselves (each gets a raw score and a re-scoring feature computed the
        same way) and drop outliers (MuSc-V2's warm-up pool should hold no defective part), then re-score.
        ``live``: the pool filled with the line's own warm-up parts (not a technician's seed folder), so a
        defect repeated among them is kept out too (:meth:`PoolGuard.keep_out_recurring`)."""
        pool, grid, params = self.pool, self.scoring.grid, self.scoring.params
        pool.rescore_members(grid, params)
        recurring = self.guard.keep_out_recurring(pool) if live else 0
        if (pool.drop_outliers() or recurring) and pool.size >= 2:
            pool.rescore_members(grid, params)

    def seed(self, parts: Sequence[tuple[PartRecord, Any]], replace: bool = False) -> int:
        """Admit prepared recent captures (from :meth:`read_seed`) as warm-up members, near-duplicates
        skipped, then :meth:`curate`. With ``replace`` the non-golden members go first. Returns the pool
        size; the pool keeps at most its capacity (the last parts win)."""
        if replace:
            self.pool.remove(np.flatnonzero(~self.pool.golden[:self.pool.size]))
        self._seeding = True   # a technician chose these captures: curated, not searched for a recurring defect
        try:
            for part, prepared in parts:
                part.decide(Verdict.NO_VERDICT, Reason.WARMUP, "seed")
                self.admit(part, prepared)
        finally:
            self._seeding = False
        if self.pool.size >= 2:
            self.curate()
        return self.pool.size

    def seed_folder(self, folder: str | Path, progress: bool = False) -> int:
        """:meth:`read_seed` then :meth:`seed`: fill the pool from a folder of recent unlabeled captures."""
        return self.seed(self.read_seed(folder, progress))


def image_files(folder: str | Path) -> list[Path]:
    """The images under ``folder``, sorted; FileNotFoundError for a missing folder or one without images."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"seed folder not found: {folder}")
    paths = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise FileNotFoundError(f"no images ({'/'.join(IMAGE_SUFFIXES)}) under {folder}")
    return paths
