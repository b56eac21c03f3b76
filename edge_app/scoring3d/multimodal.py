"""MuSc-V2 scoring of 3D or fused 2D+3D samples: batch (every sample vs all others) and one-vs-pool.

2D alone is scored by the core (:mod:`musc_edge.edge.scoring.musc`, the 2D pool), not here.

Per layer, MSM distances per modality (2D through the core's unit-vector shortcut, 3D as exact L2 because
SNAMD-3D features are not unit-norm; in 2D+3D mode both enhanced by CAE), interval average, mean over
layers. The 2D patch map is upsampled bilinearly to ``size x size``, the 3D centre scores are propagated to
pixels and blurred; the image score is the max of their plain sum, the fused map weighs each by the part's
own median patch score (``FusionParams.map_units``). Maps are returned on the frame's grid (a sample scored in
its canonical view is warped back, ``Sample3D.view``). Re-scoring (RsCon) uses the concatenated
"anomaly-salient" features [2D; 3D] of the salient layer (MuSc-V2 pipeline, ``muscv2.py``).

2D inputs are unit-norm patch features ``[P, D]`` per layer on an ``h x w`` grid for a ``size x size``
input (raster order), e.g. from :func:`musc_edge.edge.scoring.prepare`. 3D inputs are :class:`Sample3D`.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np

from ..pointcloud.descriptors import DEFAULT_SCALES, NORMAL_NEIGHBOURS, descriptor_layers
from ..pointcloud.fpfh import FPFH_NEIGHBOURS, fpfh, root_histograms
from ..pointcloud.fpfh import NORMAL_NEIGHBOURS as FPFH_NORMAL_NEIGHBOURS
from ..pointcloud.io import CloudError
from ..pointcloud.ipg import (CURVATURE_THRESHOLD, DEFAULT_GROUP_SIZE, DEFAULT_GROUPS, DEFAULT_K_ITER, MIN_POINTS,
                              Grouping,
                              group_points)
from ..pointcloud.pose import DEFAULT_MARGIN, frame_to_canonical, to_frame
from ..pointcloud.patches import bilinear_weights, box_degrees, cell_centres, covered_pixels, pool_to_grid
from ..pointcloud.preprocess import PreparedCloud, PreprocessParams, prepare_cloud
from ..scoring.aggregate import DEFAULT_DEGREES, l2_normalise
from ..scoring.maps import upsample
from ..scoring.msm import (DEFAULT_FRACTION, PoolTooSmallError, batch_distances, interval_k, interval_mean,
                           patch_to_sample_distances)
from ..scoring.rescore import DEFAULT_WINDOWS, rescore_batch
from .cae import cae, enhance_3d, projection
from .map3d import DEFAULT_SIGMA, Propagation, centre_map, propagation
from .snamd3d import nearest_centres, snamd3d

MODES = ("3d", "2d+3d")
TOKENS = ("fpfh", "groups")
POSES = ("axis", "none")
MAP_UNITS = ("part", "raw")
IMAGE_DISTANCES = ("euclidean", "hellinger")
DEFAULT_PATCH_PIXELS = 8   # 28 x 28 patches at 224 px, the 3D-AD FPFH baseline's grid
DEFAULT_PATCH_DEGREES = (1, 3, 5)


def patch_degrees(layers: int) -> tuple[int, ...]:
    """Default box sizes of ``layers`` FPFH layers: 1, 3, 5, ... patches."""
    return tuple(2 * i + 1 for i in range(layers))


@dataclass(frozen=True)
class Params3D:
    """How a cloud becomes a :class:`Sample3D`.

    ``tokens`` ``fpfh`` (default): per-point FPFH pooled over ``patch_pixels`` square patches, one layer per
    ``patch_degrees`` box size (the known training-free baseline, measured best on real scans);
    ``groups``: MuSc-V2's FPS/IPG groups with hand-crafted group descriptors at ``scales`` and SNAMD-3D.

    ``pose`` ``axis`` (default): the cloud and its image are scored in the part's canonical view
    (:mod:`musc_edge.edge.pointcloud.pose`: cropped to the part, turned to its principal axis, its extent
    times ``pose_margin`` filling the grid); ``none``: the whole frame, resized. FPFH runs on every
    ``point_stride``-th grid pixel in each direction (default: ``size // 112`` in the canonical view, about
    6,000 points of a part that fills it; ``size // 224`` on the whole frame).
    """

    size: int = 224
    tokens: str = "fpfh"
    pose: str = "axis"
    pose_margin: float = DEFAULT_MARGIN
    point_stride: int | None = None
    patch_pixels: int = DEFAULT_PATCH_PIXELS
    patch_degrees: tuple[int, ...] = DEFAULT_PATCH_DEGREES
    fpfh_neighbours: int = FPFH_NEIGHBOURS
    fpfh_normal_neighbours: int = FPFH_NORMAL_NEIGHBOURS
    n_groups: int = DEFAULT_GROUPS
    group_size: int = DEFAULT_GROUP_SIZE
    grouping: str = "ipg"                  # ipg | knn
    k_iter: int = DEFAULT_K_ITER
    tau: float = CURVATURE_THRESHOLD       # IPG and SNAMD-3D curvature gate
    degrees: tuple[int, ...] = DEFAULT_DEGREES
    scales: tuple[float, ...] = DEFAULT_SCALES
    normal_neighbours: int = NORMAL_NEIGHBOURS
    seed: int = 0
    preprocess: PreprocessParams = PreprocessParams()

    def __post_init__(self) -> None:
        if self.tokens not in TOKENS:
            raise ValueError(f"unknown 3D tokens {self.tokens!r}: expected one of {TOKENS}")
        if self.pose not in POSES:
            raise ValueError(f"unknown pose {self.pose!r}: expected one of {POSES}")

    @property
    def stride(self) -> int:
        """FPFH point stride on the grid."""
        if self.point_stride is not None:
            return self.point_stride
        return max(1, self.size // (112 if self.pose == "axis" else 224))


@dataclass(frozen=True)
class Sample3D:
    """What a pool keeps of one scanned part."""

    centres: np.ndarray         # [G, 3] normalised group centres
    centre_pixels: np.ndarray   # [G] raster pixel of each centre in the size x size grid
    group_pixels: np.ndarray    # [G, M] raster pixels of each group's members
    curvature: np.ndarray       # [G]
    layers: tuple[np.ndarray, ...]  # per layer [G, F] SNAMD-3D features, as scored by MSM
    propagation: Propagation    # centre scores -> pixel map
    view: np.ndarray | None = None  # [2, 3] frame's size x size grid -> scoring grid (canonical view)

    @property
    def size(self) -> int:
        return self.propagation.size


@dataclass(frozen=True)
class FusionParams:
    """Scoring settings (defaults: MuSc-V2's, but for ``map_units``).

    ``map_units`` (2d+3d) ``part`` (default): the fused map adds each modality's map in units of the part's own
    median patch score, so neither modality's distance scale drowns the other (2D distances are ~0.2, 3D
    ~15); the image score stays the maximum of MuSc-V2's plain sum. ``raw``: the map is that plain sum.

    ``image_distance`` ``hellinger``: the image score's 3D term compares the tokens as histograms, by Hellinger
    distance (:func:`~musc_edge.edge.pointcloud.fpfh.root_histograms`; FPFH tokens only), in a second MSM and
    CAE pass beside the map's Euclidean one; maps, 2D term and re-scoring features are unchanged.
    """

    mode: str = "2d+3d"                    # 3d | 2d+3d
    fraction: float = DEFAULT_FRACTION
    windows: tuple[int, ...] = DEFAULT_WINDOWS   # the core's default; MuSc-V2's RsCon is (1, 7)
    salient_layer: int = 1                 # 0-based; 1 = block 8 of blocks (4, 8, 12)
    sigma: float = DEFAULT_SIGMA           # 3D map blur, pixels at the 224 grid
    quantise_3d: bool = False              # reproduce the official 8-bit blur quirk
    map_units: str = "part"                # 2d+3d map: part | raw
    image_distance: str = "euclidean"      # the image score's 3D distance: euclidean | hellinger

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"unknown mode {self.mode!r}: expected one of {MODES}")
        if self.map_units not in MAP_UNITS:
            raise ValueError(f"unknown map_units {self.map_units!r}: expected one of {MAP_UNITS}")
        if self.image_distance not in IMAGE_DISTANCES:
            raise ValueError(f"unknown image_distance {self.image_distance!r}: expected one of {IMAGE_DISTANCES}")


@dataclass
class MultimodalBatch:
    maps: np.ndarray               # [N, size, size] final (fused) maps, on each frame's grid
    patch_2d: np.ndarray | None    # [N, h, w] 2D patch scores (scoring grid)
    centre_3d: np.ndarray | None   # [N, G] 3D centre scores
    raw: np.ndarray                # [N] image scores: max of each plain-sum map
    rescored: np.ndarray           # [N] after RsCon
    features: np.ndarray           # [N, F] salient features used by RsCon


@dataclass
class MultimodalResult:
    map: np.ndarray                # [size, size], on the frame's grid
    patch_2d: np.ndarray | None    # [h, w] (scoring grid)
    centre_3d: np.ndarray | None   # [G]
    raw: float                     # image score: max of the plain-sum map
    feature: np.ndarray            # [F] salient feature, for rescore_one


def sample_from_tokens(cloud: PreparedCloud, grouping: Grouping, tokens: Sequence[np.ndarray],
                       degrees: tuple[int, ...] = DEFAULT_DEGREES, tau: float = CURVATURE_THRESHOLD) -> Sample3D:
    """A :class:`Sample3D` from per-layer group tokens ``[G, F]`` (descriptors or Point-MAE blocks)."""
    neighbours = nearest_centres(grouping.centres, max(degrees))
    layers = tuple(snamd3d(t, grouping.centres, grouping.curvature, degrees, tau, neighbours) for t in tokens)
    prop = propagation(cloud.points, cloud.pixel_ids, grouping.centres, cloud.size)
    return Sample3D(grouping.centres, cloud.pixel_ids[grouping.centre_index], cloud.pixel_ids[grouping.groups],
                    grouping.curvature, layers, prop)


def thin_points(cloud: PreparedCloud, stride: int) -> tuple[np.ndarray, np.ndarray]:
    """``(points, pixel_ids)`` of the grid pixels whose row and column are multiples of ``stride``."""
    if stride <= 1:
        return cloud.points, cloud.pixel_ids
    rows, cols = np.divmod(cloud.pixel_ids, cloud.size)
    thin = (rows % stride == 0) & (cols % stride == 0)
    return cloud.points[thin], cloud.pixel_ids[thin]


def fpfh_sample(cloud: PreparedCloud, params: Params3D) -> Sample3D:
    """A :class:`Sample3D` whose "groups" are the cells of a square patch grid holding pooled FPFH.

    Every cell is a token (empty ones are zeros and match other parts' empty cells), so all parts of a
    grid have the same G. The map interpolates cell scores bilinearly over the cells the part touches.
    """
    size = cloud.size
    if params.patch_pixels < 1 or size % params.patch_pixels:
        raise ValueError(f"a {size}x{size} grid is not a whole number of {params.patch_pixels}-pixel patches")
    grid = size // params.patch_pixels
    stride = params.stride
    points, pixel_ids = thin_points(cloud, stride)
    if len(points) < MIN_POINTS:
        raise ValueError(f"too few foreground points for FPFH: {len(points)} < {MIN_POINTS}")
    sensor = -cloud.centroid / cloud.scale     # the camera, in the normalised frame of the points
    per_point = fpfh(points, params.fpfh_normal_neighbours, params.fpfh_neighbours, sensor=sensor)
    # a cell's mean over all its pixels, thinned ones included, on the scale of an unthinned grid
    tokens = pool_to_grid(per_point, pixel_ids, size, grid) * np.float32(stride * stride)
    layers = box_degrees(tokens, params.patch_degrees)
    centre_pixels = cell_centres(size, grid)
    rows, cols = np.divmod(centre_pixels, size)
    centres = np.stack([cols / size - 0.5, rows / size - 0.5, np.zeros(len(rows))], axis=1).astype(np.float32)
    cell = size // grid
    offsets = (np.arange(cell)[:, None] * size + np.arange(cell)[None, :]).ravel()
    group_pixels = (centre_pixels - (cell // 2) * (size + 1))[:, None] + offsets[None, :]
    support = covered_pixels(cloud.pixel_ids, size, grid)
    index, weight = bilinear_weights(support, size, grid)
    return Sample3D(centres, centre_pixels, group_pixels, np.zeros(len(centres), np.float32), tuple(layers),
                    Propagation(index, weight, support, size))


def group_sample(prepared: PreparedCloud, params: Params3D) -> Sample3D:
    """A :class:`Sample3D` of MuSc-V2's FPS/IPG point groups with hand-crafted descriptors and SNAMD-3D."""
    grouping = group_points(prepared.points, params.n_groups, params.group_size, params.grouping, params.k_iter,
                            params.tau, params.seed)
    tokens = descriptor_layers(prepared.points, grouping, params.scales, normal_neighbours=params.normal_neighbours)
    return sample_from_tokens(prepared, grouping, tokens, params.degrees, params.tau)


def sample_from_cloud(prepared: PreparedCloud, params: Params3D = Params3D(), source: str = "<cloud>") -> Sample3D:
    """A preprocessed cloud -> :class:`Sample3D` with ``params.tokens`` tokens (degenerate geometry raises
    :class:`CloudError` naming ``source``)."""
    try:
        sample = fpfh_sample(prepared, params) if params.tokens == "fpfh" else group_sample(prepared, params)
    except ValueError as exc:
        raise CloudError(f"{source}: {exc}") from exc
    if prepared.affine is None:
        return sample
    return replace(sample, view=frame_to_canonical(prepared.affine, prepared.foreground.shape, prepared.size))


def prepare_3d(cloud: np.ndarray, params: Params3D = Params3D(), source: str = "<cloud>") -> Sample3D:
    """Organised cloud ``[H, W, 3]`` (NaN = missing) -> :class:`Sample3D` with ``params.tokens`` tokens."""
    return sample_from_cloud(prepare_cloud(cloud, params.size, params.preprocess, source, pose_margin(params)),
                             params, source)


def pose_margin(params: Params3D) -> float | None:
    """What :func:`musc_edge.edge.pointcloud.prepare_cloud` takes for ``params.pose``."""
    return params.pose_margin if params.pose == "axis" else None


def stack_layers(samples: Sequence[Sample3D]) -> list[np.ndarray]:
    """Per layer ``[K, G, F]`` pool arrays (build once per pool change, not per scored part)."""
    if not samples:
        return []
    shapes = {tuple(layer.shape for layer in s.layers) for s in samples}
    if len(shapes) != 1:
        raise ValueError(f"3D samples differ in layer count or shape {sorted(shapes)}; "
                         "all samples of a pool need the same G and F")
    return [np.stack(layer) for layer in zip(*(s.layers for s in samples))]


def _augment(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``([x, 1], [-2 x, |x|^2])`` along the last axis: their product is ``|b|^2 - 2 a.b`` in one matmul."""
    shape = features.shape[:-1] + (features.shape[-1] + 1,)
    query, refs = np.ones(shape, dtype=np.float32), np.empty(shape, dtype=np.float32)
    query[..., :-1] = features
    np.multiply(features, -2.0, out=refs[..., :-1])
    refs[..., -1] = np.einsum("...f,...f->...", features, features)
    return query, refs


def compact_tokens(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``([..., C, F] tokens, [..., G] live)``: each sample's non-zero tokens first (in order), then zeros.

    Cells off the part are all-zero tokens, most of an FPFH patch grid. For nearest-token distances a sample
    needs its live tokens and one zero token (if it has any): ``C`` is the largest live count plus one (at most
    ``G``), so every sample keeps all its live tokens and, where it has empty cells, at least one zero.
    """
    live = features.any(axis=-1)
    g = features.shape[-2]
    c = min(int(live.sum(axis=-1).max(initial=0)) + 1, g)
    order = np.argsort(~live, axis=-1, kind="stable")[..., :c]
    return np.take_along_axis(features, order[..., None], axis=-2), live


def euclidean_sample_distances(query: np.ndarray, refs: np.ndarray) -> np.ndarray:
    """``[G, K]`` exact L2 distance of each query group to its nearest group in each of ``refs [K, G', F]``.

    SNAMD-3D features are not unit-norm (flat groups are pooled and not re-normalised), so the unit-vector shortcut
    of :func:`musc_edge.edge.scoring.msm.patch_to_sample_distances` does not apply. One matrix product of
    augmented vectors still gives ``|b|^2 - 2 a.b`` for all pairs; ``|a|^2`` is added after the minimum.
    Only live (non-zero) tokens enter the product (:func:`compact_tokens`); an empty query cell's distance
    is the norm of the reference's smallest token (0 where the reference has an empty cell too).
    """
    k = refs.shape[0]
    if k < 1:
        raise PoolTooSmallError("no reference samples to score against")
    refs, _ = compact_tokens(refs)
    _, r = _augment(refs.reshape(-1, refs.shape[-1]))
    out = np.empty((query.shape[0], k), dtype=np.float32)
    out[:] = r[:, -1].reshape(k, -1).min(axis=1)
    live = query.any(axis=1)
    if live.any():
        tokens = query[live]
        q, _ = _augment(tokens)
        best = (q @ r.T).reshape(len(q), k, refs.shape[1]).min(axis=2)
        out[live] = best + np.einsum("ij,ij->i", tokens, tokens)[:, None]
    return np.sqrt(np.maximum(out, 0.0), out=out)


def batch_euclidean_distances(features: np.ndarray, chunk: int = 8) -> np.ndarray:
    """``[N, G, N]`` exact L2 group-to-sample distances of every sample against every other (diagonal inf).

    Each pair (i, j) is computed once on live tokens (:func:`compact_tokens`): ``|a_i - b_j|^2`` from one
    augmented product, row minima score i against j and column minima j against i.
    """
    n, g, f = features.shape
    if n < 2:
        raise PoolTooSmallError(f"batch scoring needs at least 2 samples, got {n}")
    tokens, live = compact_tokens(features)
    c = tokens.shape[1]
    query, refs = _augment(tokens)
    sq = refs[..., -1]
    best_live = np.full((n, c, n), np.inf, dtype=np.float32)
    for i in range(n - 1):
        for start in range(i + 1, n, chunk):
            stop = min(start + chunk, n)
            partial = (query[i] @ refs[start:stop].reshape(-1, f + 1).T).reshape(c, stop - start, c)
            partial += sq[i][:, None, None]                      # now |a - b|^2 for every pair
            best_live[i, :, start:stop] = partial.min(axis=2)
            best_live[start:stop, :, i] = partial.min(axis=0)
    best = np.empty((n, g, n), dtype=np.float32)
    best[:] = sq.min(axis=1)                 # empty cells: the reference's smallest token
    for i in range(n):
        rows = np.flatnonzero(live[i])
        best[i, rows] = best_live[i, :len(rows)]
        best[i, :, i] = np.inf
    return np.sqrt(np.maximum(best, 0.0), out=best)


def _layer_count(mode: str, layers_2d: Sequence | None, layers_3d: Sequence | None) -> int:
    need_2d = mode == "2d+3d"
    if need_2d and not layers_2d:
        raise ValueError(f"mode {mode!r} needs 2D features")
    if not layers_3d:
        raise ValueError(f"mode {mode!r} needs 3D samples")
    if need_2d and len(layers_2d) != len(layers_3d):
        raise ValueError(f"2D has {len(layers_2d)} layers but 3D has {len(layers_3d)}; CAE pairs them")
    return len(layers_3d)


def _salient_index(params: FusionParams, n_layers: int) -> int:
    if not -n_layers <= params.salient_layer < n_layers:
        raise ValueError(f"salient_layer {params.salient_layer} out of range for {n_layers} layers")
    return params.salient_layer


def _check_size(size: int, grid: tuple[int, int] | None, p: int | None, samples: Sequence[Sample3D]) -> None:
    if p is not None and (grid is None or grid[0] * grid[1] != p):
        raise ValueError(f"{p} 2D patches do not fill the patch grid {grid}")
    bad = {s.size for s in samples} - {size}
    if bad:
        raise ValueError(f"3D samples were prepared for a {sorted(bad)} grid but scoring uses {size}x{size}")


def _salient_feature(parts: list[np.ndarray]) -> np.ndarray:
    """Concatenation of unit salient features, scaled to unit norm."""
    return np.concatenate([l2_normalise(p) for p in parts], axis=-1) / np.sqrt(len(parts))


def typical_score(scores: np.ndarray) -> np.ndarray:
    """``[N]`` median of each row of ``scores [N, P]`` over its non-zero entries (1 where none is).

    A part's median patch score is its typical distance to the pool: what the whole part shares (the
    modality's units, pose, lighting), not the defect.
    """
    masked = np.where(scores > 0, scores, np.nan)
    with np.errstate(all="ignore"):
        typical = np.nanmedian(masked, axis=1) if np.isfinite(masked).any() else np.ones(len(scores))
    return np.where(np.isfinite(typical) & (typical > 0), typical, 1.0).astype(np.float32)


def _centre_maps(centre_3d: np.ndarray, samples_3d: Sequence[Sample3D], params: FusionParams) -> np.ndarray:
    return np.stack([centre_map(centre_3d[i], s.propagation, params.sigma, params.quantise_3d)
                     for i, s in enumerate(samples_3d)])


def _maps(patch_2d: np.ndarray | None, centre_3d: np.ndarray | None, samples_3d: Sequence[Sample3D] | None,
          grid: tuple[int, int] | None, size: int, params: FusionParams,
          image_centre_3d: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``([N, size, size] maps on each frame's grid, [N] image scores)`` from per-sample patch scores.

    The image score is the maximum of the plain sum of the modality maps (MuSc-V2), its 3D term from
    ``image_centre_3d`` where given (``image_distance`` hellinger); with ``map_units`` ``part`` the map that is
    returned weighs each modality by the part's own typical score instead.
    """
    n = len(patch_2d if patch_2d is not None else centre_3d)
    map_2d = None if patch_2d is None else upsample(patch_2d.reshape(n, *grid), (size, size))
    modality_maps = [] if map_2d is None else [(map_2d, patch_2d)]
    if centre_3d is not None:
        modality_maps.append((_centre_maps(centre_3d, samples_3d, params), centre_3d))
    plain = sum(m for m, _ in modality_maps)
    image = plain
    if image_centre_3d is not None:
        image = _centre_maps(image_centre_3d, samples_3d, params)
        if map_2d is not None:
            image += map_2d
    raw = image.reshape(n, -1).max(axis=1)
    maps = plain
    if len(modality_maps) == 2 and params.map_units == "part":
        maps = sum(m / typical_score(scores)[:, None, None] for m, scores in modality_maps)
    if samples_3d is not None and centre_3d is not None:
        maps = np.stack([to_frame(m, s.view) for m, s in zip(maps, samples_3d)])
    return maps, raw


def score_batch(sets_2d: Sequence[np.ndarray] | None, samples_3d: Sequence[Sample3D] | None,
                grid: tuple[int, int] | None, size: int, params: FusionParams = FusionParams()) -> MultimodalBatch:
    """Every sample scored against all the others. ``sets_2d[l]`` is ``[N, P, D]``; ``samples_3d`` has N items."""
    layers_3d = stack_layers(samples_3d) if samples_3d is not None else None
    layers_2d = list(sets_2d) if sets_2d is not None and params.mode == "2d+3d" else None
    n_layers = _layer_count(params.mode, layers_2d, layers_3d)
    n = (layers_2d or layers_3d)[0].shape[0]
    if layers_2d and layers_3d and layers_3d[0].shape[0] != n:
        raise ValueError(f"{n} 2D samples but {layers_3d[0].shape[0]} 3D samples")
    if n < 2:
        raise PoolTooSmallError(f"batch scoring needs at least 2 samples, got {n}")
    _check_size(size, grid, layers_2d[0].shape[1] if layers_2d else None, samples_3d if layers_3d else ())
    k = interval_k(n - 1, params.fraction)
    patch_2d = np.zeros((n, layers_2d[0].shape[1]), dtype=np.float32) if layers_2d else None
    centre_3d = np.zeros((n, layers_3d[0].shape[1]), dtype=np.float32) if layers_3d else None
    fused = layers_2d is not None and layers_3d is not None
    if fused:
        others = np.array([np.delete(np.arange(n), i) for i in range(n)])
        projections = [projection(s.centre_pixels, size, grid) for s in samples_3d]
    hellinger = layers_3d is not None and params.image_distance == "hellinger"
    image_3d = np.zeros_like(centre_3d) if hellinger else None   # the image score's 3D term
    for layer in range(n_layers):
        d2 = batch_distances(layers_2d[layer]) if layers_2d else None              # [N, P, N], self = inf
        d3 = batch_euclidean_distances(layers_3d[layer]) if layers_3d else None    # [N, G, N]
        h3 = batch_euclidean_distances(root_histograms(layers_3d[layer])) if hellinger else None
        if fused:   # CAE needs each query's own N-1 reference columns
            for i in range(n):
                e2, e3 = cae(d2[i][:, others[i]], d3[i][:, others[i]], projections[i])
                patch_2d[i] += interval_mean(e2, k)
                centre_3d[i] += interval_mean(e3, k)
                if hellinger:
                    image_3d[i] += interval_mean(enhance_3d(d2[i][:, others[i]], h3[i][:, others[i]],
                                                            projections[i]), k)
        else:
            centre_3d += interval_mean(d3, k)   # the inf self-distance sorts last
            if hellinger:
                image_3d += interval_mean(h3, k)
    parts = []
    rows = np.arange(n)
    salient = _salient_index(params, n_layers)
    if patch_2d is not None:
        patch_2d /= n_layers
        parts.append(layers_2d[salient][rows, patch_2d.argmax(axis=1)])
    if centre_3d is not None:
        centre_3d /= n_layers
        parts.append(layers_3d[salient][rows, centre_3d.argmax(axis=1)])
    maps, raw = _maps(patch_2d, centre_3d, samples_3d if layers_3d else None, grid, size, params,
                      None if image_3d is None else image_3d / n_layers)
    features = _salient_feature(parts)
    return MultimodalBatch(maps, None if patch_2d is None else patch_2d.reshape(n, *grid), centre_3d, raw,
                           rescore_batch(raw, features, params.windows), features)


def score_one(query_2d: Sequence[np.ndarray] | None, query_3d: Sample3D | None,
              pool_2d: Sequence[np.ndarray] | None, pool_3d: Sequence[np.ndarray] | None,
              grid: tuple[int, int] | None, size: int, params: FusionParams = FusionParams()) -> MultimodalResult:
    """One sample against a pool.

    ``query_2d[l]`` is ``[P, D]`` and ``pool_2d[l]`` ``[K, P, D]``; ``pool_3d`` is :func:`stack_layers` of
    the pool's samples (``[K, G, F]`` per layer). Pass None for a modality the mode does not use.
    """
    use_2d, use_3d = params.mode == "2d+3d", True
    pool_2d = list(pool_2d) if use_2d and pool_2d is not None else None
    pool_3d = list(pool_3d) if pool_3d is not None else None
    n_layers = _layer_count(params.mode, pool_2d, pool_3d)
    if use_3d and query_3d is None:
        raise ValueError(f"mode {params.mode!r} needs the query's 3D sample")
    if use_2d and (query_2d is None or len(query_2d) != n_layers):
        raise ValueError(f"mode {params.mode!r} needs {n_layers} 2D query layers")
    if use_3d and len(query_3d.layers) != n_layers:
        raise ValueError(f"query has {len(query_3d.layers)} 3D layers, pool has {n_layers}")
    pool_size = (pool_2d if use_2d else pool_3d)[0].shape[0]
    if use_2d and use_3d and pool_3d[0].shape[0] != pool_size:
        raise ValueError(f"2D pool has {pool_size} samples but 3D pool has {pool_3d[0].shape[0]}")
    if pool_size < 1:
        raise PoolTooSmallError("one-vs-pool scoring needs at least 1 pool sample, got 0")
    _check_size(size, grid, query_2d[0].shape[0] if use_2d else None, [query_3d] if use_3d else ())
    k = interval_k(pool_size, params.fraction)
    patch_2d = np.zeros(query_2d[0].shape[0], dtype=np.float32) if use_2d else None
    centre_3d = np.zeros(query_3d.layers[0].shape[0], dtype=np.float32) if use_3d else None
    proj = projection(query_3d.centre_pixels, size, grid) if use_2d and use_3d else None
    image_3d = np.zeros_like(centre_3d) if params.image_distance == "hellinger" else None
    for layer in range(n_layers):
        d2 = patch_to_sample_distances(query_2d[layer], pool_2d[layer]) if use_2d else None
        d3 = euclidean_sample_distances(query_3d.layers[layer], pool_3d[layer]) if use_3d else None
        if image_3d is not None:
            h3 = euclidean_sample_distances(root_histograms(query_3d.layers[layer]), root_histograms(pool_3d[layer]))
            image_3d += interval_mean(h3 if proj is None else enhance_3d(d2, h3, proj), k)
        if proj is not None:
            d2, d3 = cae(d2, d3, proj)
        if use_2d:
            patch_2d += interval_mean(d2, k)
        if use_3d:
            centre_3d += interval_mean(d3, k)
    parts = []
    salient = _salient_index(params, n_layers)
    if use_2d:
        patch_2d /= n_layers
        parts.append(query_2d[salient][patch_2d.argmax()])
    if use_3d:
        centre_3d /= n_layers
        parts.append(query_3d.layers[salient][centre_3d.argmax()])
    maps, raw = _maps(None if patch_2d is None else patch_2d[None], None if centre_3d is None else centre_3d[None],
                      [query_3d] if use_3d else None, grid, size, params,
                      None if image_3d is None else image_3d[None] / n_layers)
    return MultimodalResult(maps[0], None if patch_2d is None else patch_2d.reshape(grid), centre_3d,
                            float(raw[0]), _salient_feature(parts))
