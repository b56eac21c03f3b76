"""Rolling unlabeled reference pool of one recipe, and one-vs-pool scoring against it.

Members are stored in float16 (what is persisted) with a float32 working copy laid out flat per feature
set, so scoring a part is one matrix product per set with no per-part allocation once the pool is full.
Slots are replaced in place; FIFO and reservoir eviction both skip "golden" members, which are never evicted.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from .score import PoolScore
from .scoring import MuscParams, PoolTooSmallError, image_scores, rescore_one, score_batch
from .scoring.msm import one_vs_pool, patch_to_sample_distances
from .scoring.musc import salient_features

EVICTION_POLICIES = ("fifo", "reservoir", "coverage")
SCALE_POLICIES = ("frozen", "members")


def pool_range(raw_scores: np.ndarray, quantiles: tuple[float, float]) -> tuple[float, float]:
    """(lo, hi) that map pool members' raw scores to 0 and 1 in streaming normalisation."""
    lo, hi = np.quantile(raw_scores, quantiles)
    return float(lo), float(hi)


def leave_one_out_scores(raw_scores: np.ndarray, features: np.ndarray, params: MuscParams,
                         scale: tuple[float, float] | None = None) -> list[float]:
    """Each member's re-scored score against the other members, on the scale of live parts' scores: the pool's
    frozen ``scale`` when it has one, else the others' raw-score range (streaming RsCon). What label-free
    calibration starts from."""
    n = len(raw_scores)
    if n < 3:
        raise PoolTooSmallError(f"pool has {n} members; at least 3 are needed for leave-one-out scores")
    out = []
    for i in range(n):
        others = np.delete(np.arange(n), i)
        raw = raw_scores[others]
        out.append(rescore_one(float(raw_scores[i]), features[i], raw, features[others],
                               scale or pool_range(raw, params.pool_quantiles), params.windows))
    return out


def part_descriptor(tokens: np.ndarray) -> np.ndarray:
    """A part's cheap global descriptor: the unit mean of its ``[P, D]`` tokens (coverage eviction)."""
    mean = np.asarray(tokens, np.float32).mean(axis=0)
    return mean / max(float(np.linalg.norm(mean)), 1e-12)


def outlier_members(raw_scores: np.ndarray, golden: np.ndarray, z: float = 3.0) -> np.ndarray:
    """Members whose raw score is above ``median + z * 1.4826 * MAD`` of all members' (golden ones never).

    Used when a warm-up pool is first scored: warm-up admits every part, and a defective member would both
    mask look-alike defects and stretch the normalisation range."""
    median = float(np.median(raw_scores))
    mad = 1.4826 * float(np.median(np.abs(raw_scores - median)))
    return np.flatnonzero((raw_scores > median + z * max(mad, 1e-12)) & ~golden)


class PoolMembers:
    """Membership bookkeeping shared by the 2D pool and the scan pool: ids, raw scores, re-scoring features,
    admission order and time, golden flags. Subclasses own the feature storage and the scoring."""

    features: np.ndarray | None
    eviction: str                       # which member a full pool replaces (set by the subclass)

    def _init_members(self, capacity: int, min_size: int, scale: str = "frozen") -> None:
        if capacity < 2:
            raise ValueError(f"pool capacity must be >= 2, got {capacity}")
        if not 2 <= min_size <= capacity:
            raise ValueError(f"pool min_size must be in [2, capacity={capacity}], got {min_size}")
        if scale not in SCALE_POLICIES:
            raise ValueError(f"unknown pool scale {scale!r}: expected one of {SCALE_POLICIES}")
        self.capacity, self.min_size = capacity, min_size
        self.scale_policy = scale
        self.scale: tuple[float, float] | None = None   # (lo, hi) of the members scored among themselves
        self.raw_scores = np.zeros(capacity, np.float64)
        self.part_ids: list[str | None] = [None] * capacity
        self.admitted_seq = np.zeros(capacity, np.int64)
        self.admitted_time = np.zeros(capacity, np.float64)
        self.golden = np.zeros(capacity, bool)
        self.descriptors: np.ndarray | None = None   # [capacity, F] unit vectors (coverage eviction)
        self.size = 0
        self.admissions = 0
        self.scored_together: tuple[str, ...] = ()   # the members when last scored among themselves

    @property
    def ready(self) -> bool:
        return self.size >= self.min_size

    # -- the score scale -------------------------------------------------------------------------------------
    # A part's score is its raw score mapped by (lo, hi) -> (0, 1). ``frozen`` (default): (lo, hi) are the
    # quantiles of the members' raw scores when they were last scored among themselves (warm-up curation,
    # seeding; :meth:`_freeze_scale`) and stay until the next time, so parts scored hours apart share one scale.
    # ``members``: the current members' stored raw scores, each scored against the pool of its own day, at
    # every part: the scale moves with every admission (on KolektorSDD's line this cost 1.6 AUROC points, mean
    # of 4 seeds; docs/benchmarks.md, "The line protocol").

    @property
    def frozen_scale(self) -> tuple[float, float] | None:
        """The scale every part is scored on, where the pool has frozen one."""
        return self.scale if self.scale_policy == "frozen" else None

    def score_range(self, member_raw: np.ndarray, params: MuscParams) -> tuple[float, float]:
        """(lo, hi) for a part scored against the members whose raw scores are ``member_raw``."""
        return self.frozen_scale or pool_range(member_raw, params.pool_quantiles)

    def _freeze_scale(self, params: MuscParams) -> None:
        """Freeze the scale from the members' raw scores, just computed among themselves."""
        if self.size >= 2:
            self.scale = pool_range(self.raw_scores[:self.size], params.pool_quantiles)

    def _members_scored(self, params: MuscParams) -> None:
        """The members have just been scored among themselves (both pool kinds' ``rescore_members``): freeze the
        scale from those scores and remember who the members were (``scored_together``)."""
        self._freeze_scale(params)
        self.scored_together = tuple(self.part_ids[:self.size])

    def _scale_state(self) -> np.ndarray:
        return np.array(self.scale if self.scale is not None else (np.nan, np.nan), np.float64)

    def _load_scale(self, state: dict[str, np.ndarray]) -> None:
        """The stored scale; a pool stored before scales were frozen freezes one from its members' raw scores."""
        stored = state.get("scale")
        self.scale = None
        if stored is not None and np.all(np.isfinite(stored)):
            self.scale = (float(stored[0]), float(stored[1]))
        else:
            self._freeze_scale(MuscParams())

    def _descriptor_slot(self, slot: int, describe: Callable[[], np.ndarray]) -> None:
        """Remember a member's descriptor (unit vector, from ``describe()``) when the pool evicts by coverage,
        the one policy that reads them."""
        if self.eviction != "coverage":
            return
        descriptor = describe()
        if self.descriptors is None or self.descriptors.shape[1] != descriptor.shape[0]:
            self.descriptors = np.zeros((self.capacity, descriptor.shape[0]), np.float32)
        self.descriptors[slot] = descriptor

    def _most_redundant(self, fifo_share: float = 0.5) -> int | None:
        """The slot coverage eviction replaces: of the members outside the newest ``fifo_share`` (kept as in
        FIFO, so the pool follows slow drift), the one closest to another member (its descriptor's highest
        cosine to any other member): a farthest-point pool that keeps the part's variety (poses, lots)."""
        candidates = np.flatnonzero(~self.golden[:self.size])
        if candidates.size == 0:
            return None
        newest = np.argsort(self.admitted_seq[candidates])[::-1][:int(fifo_share * self.size)]
        older = np.delete(candidates, newest)
        if older.size == 0 or self.descriptors is None:
            return self._oldest_unfrozen()
        d = self.descriptors[:self.size]
        sim = d[older] @ d.T
        sim[np.arange(older.size), older] = -np.inf
        return int(older[np.argmax(sim.max(axis=1))])

    def _oldest_unfrozen(self) -> int | None:
        """The slot FIFO eviction replaces: the oldest non-golden member (None if all are golden)."""
        candidates = np.flatnonzero(~self.golden)
        if candidates.size == 0:
            return None
        return int(candidates[np.argmin(self.admitted_seq[candidates])])

    def _record(self, slot: int, part_id: str, raw_score: float, feature: np.ndarray, now: float,
                golden: bool) -> None:
        """Fill a slot's bookkeeping (the subclass has stored its features)."""
        self.features[slot] = feature
        self.raw_scores[slot] = raw_score
        self.part_ids[slot] = part_id
        self.admitted_seq[slot] = self.admissions
        self.admitted_time[slot] = now
        self.golden[slot] = golden
        self.size = max(self.size, slot + 1)

    def _compact_members(self, keep: np.ndarray) -> None:
        """Keep only the ``keep`` members' bookkeeping, compacted to the front."""
        n = len(keep)
        for name in ("features", "raw_scores", "admitted_seq", "admitted_time", "golden", "descriptors"):
            arr = getattr(self, name)
            if arr is not None:
                arr[:n] = arr[keep]
        self.part_ids = [self.part_ids[i] for i in keep] + [None] * (self.capacity - n)
        self.size = n

    def drop_outliers(self, z: float = 3.0) -> int:
        """Evict :func:`outlier_members` (warm-up curation); returns how many."""
        outliers = outlier_members(self.raw_scores[:self.size], self.golden[:self.size], z)
        if outliers.size:
            self.remove(outliers)
        return int(outliers.size)

    def leave_one_out_scores(self, params: MuscParams) -> list[float]:
        return leave_one_out_scores(self.raw_scores[:self.size], self.features[:self.size], params,
                                    self.frozen_scale)

    def remove(self, slots: np.ndarray) -> None:
        raise NotImplementedError


class FeaturePool(PoolMembers):
    """Fixed-capacity pool of prepared feature sets (``n_sets`` x ``[P, D]`` per member)."""

    def __init__(self, capacity: int, n_sets: int, patches: int, dim: int, *, min_size: int = 10,
                 eviction: str = "fifo", horizon: int | None = None, seed: int = 0, scorer: str = "numpy",
                 scale: str = "frozen"):
        self._init_members(capacity, min_size, scale)
        if eviction not in EVICTION_POLICIES:
            raise ValueError(f"unknown eviction {eviction!r}: expected one of {EVICTION_POLICIES}")
        self.n_sets, self.patches, self.dim = n_sets, patches, dim
        self.eviction = eviction
        self.horizon = max(horizon or 5 * capacity, capacity)
        self.rng = np.random.default_rng(seed)
        self.sets16 = np.zeros((n_sets, capacity, patches, dim), np.float16)
        self.work = np.zeros((n_sets, capacity * patches, dim), np.float32)
        self.features = np.zeros((capacity, dim), np.float32)      # re-scoring features
        self._workspace: list[np.ndarray] | None = None
        # MSM backend: numpy here, or an ONNX Runtime graph (edge_app/scoring/onnx_msm.py); "auto" times them.
        if scorer == "auto":
            from .scoring.onnx_msm import choose_backend

            scorer = choose_backend(n_sets, patches, dim, capacity)[0]
        from .scoring.onnx_msm import make_scorer

        self.scorer_name = scorer
        self.scorer = make_scorer(scorer, n_sets, patches, dim, capacity)

    # -- scoring ---------------------------------------------------------------------------------------------

    def _workspaces(self) -> list[np.ndarray] | None:
        if self.size != self.capacity:
            return None
        if self._workspace is None:
            self._workspace = [np.empty((self.patches, self.capacity * self.patches), np.float32)
                               for _ in range(self.n_sets)]
        return self._workspace

    def score(self, query_sets: list[np.ndarray], grid: tuple[int, int], params: MuscParams,
              exclude_part_id: str | None = None, image_token: np.ndarray | None = None,
              look_ahead: Sequence[Sequence[np.ndarray]] = ()) -> PoolScore:
        """Score a prepared part (``n_sets`` x ``[P, D]``) against the pool, excluding its own part id.

        ``look_ahead`` are later parts' feature sets: extra references of the MSM (look-ahead verdicts), never
        of the re-scoring, whose scale stays the members' own."""
        keep = None
        if exclude_part_id is not None and exclude_part_id in self.part_ids[:self.size]:
            keep = np.array([pid != exclude_part_id for pid in self.part_ids[:self.size]])
        n_refs = self.size if keep is None else int(keep.sum())
        if n_refs < 1 or self.size < self.min_size:
            raise PoolTooSmallError(f"pool has {n_refs} usable members; {self.min_size} needed to score")
        if self.scorer is not None:  # the ONNX Runtime graph (edge_app/scoring/onnx_msm.py)
            scored = self.scorer.one_vs_pool(query_sets, self, params.fraction, keep, look_ahead)
        else:
            pool_sets = [self.work[s, :self.size * self.patches] for s in range(self.n_sets)]
            scored = one_vs_pool(query_sets, pool_sets, params.fraction, keep, self._workspaces(), look_ahead)
        patch = scored.patch
        tokens = None if image_token is None else np.asarray(image_token)[None]
        feature = salient_features([q[None] for q in query_sets], patch[None], params, tokens)[0]
        raw = float(image_scores(patch[None], params.image_top)[0])
        members = np.flatnonzero(keep) if keep is not None else slice(0, self.size)
        pool_raw = self.raw_scores[members]
        score = rescore_one(raw, feature, pool_raw, self.features[members], self.score_range(pool_raw, params),
                            params.windows)
        return PoolScore(patch.reshape(grid), raw, score, feature, n_refs + len(look_ahead),
                         float(scored.closeness.min()))

    def rescore_members(self, grid: tuple[int, int], params: MuscParams) -> None:
        """Score the members among themselves (batch, leave-one-out): used when a warm-up pool fills, so
        every member has a raw score and a re-scoring feature computed the same way."""
        n = self.size
        if n < 2:
            raise PoolTooSmallError(f"pool has {n} members; at least 2 are needed to score them")
        result = score_batch([self.sets16[s, :n].astype(np.float32) for s in range(self.n_sets)], grid, params)
        self.raw_scores[:n] = result.raw
        self.features[:n] = result.features
        self._members_scored(params)

    # -- membership ------------------------------------------------------------------------------------------
    def nearest_distance(self, query_sets: list[np.ndarray]) -> float:
        """Mean nearest-patch distance of a part to its closest member (inf for an empty pool).

        On bottle (ViT-S/14, blocks 6 and 9): 0.04-0.07 for the same part captured again (shifted up to 3 px,
        brightness +-5 %, sensor noise), 0.08 and more for two different parts (median 0.10 against a pool of 40).
        The admission rule uses it to keep a part from masking its own twin.
        """
        if self.size == 0:
            return float("inf")
        closeness = sum(patch_to_sample_distances(q, self.work[s, :self.size * self.patches]).mean(axis=0)
                        for s, q in enumerate(query_sets))
        return float(np.min(closeness)) / len(query_sets)

    def _slot_to_fill(self) -> int | None:
        if self.size < self.capacity:
            return self.size
        if self.eviction == "fifo":
            return self._oldest_unfrozen()
        if self.eviction == "coverage":
            return self._most_redundant()
        candidates = np.flatnonzero(~self.golden)
        if candidates.size == 0:
            return None
        # Reservoir over a finite horizon: the n-th arrival enters with probability K / min(n, horizon),
        # so a burst of B similar parts displaces only about B * K / horizon members.
        if self.rng.random() >= self.capacity / min(self.admissions + 1, self.horizon):
            return None
        return int(self.rng.choice(candidates))

    def admit(self, part_id: str, sets: list[np.ndarray], raw_score: float, feature: np.ndarray,
              now: float = 0.0, golden: bool = False) -> int | None:
        """Add a member; returns its slot, or None when the eviction policy declined it."""
        slot = self._slot_to_fill()
        self.admissions += 1
        if slot is None:
            return None
        for s, fs in enumerate(sets):
            self.sets16[s, slot] = fs
            # Score against exactly what is persisted, so a restored pool scores identically.
            self.work[s, slot * self.patches:(slot + 1) * self.patches] = self.sets16[s, slot]
        self._descriptor_slot(slot, lambda: part_descriptor(sets[0]))
        self._record(slot, part_id, raw_score, feature, now, golden)
        return slot

    def remove(self, slots: np.ndarray) -> None:
        """Drop members (purge); the remaining members are compacted to the front."""
        keep = np.setdiff1d(np.arange(self.size), np.asarray(slots, int))
        self._compact(keep)

    def _compact(self, keep: np.ndarray) -> None:
        n = len(keep)
        self.sets16[:, :n] = self.sets16[:, keep]
        for s in range(self.n_sets):
            self.work[s, :n * self.patches] = self.sets16[s, :n].reshape(-1, self.dim)
        self._compact_members(keep)
        self._workspace = None

    def state(self) -> dict[str, np.ndarray]:
        """Arrays to persist (float16 sets; the float32 working copy is rebuilt on load)."""
        n = self.size
        return {"sets16": self.sets16[:, :n], "features": self.features[:n],
                "raw_scores": self.raw_scores[:n], "part_ids": np.array(self.part_ids[:n], dtype=object).astype(str),
                "admitted_seq": self.admitted_seq[:n], "admitted_time": self.admitted_time[:n],
                "golden": self.golden[:n], "admissions": np.array(self.admissions), "scale": self._scale_state()}

    def load_state(self, state: dict[str, np.ndarray]) -> None:
        sets16 = state["sets16"]
        n = sets16.shape[1]
        if sets16.shape[0] != self.n_sets or sets16.shape[2:] != (self.patches, self.dim):
            raise ValueError(f"stored pool has feature shape {sets16.shape}, this pool expects "
                             f"({self.n_sets}, n, {self.patches}, {self.dim})")
        n = min(n, self.capacity)
        self.sets16[:, :n] = sets16[:, -n:] if sets16.shape[1] > n else sets16
        for s in range(self.n_sets):
            self.work[s, :n * self.patches] = self.sets16[s, :n].reshape(-1, self.dim)
        for name in ("features", "raw_scores", "admitted_seq", "admitted_time", "golden"):
            getattr(self, name)[:n] = state[name][-n:]
        self.part_ids = [str(p) for p in state["part_ids"][-n:]] + [None] * (self.capacity - n)
        self.admissions = int(state["admissions"])
        self.size = n
        self._load_scale(state)
        for slot in range(n):
            self._descriptor_slot(slot, lambda: part_descriptor(self.work[0, slot * self.patches:(slot + 1) * self.patches]))
        self._workspace = None
