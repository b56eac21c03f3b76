"""One-vs-pool MSM as an ONNX graph, run by ONNX Runtime (fp32 or INT8 here, CUDA/TensorRT on a Jetson).

The graph does what :func:`musc_edge.edge.scoring.msm.patch_to_sample_distances` and ``interval_mean`` do, for
every feature set of a part in one session call::

    sim[s]   = query[s] @ refs[s]^T                      # [P, N*Q] similarity MatMul
    best[s]  = max over each reference's Q patches      # [P, N]
    dist[s]  = sqrt(2 - 2 clip(best[s], -1, 1))
    patch    = mean over s of mean(TopK_smallest(dist[s], k))   # interval mean, fused over sets

numpy (:mod:`.msm`) stays the reference it is tested against.

Precision ``int8`` quantizes unit vectors symmetrically: every reference patch row with its own scale
(stored once per pool member, when it is admitted), each query row with its own scale (applied after the
row max, where it cannot change which patch wins). ``MatMulIntegerToFloat`` then runs the u8 x s8 product
with 32-bit accumulation (VNNI on x86, dp4a/tensor cores on a GPU). Cosines move by <= ~3e-3. On an x86 CPU
without VNNI/AMX ONNX Runtime's u8 x s8 kernel sums pairs of products in a saturating 16-bit lane, so there
the references use 7 bits (|value| <= 63, as ``reduce_range`` does for weights) and the product stays exact
(:attr:`musc_edge.edge.cpu_features.CpuFeatures.int8_weight_levels`).

A :class:`PoolScorer` keeps the pool's references in the layout the graph wants (transposed, and
quantized for ``int8``) and refreshes only the slots whose member changed (by admission number), so
scoring a part copies nothing once the pool is full. It reads a pool through :class:`FlatMembers`'s
attributes (the pool's :class:`~musc_edge.edge.pool.FeaturePool` has them), so this module never imports
the pool.

Unlike the rest of ``scoring/`` this module is not pure numpy: it builds ONNX graphs and holds ONNX Runtime
sessions (``onnx`` and ``onnxruntime`` are imported when a graph or a session is made).
"""
from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .msm import OneVsPool, interval_k, interval_mean, look_ahead_distances, patch_to_sample_distances, pool_msm

PRECISIONS = ("fp32", "int8")
BACKENDS = ("numpy", "onnx-fp32", "onnx-int8")
EXACT_BACKENDS = ("numpy", "onnx-fp32")   # what ``auto`` chooses among: the same scores to ~1e-6
_OPSET = 17


def build_msm_graph(n_sets: int, patches: int, dim: int, precision: str = "fp32"):
    """ONNX model ``(query_s, refs_s[, scales]) x n_sets, k -> patch [P], dist_s [P, N] x n_sets``.

    ``refs_s`` is ``[D, N*Q]`` (transposed); N is dynamic. For ``int8`` the query is u8 with zero point 128
    plus a per-row scale ``[P, 1]``, the references s8 plus per-column scales ``[N*Q]``.
    """
    from onnx import TensorProto as T
    from onnx import helper as h

    if precision not in PRECISIONS:
        raise ValueError(f"unknown scoring precision {precision!r}: expected one of {PRECISIONS}")
    P, D = patches, dim
    nodes, inputs, outputs, inits = [], [], [], []
    inits += [h.make_tensor("shape_pnq", T.INT64, [3], [P, -1, P]), h.make_tensor("one", T.FLOAT, [], [1.0]),
              h.make_tensor("minus_one", T.FLOAT, [], [-1.0]), h.make_tensor("two", T.FLOAT, [], [2.0]),
              h.make_tensor("zero", T.FLOAT, [], [0.0]), h.make_tensor("n_sets", T.FLOAT, [], [float(n_sets)])]
    if precision == "int8":
        inits += [h.make_tensor("u8_zero_point", T.UINT8, [1], [128]), h.make_tensor("unit", T.FLOAT, [1], [1.0])]
    inputs.append(h.make_tensor_value_info("k", T.INT64, [1]))
    interval = []
    for s in range(n_sets):
        if precision == "fp32":
            inputs += [h.make_tensor_value_info(f"query{s}", T.FLOAT, [P, D]),
                       h.make_tensor_value_info(f"refs{s}", T.FLOAT, [D, "NQ"])]
            nodes.append(h.make_node("MatMul", [f"query{s}", f"refs{s}"], [f"sim{s}"]))
            best = f"best{s}"
        else:
            inputs += [h.make_tensor_value_info(f"query{s}", T.UINT8, [P, D]),
                       h.make_tensor_value_info(f"query_scale{s}", T.FLOAT, [P, 1]),
                       h.make_tensor_value_info(f"refs{s}", T.INT8, [D, "NQ"]),
                       h.make_tensor_value_info(f"refs_scale{s}", T.FLOAT, ["NQ"])]
            nodes.append(h.make_node("MatMulIntegerToFloat",
                                     [f"query{s}", f"refs{s}", "unit", f"refs_scale{s}", "u8_zero_point"],
                                     [f"sim{s}"], domain="com.microsoft"))
            best = f"best_unscaled{s}"
        nodes += [h.make_node("Reshape", [f"sim{s}", "shape_pnq"], [f"sim3_{s}"]),
                  h.make_node("ReduceMax", [f"sim3_{s}"], [best], axes=[2], keepdims=0)]
        if precision == "int8":
            nodes.append(h.make_node("Mul", [best, f"query_scale{s}"], [f"best{s}"]))
        nodes += [h.make_node("Clip", [f"best{s}", "minus_one", "one"], [f"cos{s}"]),
                  h.make_node("Mul", [f"cos{s}", "two"], [f"cos2_{s}"]),
                  h.make_node("Sub", ["two", f"cos2_{s}"], [f"sq{s}"]),
                  h.make_node("Max", [f"sq{s}", "zero"], [f"sqp{s}"]),
                  h.make_node("Sqrt", [f"sqp{s}"], [f"dist{s}"]),
                  h.make_node("TopK", [f"dist{s}", "k"], [f"low{s}", f"low_idx{s}"], axis=1, largest=0, sorted=0),
                  h.make_node("ReduceMean", [f"low{s}"], [f"interval{s}"], axes=[1], keepdims=0)]
        interval.append(f"interval{s}")
        outputs.append(h.make_tensor_value_info(f"dist{s}", T.FLOAT, [P, "N"]))
    nodes += [h.make_node("Sum", interval, ["interval_sum"]), h.make_node("Div", ["interval_sum", "n_sets"], ["patch"])]
    outputs.insert(0, h.make_tensor_value_info("patch", T.FLOAT, [P]))
    graph = h.make_graph(nodes, f"musc_msm_{precision}", inputs, outputs, inits)
    opsets = [h.make_opsetid("", _OPSET)] + ([h.make_opsetid("com.microsoft", 1)] if precision == "int8" else [])
    model = h.make_model(graph, opset_imports=opsets, producer_name="musc-edge")
    model.ir_version = 8  # readable by every ONNX Runtime >= 1.17
    return model


def quantize_rows(x: np.ndarray, zero_point: int = 0, levels: int = 127) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-row 8-bit quantization of ``[R, D]`` to ``[-levels, levels]``: (s8 values, or u8 with
    ``zero_point``; scales ``[R]``)."""
    scale = np.maximum(np.abs(x).max(axis=1), 1e-12) / float(levels)
    q = np.rint(x / scale[:, None])
    if zero_point:
        return (q + zero_point).astype(np.uint8), scale.astype(np.float32)
    return q.astype(np.int8), scale.astype(np.float32)


@dataclass
class FlatMembers:
    """What :class:`PoolScorer` and :func:`numpy_score` read of a pool (``FeaturePool`` has these attributes)."""

    work: np.ndarray                # [n_sets, capacity * patches, D] float32, members' patches laid out flat
    patches: int                    # patches per member
    size: int                       # members in use (the first ``size`` slots)
    admitted_seq: np.ndarray        # [capacity] admission number per slot: a changed number is a new member
    part_ids: list[str | None]      # [capacity] part id per slot


@dataclass
class MsmOutput:
    """What the MSM graph outputs for one part (an internal step of a pool's score, not a pool score)."""

    patch: np.ndarray          # [P] interval-mean patch scores, averaged over the feature sets
    dists: list[np.ndarray]    # per set [P, N]: distance to the nearest patch of each member


class PoolScorer:
    """ONNX Runtime MSM over one pool's members (:class:`FlatMembers`: its flat float32 ``work`` copy)."""

    def __init__(self, n_sets: int, patches: int, dim: int, capacity: int, precision: str = "fp32",
                 providers: list[str] | None = None, threads: int | None = None):
        import onnxruntime as ort

        from ..cpu_features import cpu_features

        self.precision, self.patches, self.dim = precision, patches, dim
        self.ref_levels = cpu_features().int8_weight_levels   # 63 where u8 x s8 pairs saturate (x86 without VNNI)
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        model = build_msm_graph(n_sets, patches, dim, precision)
        self.session = ort.InferenceSession(model.SerializeToString(), options,
                                            providers=providers or ["CPUExecutionProvider"])
        dtype = np.int8 if precision == "int8" else np.float32
        self.refs = np.zeros((n_sets, dim, capacity * patches), dtype)
        self.scales = np.ones((n_sets, capacity * patches), np.float32)
        self._keys: list[tuple | None] = [None] * capacity   # (admission number, part id) per mirrored slot

    @property
    def name(self) -> str:
        return f"onnx-{self.precision}"

    def sync(self, pool) -> None:
        """Mirror the members that changed since the last call (admission, eviction, purge, reload)."""
        q = self.patches
        for slot in range(pool.size):
            key = (int(pool.admitted_seq[slot]), pool.part_ids[slot])
            if self._keys[slot] == key:
                continue
            for s in range(self.refs.shape[0]):
                rows = pool.work[s, slot * q:(slot + 1) * q]
                if self.precision == "int8":
                    values, scale = quantize_rows(rows, levels=self.ref_levels)
                    self.refs[s, :, slot * q:(slot + 1) * q] = values.T
                    self.scales[s, slot * q:(slot + 1) * q] = scale
                else:
                    self.refs[s, :, slot * q:(slot + 1) * q] = rows.T
            self._keys[slot] = key
        for slot in range(pool.size, len(self._keys)):
            self._keys[slot] = None

    def score(self, query_sets: list[np.ndarray], pool, k: int) -> MsmOutput:
        """Patch scores of a part against the pool's ``pool.size`` members, ``k`` lowest distances averaged."""
        self.sync(pool)
        n = pool.size * self.patches
        feed: dict[str, np.ndarray] = {"k": np.array([k], np.int64)}
        for s, query in enumerate(query_sets):
            refs = self.refs[s, :, :n]  # a view; contiguous once the pool is full
            if self.precision == "int8":
                values, scale = quantize_rows(query, zero_point=128)
                feed.update({f"query{s}": values, f"query_scale{s}": scale[:, None], f"refs{s}": refs,
                             f"refs_scale{s}": self.scales[s, :n]})
            else:
                feed.update({f"query{s}": np.ascontiguousarray(query, np.float32), f"refs{s}": refs})
        patch, *dists = self.session.run(None, feed)
        return MsmOutput(patch, dists)


    def one_vs_pool(self, query_sets: list[np.ndarray], pool, fraction: float, keep: np.ndarray | None = None,
                    look_ahead: Sequence[Sequence[np.ndarray]] = ()) -> OneVsPool:
        """:func:`musc_edge.edge.scoring.msm.one_vs_pool` through the graph; ``keep`` leaves members out and
        ``look_ahead`` adds later parts as references (both averaged in numpy over the graph's distances)."""
        n_refs = pool.size if keep is None else int(keep.sum())
        result = self.score(query_sets, pool, interval_k(n_refs, fraction))
        if keep is not None or look_ahead:
            return pool_msm(result.dists, fraction, keep, look_ahead_distances(query_sets, look_ahead))
        closeness = np.sum([d.mean(axis=0, dtype=np.float64) for d in result.dists], axis=0) / len(result.dists)
        return OneVsPool(result.patch, closeness)


def numpy_score(query_sets: list[np.ndarray], pool, k: int) -> MsmOutput:
    """The reference: what :class:`PoolScorer` computes, in numpy."""
    dists = [patch_to_sample_distances(q, pool.work[s, :pool.size * pool.patches]) for s, q in enumerate(query_sets)]
    return MsmOutput(np.mean([interval_mean(d, k) for d in dists], axis=0).astype(np.float32), dists)


def make_scorer(backend: str, n_sets: int, patches: int, dim: int, capacity: int,
                threads: int | None = None) -> PoolScorer | None:
    """The scorer for ``backend`` (None: numpy, the pool's own code path)."""
    if backend == "numpy":
        return None
    if backend not in BACKENDS:
        raise ValueError(f"unknown scoring backend {backend!r}: expected 'auto' or one of {BACKENDS}")
    return PoolScorer(n_sets, patches, dim, capacity, backend.removeprefix("onnx-"), threads=threads)


_CHOICES: dict[tuple, tuple[str, dict[str, float]]] = {}


def choose_backend(n_sets: int, patches: int, dim: int, capacity: int,
                   candidates: tuple[str, ...] = EXACT_BACKENDS, repeat: int = 5) -> tuple[str, dict[str, float]]:
    """Time each candidate on a full pool of random unit vectors of this shape; (fastest, ms per candidate).

    Measured once per shape and process, at start-up, on this device: what is fastest differs between a
    VNNI x86 CPU, an ARM CPU and a GPU.
    """
    key = (n_sets, patches, dim, capacity, candidates)
    if key in _CHOICES:
        return _CHOICES[key]
    rng = np.random.default_rng(0)
    unit = lambda n: (lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True))(
        rng.normal(size=(n, patches, dim))).astype(np.float32)
    members, query = [unit(capacity) for _ in range(n_sets)], [u[0] for u in unit(1)[None].repeat(n_sets, 0)]
    # A full pool as the pool stores it (float16 members, a float32 working copy), one admission per slot.
    work = np.stack([m.astype(np.float16).astype(np.float32).reshape(capacity * patches, dim) for m in members])
    pool = FlatMembers(work, patches, capacity, np.arange(1, capacity + 1), [str(i) for i in range(capacity)])
    k = max(1, capacity * 3 // 10)
    times = {}
    for name in candidates:
        try:
            scorer = make_scorer(name, n_sets, patches, dim, capacity)
        except ImportError:  # no onnx package on this device: numpy only
            continue
        fn = (lambda: numpy_score(query, pool, k)) if scorer is None else (lambda s=scorer: s.score(query, pool, k))
        times[name] = 1e3 * time_backend(fn, repeat)
    _CHOICES[key] = (min(times, key=times.get), times)
    return _CHOICES[key]


def time_backend(fn, repeat: int = 5) -> float:
    """Median seconds of ``fn()`` after one warm-up call."""
    fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))
