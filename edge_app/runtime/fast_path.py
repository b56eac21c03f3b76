"""The fast path by default, verified by the line itself.

An fp32 line (``model.precision: fp32``, ``model.fast_path: auto``) finds the INT8 feature model beside its
fp32 one (``make setup`` builds ``models/dinov2_vits14_musc_cut_int8.onnx``) and runs each warm-up part through
it too (*shadow* features). When the pool becomes ready, both paths score the warm-up parts among themselves
(leave-one-out, the pool's own scoring: numpy fp32 on one side, the INT8 features with ONNX INT8 scoring on the
other) and compare: token cosine, verdicts at the recipe's threshold, and score drift, against the gate of
``musc-export verify`` (:class:`musc_edge.export.verify.VariantGate`). Passed: the line switches feature model
and scorer, rebuilds its pools from the shadow features of the same members, and the switch is recorded (the
ledger rows carry the new model hash; the audit log and the log say why). Failed: it stays on fp32 and says why.
A member's score on a path whose scorer is exact (numpy, onnx-fp32) is its leave-one-out score from the members
scored among themselves (the batch that scored the warm-up pool; no MSM again); the INT8 scorer scores every
warm-up part one-vs-pool, as the line will (its error is up to 0.09 score units on bottle, as large as the
features' own drift, so the trial must see it). Parts the line extracted ahead with the fp32 model before a switch
are scored with their shadow features, not extracted again. At a switch the fast pool's score scale is aligned to
the fp32 pool's on the warm-up parts (:func:`align_scale`), so the threshold keeps its meaning.

The decision logic (:func:`plan_fast_path`, :func:`compare_paths`, :func:`decide`) is pure and tested on its
own; :class:`FastPath` holds the trial's state for the :class:`~musc_edge.edge.runtime.inspector.Inspector`.
"""
from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..config import LineConfig
from ..manifest import ManifestError, load_manifest
from ..record import PartRecord, Reason
from ..scoring import MuscParams
from ..scoring.onnx_msm import EXACT_BACKENDS

log = logging.getLogger(__name__)

FAST_SCORER = "onnx-int8"
MIN_SHADOW_PARTS = 8      # fewer warm-up parts than this are too few to compare verdicts on
MAX_PENDING_SHADOWS = 64  # shadow features of parts extracted but not yet decided (the line runs a few ahead)
MAX_SAMPLES = 512         # warm-up samples kept; beyond it the oldest that are not pool members go
ALIGN_BELOW = 3.0         # samples either path scores above this are clear rejects: left out of the scale fit
MIN_ALIGN_PARTS = 5       # fewer samples below ALIGN_BELOW than this: the fast scale stays as scored


@dataclass(frozen=True)
class FastPathPlan:
    """What a line would switch to, or why it runs no trial (``model`` None)."""

    model: Path | None
    scorer: str = FAST_SCORER
    why_not: str = ""


def plan_fast_path(config: LineConfig, cpu=None) -> FastPathPlan:
    """The INT8 feature model and scorer a line may switch to, or the reason it stays on its configuration."""
    from musc_edge.export.quantize import int8_exact_here

    from ..features import select_model
    from ..install_paths import resolve_model_path

    settings = config.model
    if settings.fast_path == "off":
        return FastPathPlan(None, why_not="model.fast_path is off")
    if settings.precision != "fp32":
        return FastPathPlan(None, why_not=f"model.precision is {settings.precision}: the line runs it as configured")
    if any(r.modality != "2d" for r in config.recipes.values()):
        return FastPathPlan(None, why_not="scan recipes (3d, 2d+3d) have no INT8 shadow check yet")
    path = resolve_model_path(settings.path)
    folder = path if path.is_dir() else path.parent
    try:
        model = select_model(folder, settings.blocks, "int8")
        manifest = load_manifest(model, check_hash=False)
    except ManifestError:
        return FastPathPlan(None, why_not=f"no INT8 feature model in {folder} covers blocks {list(settings.blocks)} "
                                          "(`make setup` builds one)")
    exact, why = int8_exact_here(manifest.quantization or {}, cpu)
    if not exact:
        return FastPathPlan(None, why_not=f"{model.name}: {why}")
    scorer = FAST_SCORER if config.scoring.backend == "auto" else config.scoring.backend
    return FastPathPlan(model, scorer)


@dataclass(frozen=True)
class ShadowSample:
    """A warm-up part's feature sets through both paths (same image)."""

    recipe: str
    part_id: str
    fp32: list[np.ndarray]
    fast: list[np.ndarray]


@dataclass(frozen=True)
class ShadowResult:
    """Both paths on the same warm-up parts, each scored against the others (leave-one-out)."""

    parts: int
    same_verdicts: int
    min_cos: float              # lowest cosine between a token's fp32 and fast feature
    score_drift: float          # median |fast score - fp32 score| (score units: 1.0 = the pool's 90th percentile)
    flipped: tuple[str, ...] = ()
    borderline: int = 0         # flips within the gate's allowed drift of the threshold (verify.verdict_flips)
    scale_gain: float = 1.0     # the fast scale's alignment to fp32 (:func:`align_scale`): fast' = gain fast + offset
    scale_offset: float = 0.0

    @property
    def agreement(self) -> float:
        """Share of parts without a decisive flip (what the gate reads)."""
        return (self.same_verdicts + self.borderline) / self.parts if self.parts else 0.0


def _row_cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12)


def _scores(pool, sets: list[list[np.ndarray]], part_ids: list[str], grid: tuple[int, int],
            params: MuscParams) -> np.ndarray:
    """Each part's score against ``pool`` without itself, as the line would score it: one-vs-pool through the
    pool's scorer. Where that scorer is exact (numpy, onnx-fp32: the batch's numbers to float rounding), a member's
    score is its leave-one-out score from the members scored among themselves (already computed, no MSM again);
    an approximate scorer (onnx-int8) scores every part, since its own error is part of what the trial measures."""
    slots = {pid: i for i, pid in enumerate(pool.part_ids[:pool.size])}
    exact = getattr(pool, "scorer_name", "numpy") in EXACT_BACKENDS
    loo = pool.leave_one_out_scores(params) if exact and pool.size >= 3 else []
    return np.array([loo[slots[pid]] if loo and pid in slots else
                     pool.score(part, grid, params, exclude_part_id=pid).score for part, pid in zip(sets, part_ids)])


def align_scale(fast_pool, ours: np.ndarray, fast: np.ndarray) -> tuple[np.ndarray, float, float]:
    """Move ``fast_pool``'s frozen scale to where the fast path's scores best match the fp32 path's ``ours`` on
    the shadowed parts, so that the recipe's threshold, set on fp32 scores, keeps its meaning after a switch.

    Both scales come from the same members' scores among themselves, but as the 10th and 90th percentiles of
    10-20 scores, each path's scale is noisy on its own (on the bottle line the two differed by up to 30 %, a
    borderline part's score by 0.1-0.3). The fit is a least-squares line over the parts both paths score below
    ``ALIGN_BELOW`` (the threshold's neighbourhood; clear rejects would steer it). Returns the fast scores on
    the aligned scale, each predicted by the fit without that part (leave-one-out: the gate does not read a
    fit to itself), and the fit's gain and offset. Without a frozen scale, with fewer than ``MIN_ALIGN_PARTS``
    parts to fit, or with a gain outside [0.5, 2] (not the same score up to scale: the gate judges it as it
    is), the scale and scores stay as they are."""
    fit = (ours < ALIGN_BELOW) & (fast < ALIGN_BELOW)
    if fast_pool.frozen_scale is None or fit.sum() < MIN_ALIGN_PARTS or np.ptp(fast[fit]) <= 0:
        return fast, 1.0, 0.0
    x = np.stack([fast[fit], np.ones(int(fit.sum()))], axis=1)
    (gain, offset), *_ = np.linalg.lstsq(x, ours[fit], rcond=None)
    if not 0.5 <= gain <= 2.0:
        return fast, 1.0, 0.0
    aligned = gain * fast + offset
    leverage = np.einsum("ij,jk,ik->i", x, np.linalg.inv(x.T @ x), x)
    aligned[fit] = ours[fit] - (ours[fit] - aligned[fit]) / np.maximum(1.0 - leverage, 1e-6)
    lo, hi = fast_pool.scale
    span = (hi - lo) / gain
    start = lo - offset * span
    fast_pool.scale = (start, start + span)
    return aligned, float(gain), float(offset)


def compare_paths(samples: list[ShadowSample], fp32_pool, fast_pool, threshold: float, grid: tuple[int, int],
                  params: MuscParams) -> ShadowResult:
    """Score every sample against each path's pool (the line's own, ready pool: :func:`reference_pool`, and the
    same members through the fast path: :func:`shadow_pool`), leaving the sample out where it is a member, and
    compare verdicts at ``threshold``, scores and token cosines: each score as the line would compute it
    (:func:`_scores`; a member's from the members scored among themselves where the pool's scorer gives the batch's
    numbers), the fast one on the fast pool's scale aligned to fp32's (:func:`align_scale`, which moves it)."""
    from musc_edge.export.verify import verdict_flips

    n = len(samples)
    if n == 0:
        return ShadowResult(0, 0, float("nan"), float("nan"))
    ids = [s.part_id for s in samples]
    ours = _scores(reference_pool(fp32_pool, grid, params), [s.fp32 for s in samples], ids, grid, params)
    fast, gain, offset = align_scale(fast_pool, ours, _scores(fast_pool, [s.fast for s in samples], ids, grid, params))
    decisive, borderline = verdict_flips(ours, fast, threshold)
    flipped = decisive | borderline
    min_cos = min(float(_row_cosines(a, b).min()) for s in samples for a, b in zip(s.fp32, s.fast))
    drift = float(np.median(np.abs(fast - ours)))
    return ShadowResult(n, int((~flipped).sum()), min_cos, drift,
                        tuple(s.part_id for s, flip in zip(samples, flipped) if flip), int(borderline.sum()),
                        gain, offset)


def decide(result: ShadowResult, gate=None, min_parts: int = MIN_SHADOW_PARTS) -> tuple[bool, str]:
    """(switch?, what the line records): the verify gate on the warm-up shadow comparison."""
    from musc_edge.export.verify import GATE

    gate = gate or GATE
    if result.parts < min_parts:
        return False, f"only {result.parts} warm-up parts were shadowed (at least {min_parts} needed)"
    borderline = f" ({result.borderline} flips within the allowed drift of the threshold)" if result.borderline else ""
    measured = (f"{result.same_verdicts}/{result.parts} same verdicts{borderline}, token cosine >= "
                f"{result.min_cos:.4f}, median score drift {result.score_drift:.3f}"
                + (f" on the fast scale aligned to fp32 (x{result.scale_gain:.3f} {result.scale_offset:+.3f})"
                   if (result.scale_gain, result.scale_offset) != (1.0, 0.0) else ""))
    failures = gate.failures(min_cos=result.min_cos, agreement=result.agreement, score_drift=result.score_drift)
    if failures:
        flipped = f"; flipped: {', '.join(result.flipped[:3])}" if result.flipped else ""
        return False, f"{measured}: fails the verify gate ({'; '.join(failures)}){flipped}"
    return True, f"{measured}: passes the verify gate"


@dataclass
class FastPathEvent:
    """What the line records about the trial: switched or not, why, and the model hashes before and after."""

    switched: bool
    reason: str
    old_model: str
    new_model: str
    scorer: str


@dataclass
class FastPath:
    """The trial's state on one line: shadow features of warm-up parts, then one decision.

    ``generation`` counts feature-model switches: a part extracted by an earlier generation is scored with its
    shadow features (:meth:`carried`) where it has them, else extracted again (the line extracts parts ahead of
    scoring). Bounded: at most ``MAX_PENDING_SHADOWS`` undecided parts' shadow features and ``MAX_SAMPLES``
    samples; after the decision only the undecided parts' shadow features remain, and only until they are taken."""

    plan: FastPathPlan
    state: str = "shadowing"            # shadowing -> fast | fp32
    generation: int = 0
    reason: str = ""
    engine: object = None               # the fast FeatureEngine, loaded at the first shadowed part
    samples: dict[str, ShadowSample] = field(default_factory=dict)
    _shadow: dict[str, list[np.ndarray]] = field(default_factory=dict)
    loading: threading.Lock = field(default_factory=threading.Lock)   # the fast engine is loaded once
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def shadowing(self) -> bool:
        return self.state == "shadowing"

    def keep_shadow(self, part_id: str, fast_sets: list[np.ndarray]) -> None:
        """Shadow features of a part being extracted (prefetch threads); also those that finish just after a
        switch (the part was extracted with the fp32 model and is scored with them). The oldest go beyond
        ``MAX_PENDING_SHADOWS`` (parts that never reached a decision)."""
        with self._lock:
            if self.state == "fp32":
                return
            self._shadow[part_id] = fast_sets
            while len(self._shadow) > MAX_PENDING_SHADOWS:
                del self._shadow[next(iter(self._shadow))]

    def carried(self, part_id: str, take: bool = True) -> list[np.ndarray] | None:
        """After a switch: the shadow (fast) features of a part extracted ahead of it with the fp32 model, or
        None (no switch, or none were computed). ``take``: the part is being scored (they are forgotten);
        otherwise it is only a look-ahead reference of another part."""
        with self._lock:
            if self.state != "fast":
                return None
            return self._shadow.pop(part_id, None) if take else self._shadow.get(part_id)

    def observe(self, recipe: str, part: PartRecord, fp32_sets: list[np.ndarray] | None,
                members: Callable[[], Collection[str]] = tuple) -> None:
        """A decided part (worker thread): a warm-up part with shadow features becomes a sample. ``members()``:
        the pools' current part ids, asked only beyond ``MAX_SAMPLES`` (samples of other parts go first)."""
        with self._lock:
            fast = self._shadow.pop(part.part_id, None)
        if fast is not None and fp32_sets is not None and part.reason == Reason.WARMUP and not part.test_part:
            self.samples[part.part_id] = ShadowSample(recipe, part.part_id, fp32_sets, fast)
            if len(self.samples) > MAX_SAMPLES:
                kept = members()
                drop = next((pid for pid in self.samples if pid not in kept), next(iter(self.samples)))
                del self.samples[drop]

    def finish(self, switched: bool, reason: str) -> None:
        """The decision: the samples go; after a switch the undecided parts' shadow features stay (:meth:`carried`)."""
        with self._lock:
            self.state, self.reason = ("fast" if switched else "fp32"), reason
            if not switched:
                self._shadow.clear()
        self.samples = {}
        if not switched:
            self.engine = None


def _copy(pool, scorer: str, sets16: np.ndarray | None = None):
    """A copy of ``pool`` (its members, scores and scale) scoring with ``scorer``; ``sets16``: other features of
    the same members."""
    from ..pool import FeaturePool

    copy = FeaturePool(pool.capacity, pool.n_sets, pool.patches, pool.dim, min_size=pool.min_size,
                       eviction=pool.eviction, horizon=pool.horizon, scorer=scorer, scale=pool.scale_policy)
    state = pool.state()
    if sets16 is not None:
        state["sets16"] = sets16.astype(state["sets16"].dtype)
    copy.load_state(state)
    return copy


def reference_pool(pool, grid: tuple[int, int], params: MuscParams):
    """A copy of the line's own pool whose members are scored among themselves now, as :func:`shadow_pool`'s
    are, on the line's scale: members admitted since the pool was last scored together keep the raw score of
    their admission (against the pool of that moment), which the fast copy's would be compared with otherwise.
    The pool itself when its members have not changed since (no scoring again). The copy scores with numpy, whose
    numbers the line's exact scorers give (no second ONNX session for a copy that lives for one comparison)."""
    if pool.scored_together == tuple(pool.part_ids[:pool.size]):
        return pool
    copy = _copy(pool, "numpy")
    if copy.size >= 2:
        copy.rescore_members(grid, params)
        copy.scale = pool.scale
    return copy


def shadow_pool(pool, samples: dict[str, ShadowSample], scorer: str, grid: tuple[int, int], params: MuscParams):
    """A copy of ``pool`` whose members have their shadow (fast) features, scored with ``scorer`` and re-scored
    among themselves; None when a member has no shadow features (restored or seeded before the trial)."""
    ids = pool.part_ids[:pool.size]
    if any(pid not in samples for pid in ids):
        return None
    copy = _copy(pool, scorer, np.stack([np.stack([samples[pid].fast[s] for pid in ids])
                                         for s in range(pool.n_sets)]))
    if copy.size >= 2:
        copy.rescore_members(grid, params)
    return copy


def adopt(pool, fast_pool) -> None:
    """Put ``fast_pool``'s members, scores and scorer (from :func:`shadow_pool`) in place of ``pool``'s."""
    pool.load_state(fast_pool.state())
    pool.scorer, pool.scorer_name = fast_pool.scorer, fast_pool.scorer_name
