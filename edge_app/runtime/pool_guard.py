"""Pool guard: a recurring defect must not become normal.

MuSc scores a part against recent parts, so a defect that repeats (the same scratch from a damaged guide
rail on every third part) can leak into the pool and teach it that the scratch is normal: once a few
look-alikes are members, the next one finds its twins among the references and is accepted. The first
look-alikes are still rejected, and they carry the signal that moves first: *rejects that look like each
other at the same place, closer to each other than to anything in the pool*. Random defects differ in
look and place; a recurring one repeats both. (Good parts rejected near a low threshold also share places
-- a reflection, a seam -- but their patches are as far from each other as from the pool.)

Each scored part gets a :class:`Signature`: the positions, feature vectors and anomaly (map values) of its
most anomalous patches. Two signatures look alike when a patch of each lies within ``reach`` patches of
the other, at feature distance <= ``lookalike_distance`` and <= ``lookalike_ratio`` x the smaller anomaly
of the two parts. The guard keeps the signatures of recent rejects and

- refuses pool admission to an accepted part that looks like a recent reject (a look-alike that slipped
  under the threshold must not become a reference),
- refuses pool admission to an accepted part scoring at or above ``admit_below`` on the pool's own scale
  (1.0 = the members' 90th percentile): with a calibrated threshold well above 1, atypical parts would
  otherwise enter, stretch the pool's score range and so lower every score -- the recurring defect's
  included, until it passes with no look-alike in the pool at all,
- refuses it, once the pool holds half its capacity (:data:`SETTLED_FILL`), at or above ``settled_admit_below``
  (0.5: the members' middle). A line does not know which accepted parts are good; a part in the lower half of
  the pool's range almost always is. A young pool takes every accepted part, since it needs references more
  than purity (a scan line's 54 parts: -0.9 AUROC with the gate from the first part); a grown one keeps its
  cleanest, so a defect accepted below the threshold does not become a reference (KolektorSDD's line, 46 %
  defective parts: members 42 % defective without the gate; AUROC 86.6 -> 88.8, docs/benchmarks.md), and
- raises a drift alarm when ``alarm_rejects`` rejects within the last ``window`` parts each look like at
  least ``min_partners`` others (a recurring defect), naming where it is and the reject rate; it says so
  again when the alarm clears.

A recurring defect that is there *from the first part* gives none of these signals: during warm-up every
decodable part is admitted and nothing is rejected, so its look-alikes fill the pool before the first
verdict and find their twins there ever after. So when a warm-up pool becomes ready the guard also looks at
the members themselves (:meth:`PoolGuard.keep_out_recurring`): a member with a patch that is far from
*most* other members yet close to a few (:func:`twin_gaps`) is a suspect; suspects whose such patches sit
at the same place are a recurring defect. They leave the pool, their
signatures are kept as rejects (so their look-alikes stay out and the ordinary alarm can follow), and the
alarm is raised at the next part.

Pure bookkeeping on numpy arrays, no I/O: the inspector calls :meth:`PoolGuard.observe` for every decided
part and :meth:`PoolGuard.allow_admission` before admitting one, and routes alarm texts to the line's
alarm path; the recipe calls :meth:`PoolGuard.keep_out_recurring` when its warm-up pool is curated.
"""
from __future__ import annotations

from bisect import bisect_left
from collections import deque
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from ..config import PoolGuardSettings
from ..record import PartRecord, Verdict

# A pool at least this full (members / capacity) admits only below ``settled_admit_below``.
SETTLED_FILL = 0.5


@dataclass(frozen=True)
class Signature:
    """The most anomalous patches of a part: grid positions and unit feature vectors."""

    positions: np.ndarray   # [m, 2] (row, col) on the patch grid, hottest first
    vectors: np.ndarray     # [m, D] unit norm
    anomaly: float          # map value of the hottest patch (its distance to the pool, in map units)


def signature(anomaly_map: np.ndarray, sets: Sequence[np.ndarray], top: int) -> Signature | None:
    """Signature of a scored part from its anomaly map and its prepared feature sets (``[P, D]`` each, unit
    rows). A map finer than the patch grid (a scan recipe's image-sized map) is block-averaged onto it.
    None without 2D feature sets (a ``3d`` recipe)."""
    if not sets or anomaly_map is None:
        return None
    patches = sets[0].shape[0]
    side = int(round(np.sqrt(patches)))
    grid = np.asarray(anomaly_map, np.float32)
    if grid.size != patches:
        if side * side != patches or grid.shape[0] % side or grid.shape[1] % side:
            return None
        grid = grid.reshape(side, grid.shape[0] // side, side, grid.shape[1] // side).mean(axis=(1, 3))
    flat = grid.reshape(-1)
    top = min(top, flat.size)
    idx = np.argpartition(-flat, top - 1)[:top]
    idx = idx[np.argsort(-flat[idx])]          # hottest first
    vectors = np.concatenate([np.asarray(s[idx], np.float32) for s in sets], axis=1)
    vectors /= np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    return Signature(np.stack(np.unravel_index(idx, grid.shape), axis=1), vectors, float(flat[idx[0]]))


def twin_gaps(sets: Sequence[np.ndarray], partners: int) -> np.ndarray:
    """``[n, P]``: for each member's patch, how much farther it is from *most* other members than from its
    ``partners`` closest ones: the median over the other members of the distance to their nearest patch,
    minus the ``partners``-th smallest of those distances (``sqrt(2 - 2 cos)``, averaged over the feature
    sets). ``sets``: ``[n, P, D]`` each, unit rows. A good patch is close to most members (both small); a
    one-off defect is far from all (both large); a defect shared by a few members is far from most and
    close to its twins: a large gap, whoever its twins are."""
    total = None
    for members in sets:
        x = np.asarray(members, np.float32)
        n, patches, dim = x.shape
        flat = x.reshape(n * patches, dim)
        out = np.empty((n, patches), np.float32)
        for i in range(n):
            cos = (x[i] @ flat.T).reshape(patches, n, patches).max(axis=2)        # [P, n] nearest patch each
            dist = np.delete(np.sqrt(np.maximum(2.0 - 2.0 * np.clip(cos, -1.0, 1.0), 0.0)), i, axis=1)
            out[i] = np.median(dist, axis=1) - np.partition(dist, partners - 1, axis=1)[:, partners - 1]
        total = out if total is None else total + out
    return total / len(sets)


def recurring_members(gaps: np.ndarray, side: int, reach: int, min_group: int, z: float = 3.5) -> np.ndarray:
    """Members (indices) that form a recurring defect: robust outliers of their largest twin gap (median +
    ``z`` x 1.4826 MAD over the members, :func:`twin_gaps`) whose worst patches lie within ``reach`` of each
    other on the ``side`` x ``side`` grid, at least ``min_group`` of them. Empty when there is no such group."""
    distances = gaps
    worst = distances.max(axis=1)
    centre = float(np.median(worst))
    spread = 1.4826 * float(np.median(np.abs(worst - centre)))
    suspects = np.flatnonzero(worst > centre + z * max(spread, 1e-3 * max(centre, 1e-6)))
    if suspects.size < min_group:
        return np.zeros(0, int)
    hot = np.stack(np.unravel_index(distances[suspects].argmax(axis=1), (side, side)), axis=1)
    near = np.abs(hot[:, None, :] - hot[None, :, :]).max(axis=2) <= reach
    group = max((np.flatnonzero(row) for row in near), key=len)
    return suspects[group] if group.size >= min_group else np.zeros(0, int)


def lookalike_distance(a: Signature, b: Signature, reach: int) -> float:
    """Smallest feature distance (``sqrt(2 - 2 cos)``, 0..2) between a patch of ``a`` and a patch of ``b``
    at most ``reach`` patches apart; inf when no pair is that close in place."""
    near = np.abs(a.positions[:, None, :] - b.positions[None, :, :]).max(axis=2) <= reach
    if not near.any():
        return float("inf")
    cos = np.clip(a.vectors @ b.vectors.T, -1.0, 1.0)
    return float(np.sqrt(2.0 - 2.0 * cos[near].max()))


@dataclass
class _Reject:
    index: int                                            # the part's position in the stream
    sig: Signature
    partners: list[int] = field(default_factory=list)    # indices of the rejects it looks like, ascending


@dataclass
class GuardStats:
    """Counters for status and benchmarks."""

    observed: int = 0
    rejects: int = 0
    refused_lookalikes: int = 0           # admissions refused as look-alikes of recent rejects
    refused_atypical: int = 0             # admissions refused for a score at or above the admission ceiling
    alarms: int = 0
    alarm_parts: list[int] = field(default_factory=list)   # stream positions at which the alarm was raised


class PoolGuard:
    """Watches one recipe's decided parts; see the module docstring."""

    def __init__(self, settings: PoolGuardSettings):
        self.settings = settings
        self.stats = GuardStats()
        self.active = False                   # the recurring-defect alarm is raised
        self._recent: deque[bool] = deque(maxlen=settings.window)    # reject flags of recent parts
        self._rejects: deque[_Reject] = deque()                        # rejects within `memory` parts
        self._bank: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None   # their signatures, stacked
        self._last: tuple[str, Signature | None] | None = None         # the part just observed
        self._pending_alarm: str | None = None                          # raised during warm-up curation

    @property
    def enabled(self) -> bool:
        return self.settings.enabled

    def observe(self, part: PartRecord, prepared) -> str | None:
        """Record a decided part; returns an alarm text when the recurring-defect alarm is raised or
        cleared by this part, else None. Parts without a verdict (warm-up, errors) are ignored."""
        if not self.enabled:
            return None
        if self._pending_alarm is not None:
            alarm, self._pending_alarm = self._pending_alarm, None
            return alarm
        if part.verdict not in (Verdict.ACCEPT, Verdict.REJECT) or part.test_part:
            return None
        s = self.settings
        index = self.stats.observed
        self.stats.observed += 1
        sig = signature(part.anomaly_map, getattr(prepared, "sets", None) or [], s.top_patches)
        self._last = (part.part_id, sig)
        rejected = part.verdict == Verdict.REJECT
        self._recent.append(rejected)
        while self._rejects and self._rejects[0].index <= index - s.memory:
            self._rejects.popleft()
            self._bank = None
        if rejected:
            self.stats.rejects += 1
            if sig is not None:
                entry = _Reject(index, sig)
                for other, alike in zip(self._rejects, self.lookalikes(sig)):
                    if alike and other.index > index - s.window:
                        other.partners.append(index)
                        entry.partners.append(other.index)
                self._rejects.append(entry)
                self._bank = None
        return self._update_alarm(index)

    def admission_ceiling(self, pool_fill: float) -> float | None:
        """The score at or above which an accepted part is not admitted to a pool that is ``pool_fill``
        (members / capacity) full: ``settled_admit_below`` once it is :data:`SETTLED_FILL` full, where that is
        lower, else ``admit_below`` (None: no limit)."""
        s = self.settings
        ceilings = [c for c in (s.admit_below, s.settled_admit_below if pool_fill >= SETTLED_FILL else None)
                    if c is not None]
        return min(ceilings) if ceilings else None

    def allow_admission(self, part: PartRecord, prepared, pool_fill: float = 0.0) -> bool:
        """False for a part that scores above the pool's own range (:meth:`admission_ceiling` of a pool
        ``pool_fill`` full) or looks like a recent reject."""
        if not self.enabled:
            return True
        ceiling = self.admission_ceiling(pool_fill)
        if ceiling is not None and part.score is not None and part.score >= ceiling:
            self.stats.refused_atypical += 1
            return False
        if self._last is not None and self._last[0] == part.part_id:
            sig = self._last[1]
        else:
            sig = signature(part.anomaly_map, getattr(prepared, "sets", None) or [], self.settings.top_patches)
        if sig is None or not self.lookalikes(sig).any():
            return True
        self.stats.refused_lookalikes += 1
        return False

    def keep_out_recurring(self, pool) -> int:
        """When a warm-up pool is curated: find a recurring defect among its members (see the module
        docstring), remove those members, remember their signatures as rejects and raise the alarm at the
        next observed part. A group with a golden member is left alone (a technician vouched for its look:
        a product variant, not a defect). Returns how many members left. Pools without 2D patch feature
        sets (``sets16``: a scan pool) are left alone."""
        s = self.settings
        n = pool.size
        if not self.enabled or getattr(pool, "sets16", None) is None or not len(pool.sets16) \
                or n < 2 * (s.min_partners + 1):   # a 3d scan pool's sets16 holds no 2D set
            return 0
        sets = [np.asarray(pool.sets16[k, :n], np.float32) for k in range(pool.sets16.shape[0])]
        side = int(round(np.sqrt(sets[0].shape[1])))
        if side * side != sets[0].shape[1]:
            return 0
        distances = twin_gaps(sets, s.min_partners)
        found = recurring_members(distances, side, s.reach, s.min_partners + 1)
        if found.size == 0 or pool.golden[found].any():   # a golden member vouches for its look-alikes
            return 0
        index = self.stats.observed
        for i in found:
            sig = signature(distances[i].reshape(side, side), [x[i] for x in sets], s.top_patches)
            if sig is not None:
                self._rejects.append(_Reject(index, sig))   # no partners: the stream's alarm counts its own
        self._bank = None
        rows, cols = np.unravel_index(distances[found].argmax(axis=1), (side, side))
        pool.remove(found)
        self.stats.alarms += 1
        self.stats.alarm_parts.append(index)
        self._pending_alarm = (f"recurring defect inside warm-up: {found.size} of {n} warm-up members share an "
                               f"anomaly near patch ({int(np.median(rows))}, {int(np.median(cols))}) that most "
                               "members lack; they were taken out of the pool and their look-alikes are kept out "
                               "(check the line for a damaged guide, tool or fixture)")
        return int(found.size)

    def recurring(self) -> list[_Reject]:
        """Rejects within the window that look like at least ``min_partners`` others in it."""
        first = self.stats.observed - self.settings.window
        need = self.settings.min_partners
        return [r for r in self._rejects if r.index >= first and len(r.partners) >= need
                and len(r.partners) - bisect_left(r.partners, first) >= need]

    def lookalikes(self, sig: Signature) -> np.ndarray:
        """Which remembered rejects (oldest first) ``sig`` looks like: :func:`lookalike_distance` within
        ``lookalike_distance`` and ``lookalike_ratio`` x the smaller anomaly, for all of them at once."""
        if not self._rejects:
            return np.zeros(0, bool)
        if self._bank is None:
            self._bank = (np.stack([r.sig.positions for r in self._rejects]),   # [R, m, 2]
                          np.stack([r.sig.vectors for r in self._rejects]),     # [R, m, D]
                          np.array([r.sig.anomaly for r in self._rejects]))     # [R]
        positions, vectors, anomaly = self._bank
        s = self.settings
        r, m, dim = vectors.shape
        near = np.abs(positions[:, :, None, :] - sig.positions[None, None, :, :]).max(axis=3) <= s.reach
        cos = (vectors.reshape(r * m, dim) @ sig.vectors.T).reshape(r, m, -1)
        best = np.where(near, np.clip(cos, -1.0, 1.0), -np.inf).max(axis=(1, 2))
        dist = np.sqrt(np.maximum(2.0 - 2.0 * best, 0.0))     # inf where no pair is near in place
        return dist <= np.minimum(s.lookalike_distance, s.lookalike_ratio * np.minimum(sig.anomaly, anomaly))

    def _update_alarm(self, index: int) -> str | None:
        s = self.settings
        recurring = self.recurring()
        rate = sum(self._recent) / max(len(self._recent), 1)
        if not self.active and len(recurring) >= s.alarm_rejects:
            self.active = True
            self.stats.alarms += 1
            self.stats.alarm_parts.append(index)
            rows, cols = np.stack([r.sig.positions[0] for r in recurring]).T
            return (f"recurring defect: {len(recurring)} of the last {len(self._recent)} parts were rejected with "
                    f"the same look near patch ({int(np.median(rows))}, {int(np.median(cols))}); reject rate "
                    f"{100 * rate:.0f} %; look-alikes are kept out of the pool (check the line for a damaged "
                    f"guide, tool or fixture)")
        if self.active and len(recurring) < max(1, s.alarm_rejects // 2):
            self.active = False
            return f"recurring defect cleared: {len(recurring)} look-alike rejects in the last {len(self._recent)} parts"
        return None
