"""Per-stage timings of the 3D / 2D+3D path for one part (prints figures; asserts nothing).

Default (``--tokens fpfh``): preprocessing (plane, cluster, resize), kNN, normals, SPFH/FPFH descriptors,
pooling to the 28 x 28 patch grid (with the box-mean layers) and the map set-up; then one-vs-pool scoring:
3D MSM alone, 2D MSM (random unit features in the default model's shapes, 16x16 x 384, two layers; --vit-b8
for MuSc-V2's 28x28 x 768, three), CAE, fusion and the 3D map.
``--tokens groups``: MuSc-V2's FPS/IPG groups with group descriptors and SNAMD-3D instead. ``--cloud`` takes
a real organised scan (an MVTec 3D-AD ``xyz/NNN.tiff``) instead of a synthetic one; with its image
(``rgb/NNN.png`` beside it) and the default feature model present, the last row is one whole 2D+3D part as the
line prepares and scores it: preprocessing and canonical view, FPFH, the 2D features of the warped image
(ONNX Runtime) and score_one.

Every stage that changed for speed (issue 22) is timed twice in the same run, today's code and the code before
it (:func:`todays_path` swaps in the reference implementations kept below), with the ratio before / now; the
features and planes of both are the same bit for bit (tests/test_pointcloud.py). The whole part before ran the
2D features after the FPFH; now they run on a second thread while the FPFH is computed
(``recipe_scan.prepare_scan_with``).
"""
from __future__ import annotations

import argparse
import importlib
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from scipy.spatial import cKDTree

from musc_edge.edge.evaluation.runner import DEFAULT_BLOCKS, select_layers
from musc_edge.edge.features import FeatureEngine, select_model
from musc_edge.edge.mediaio import read_image
from musc_edge.edge.pointcloud import box_degrees, descriptor_layers, group_points, pool_to_grid, prepare_cloud, read_cloud
from musc_edge.edge.pointcloud.fpfh import FPFH_BINS, FPFH_DIM, fpfh, knn, pca_normals
from musc_edge.edge.runtime.recipes.recipe_scan import prepare_scan, prepare_scan_with
from musc_edge.edge.scoring import l2_normalise, patch_to_sample_distances
from musc_edge.edge.scoring.musc import MuscParams, prepare
from musc_edge.edge.scoring3d import (FusionParams, Params3D, cae, centre_map, euclidean_sample_distances, fpfh_sample,
                                prepare_3d, projection, sample_from_tokens, score_one, stack_layers)
from musc_edge.edge.scoring3d.multimodal import pose_margin, thin_points
from musc_edge.edge.synthetic3d import generate_set

SIZE = 224
# the modules themselves (the package re-exports functions of the same names)
fpfh_module = importlib.import_module("musc_edge.edge.pointcloud.fpfh")
preprocess_module = importlib.import_module("musc_edge.edge.pointcloud.preprocess")
DEFAULT_MODEL = Path(__file__).resolve().parents[1] / "models" / "dinov2_vits14_musc.onnx"
# 2D side as the app's defaults score it: DINOv2 ViT-S/14 at 224 px (16 x 16 x 384), blocks 6 and 9
# (--vit-b8 for MuSc-V2's DINO ViT-B/8: 28 x 28 x 768, three blocks).
DEFAULT_2D, VIT_B8 = ((16, 16), 384, 2), ((28, 28), 768, 3)


# -- the implementations before issue 22 (same results; kept to time today's code against) --------------------------
def reference_spfh(points: np.ndarray, normals: np.ndarray, neighbours: np.ndarray) -> np.ndarray:
    """SPFH over all pairs at once (the same closed form as ``fpfh.spfh``, without blocks)."""
    n, k = neighbours.shape
    pts, nrm = points.astype(np.float32, copy=False), normals.astype(np.float32, copy=False)
    dst = neighbours[:, 1:]
    d = [pts[dst, i] - pts[:, i, None] for i in range(3)]
    length = np.sqrt(d[0] * d[0] + d[1] * d[1] + d[2] * d[2])
    inv = 1.0 / np.maximum(length, np.float32(1e-30))
    n1 = [nrm[:, i, None] for i in range(3)]
    n2 = [nrm[dst, i] for i in range(3)]
    a1 = (n1[0] * d[0] + n1[1] * d[1] + n1[2] * d[2]) * inv
    a2 = (n2[0] * d[0] + n2[1] * d[1] + n2[2] * d[2]) * inv
    c = n1[0] * n2[0] + n1[1] * n2[1] + n1[2] * n2[2]
    det = (d[0] * (n1[1] * n2[2] - n1[2] * n2[1]) + d[1] * (n1[2] * n2[0] - n1[0] * n2[2])
           + d[2] * (n1[0] * n2[1] - n1[1] * n2[0])) * inv
    swap = np.abs(a1) < np.abs(a2)
    a = np.where(swap, a2, a1)
    phi = np.where(swap, -a2, a1)
    r = np.sqrt(np.maximum(1.0 - a * a, 0.0))
    alpha = det / np.maximum(r, np.float32(1e-30))
    theta = np.arctan2(np.where(swap, a2 * c - a1, a2 - a1 * c), c * r)
    degenerate = (r <= 1e-7) | (length == 0)
    base = np.arange(n)[:, None] * FPFH_DIM
    bins = []
    for block, (values, lo, hi) in enumerate(((theta, -np.pi, np.pi), (alpha, -1.0, 1.0), (phi, -1.0, 1.0))):
        values[degenerate] = 0.0
        binned = np.clip(np.floor(FPFH_BINS * (values - lo) / (hi - lo)), 0, FPFH_BINS - 1).astype(np.int64)
        bins.append((base + block * FPFH_BINS + binned).ravel())
    hist = np.bincount(np.concatenate(bins), minlength=n * FPFH_DIM)
    return hist.reshape(n, FPFH_DIM) * (100.0 / (k - 1))


def reference_fit_plane_ransac(points: np.ndarray, threshold: float, iterations: int = 1000, sample: int = 1024,
                               seed: int = 0) -> tuple[np.ndarray, float]:
    """RANSAC scoring hypotheses as columns of one large block (the same plane as ``fit_plane_ransac``)."""
    rng = np.random.default_rng(seed)
    pts = points.astype(np.float64, copy=False)
    scored = pts if pts.shape[0] <= sample else pts[rng.choice(pts.shape[0], sample, replace=False)]
    triples = scored[rng.integers(0, scored.shape[0], size=(iterations, 3))]
    normals = np.cross(triples[:, 1] - triples[:, 0], triples[:, 2] - triples[:, 0])
    lengths = np.linalg.norm(normals, axis=1)
    usable = lengths > 1e-12
    normals = normals[usable] / lengths[usable, None]
    offsets = -np.einsum("ij,ij->i", normals, triples[usable, 0])
    counts = np.empty(normals.shape[0], dtype=np.int64)
    chunk = max(1, 2**22 // scored.shape[0])
    for start in range(0, normals.shape[0], chunk):
        dist = np.abs(scored @ normals[start:start + chunk].T + offsets[start:start + chunk])
        counts[start:start + chunk] = (dist < threshold).sum(axis=0)
    best = int(counts.argmax())
    inliers = pts[np.abs(pts @ normals[best] + offsets[best]) < threshold]
    centre = inliers.mean(axis=0)
    normal = np.linalg.svd(inliers - centre, full_matrices=False)[2][-1]
    return normal, float(-normal @ centre)


def reference_valid_mask(cloud: np.ndarray) -> np.ndarray:
    return np.isfinite(cloud).all(axis=-1)


@contextmanager
def todays_path():
    """Within the block, the pipeline runs the implementations before issue 22 (module functions swapped)."""
    swaps = [(fpfh_module, "spfh", reference_spfh),
             (preprocess_module, "fit_plane_ransac", reference_fit_plane_ransac),
             (preprocess_module, "valid_mask", reference_valid_mask)]
    saved = [(module, name, getattr(module, name)) for module, name, _ in swaps]
    for module, name, function in swaps:
        setattr(module, name, function)
    try:
        yield
    finally:
        for module, name, function in saved:
            setattr(module, name, function)


def timeit(fn, repeat: int) -> tuple[float, object]:
    """Median milliseconds over ``repeat`` runs (after one warm-up) and the last result."""
    result = fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times) * 1e3), result


def both(fn, repeat: int, fn_before=None) -> tuple[float, float, object]:
    """(median ms before, median ms now, result now): ``fn_before`` (default ``fn``) with the implementations
    before issue 22 and ``fn`` with today's, alternating, so that both meet the same load from other work."""
    fn_before = fn_before or fn
    with todays_path():
        fn_before()
    result = fn()
    before, now = [], []
    for _ in range(repeat):
        with todays_path():
            t0 = time.perf_counter()
            fn_before()
            before.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        result = fn()
        now.append(time.perf_counter() - t0)
    return float(np.median(before) * 1e3), float(np.median(now) * 1e3), result


def whole_part(cloud: np.ndarray, image: np.ndarray, params: Params3D, pool_3d: list[np.ndarray], pool: int,
               repeat: int, model: Path = DEFAULT_MODEL) -> list[tuple[str, float, float]]:
    """One 2D+3D part as the line runs it with ``model`` configured: rows for the 2D features and the total
    (before: the 2D features of ``model`` itself after the FPFH, the implementations before issue 22; now: as
    ``ScanRecipe.prepare``, with the model the line runs for it, ``select_model``: its cut when one is beside
    it). The two paths' tokens agree to float rounding (a model cut earlier fuses other kernels), so their
    scores are compared to 1e-4 relative."""
    engines = {"before": FeatureEngine(model, size=SIZE),
               "now": FeatureEngine(select_model(model, DEFAULT_BLOCKS), size=SIZE)}

    def sets_of(engine: FeatureEngine, image_c: np.ndarray) -> list[np.ndarray]:
        layers = select_layers(engine([image_c], 1), engine.manifest.blocks, DEFAULT_BLOCKS)
        return prepare(layers, engine.grid, MuscParams())

    warped = prepare_scan(cloud, image, params, True, "bench")[1]
    t_features = {when: timeit(lambda e=engine: e([warped], 1), repeat)[0] for when, engine in engines.items()}
    grid = engines["now"].grid
    # the pool: the view flipped upside down, so that no distance sits at float32's noise floor (a part against
    # copies of itself scores ~0, where 1e-6 in the tokens moves the score by percents)
    pool_2d = [np.repeat(s, pool, axis=0) for s in sets_of(engines["now"], np.ascontiguousarray(warped[::-1]))]

    def part_before() -> object:
        query, image_c = prepare_scan(cloud, image, params, True, "bench")
        query_2d = [s[0] for s in sets_of(engines["before"], image_c)]
        return score_one(query_2d, query, pool_2d, pool_3d, grid, SIZE, FusionParams())

    def part_now() -> object:
        query, sets = prepare_scan_with(cloud, image, params, True, "bench",
                                        lambda image_c: sets_of(engines["now"], image_c))
        return score_one([s[0] for s in sets], query, pool_2d, pool_3d, grid, SIZE, FusionParams())

    with todays_path():
        before = part_before()
    t_before, t_now, now = both(part_now, repeat, part_before)
    if not np.isclose(before.raw, now.raw, rtol=1e-4, atol=0):
        raise AssertionError(f"the whole part scores {now.raw} now but {before.raw} before")
    ran = "configured -> its cut" if engines["now"].model_path != engines["before"].model_path else model.stem
    return [(f"2D features ({ran}, ONNX Runtime)", t_features["before"], t_features["now"]),
            ("one 2D+3D part: preprocess + FPFH + 2D + score", t_before, t_now)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--pool", type=int, default=20)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--grouping", choices=("ipg", "knn"), default="ipg")
    parser.add_argument("--tokens", choices=("fpfh", "groups"), default="fpfh")
    parser.add_argument("--vit-b8", action="store_true", help="2D shapes of MuSc-V2's ViT-B/8 (3 layers)")
    parser.add_argument("--cloud", help="a real organised scan (.tiff) to time instead of a synthetic one")
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL,
                        help="2D feature model of the whole-part rows, as a line config names it (default: the "
                             "line's default; the line runs its cut beside it, blocks 6 and 9 without 10-12)")
    args = parser.parse_args()
    grid_2d, dim_2d, layers = VIT_B8 if args.vit_b8 else DEFAULT_2D
    params = Params3D(size=SIZE, grouping=args.grouping, tokens=args.tokens, scales=(0.25, 0.5, 1.0)[-layers:],
                      patch_degrees=(1, 3, 5)[:layers])
    data = generate_set(args.pool + 1, seed=0, size=SIZE)
    clouds = data.clouds if args.cloud is None else [read_cloud(args.cloud)] * (args.pool + 1)
    cloud = clouds[0]

    rows: list[tuple[str, float | None, float]] = []   # (stage, ms before issue 22 or None: unchanged, ms now)

    def row(name: str, fn, changed: bool = False) -> object:
        if changed:
            before, now, result = both(fn, args.repeat)
        else:
            (now, result), before = timeit(fn, args.repeat), None
        rows.append((name, before, now))
        return result

    prepared = row(f"preprocess (plane, cluster, {params.pose} view, normalise)",
                   lambda: prepare_cloud(cloud, SIZE, params.preprocess, pose_margin=pose_margin(params)), True)
    if args.tokens == "fpfh":
        pts, pixel_ids = thin_points(prepared, params.stride)
        dist2, index = row(f"kNN ({params.fpfh_neighbours} nearest, KD-tree)",
                           lambda: knn(pts, params.fpfh_neighbours, cKDTree(pts)))
        sensor = -prepared.centroid / prepared.scale
        normals = row(f"normals (PCA of {params.fpfh_normal_neighbours} nearest)",
                      lambda: pca_normals(pts, index[:, :params.fpfh_normal_neighbours], sensor))
        row("SPFH (Darboux angles, histograms)", lambda: fpfh_module.spfh(pts, normals, index), True)
        per_point = row("FPFH end to end (kNN + normals + SPFH + mixing)",
                        lambda: fpfh(pts, params.fpfh_normal_neighbours, params.fpfh_neighbours, sensor), True)
        row(f"pooling to the patch grid + box layers {params.patch_degrees}",
            lambda: box_degrees(pool_to_grid(per_point, pixel_ids, SIZE, SIZE // params.patch_pixels),
                                params.patch_degrees))
        query = row("3D sample end to end (FPFH + pooling + map set-up)", lambda: fpfh_sample(prepared, params), True)
    else:
        grouping = row(f"grouping ({params.grouping}, FPS + kNN + curvature)",
                       lambda: group_points(prepared.points, params.n_groups, params.group_size, params.grouping,
                                            params.k_iter, params.tau, params.seed))
        tokens = row("descriptors (normals + 3 scales)",
                     lambda: descriptor_layers(prepared.points, grouping, params.scales,
                                               normal_neighbours=params.normal_neighbours))
        query = row("SNAMD-3D + map set-up",
                    lambda: sample_from_tokens(prepared, grouping, tokens, params.degrees, params.tau))
    row("prepare_3d end to end (all of the above)", lambda: prepare_3d(cloud, params), True)

    pool_3d = stack_layers([prepare_3d(c, params) for c in clouds[1:]])
    rng = np.random.default_rng(0)
    p = grid_2d[0] * grid_2d[1]
    query_2d = [l2_normalise(rng.normal(size=(p, dim_2d))).astype(np.float32) for _ in range(layers)]
    pool_2d = [l2_normalise(rng.normal(size=(args.pool, p, dim_2d))).astype(np.float32) for _ in range(layers)]

    d3 = row(f"3D MSM distances, {layers} layers",
             lambda: [euclidean_sample_distances(q, r) for q, r in zip(query.layers, pool_3d)])
    d2 = row(f"2D MSM distances, {layers} layers ({p} x {dim_2d})",
             lambda: [patch_to_sample_distances(q, r) for q, r in zip(query_2d, pool_2d)])
    proj = projection(query.centre_pixels, SIZE, grid_2d)
    row(f"CAE, {layers} layers", lambda: [cae(a, b, proj) for a, b in zip(d2, d3)])
    row("3D map (3-NN propagation + blur)", lambda: centre_map(d3[0].mean(axis=1), query.propagation))
    for mode in ("3d", "2d+3d"):
        for distance in ("euclidean", "hellinger") if args.tokens == "fpfh" else ("euclidean",):
            fusion = FusionParams(mode=mode, image_distance=distance)
            row(f"score_one end to end, mode {mode}" + (", hellinger image" if distance == "hellinger" else ""),
                lambda fusion=fusion: score_one(query_2d, query, pool_2d, pool_3d, grid_2d, SIZE, fusion))
    image_path = None if args.cloud is None else Path(args.cloud).parent.parent / "rgb" / (Path(args.cloud).stem + ".png")
    if image_path is not None and image_path.is_file() and args.model.is_file() and not args.vit_b8:
        rows += whole_part(cloud, read_image(image_path), params, pool_3d, args.pool, args.repeat, args.model)

    print(f"3D / 2D+3D path ({args.tokens} tokens), one part: {SIZE}x{SIZE}, G={query.centres.shape[0]}, "
          f"M={query.group_pixels.shape[1]}, {len(prepared.points)} foreground points on the grid, "
          f"{len(pts) if args.tokens == 'fpfh' else len(prepared.points)} described, pool {args.pool} "
          f"(numpy on CPU, median of {args.repeat})")
    print(f"  {'stage':<50} {'before':>8} {'now':>8} {'before/now':>11}")
    for name, before, now in rows:
        if before is None:
            print(f"  {name:<50} {'':>8} {now:8.1f} {'unchanged':>11}")
        else:
            print(f"  {name:<50} {before:8.1f} {now:8.1f} {before / now:10.2f}x")
    print("  ms, median; before: the implementations before issue 22 (same results; the whole part's tokens to "
          "float rounding), timed in this run")


if __name__ == "__main__":
    main()
