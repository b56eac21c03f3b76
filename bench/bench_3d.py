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
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from scipy.spatial import cKDTree

from musc_edge.edge.evaluation.runner import DEFAULT_BLOCKS, select_layers
from musc_edge.edge.features import FeatureEngine
from musc_edge.edge.mediaio import read_image
from musc_edge.edge.pointcloud import box_degrees, descriptor_layers, group_points, pool_to_grid, prepare_cloud, read_cloud
from musc_edge.edge.pointcloud.fpfh import fpfh, knn, pca_normals, spfh
from musc_edge.edge.runtime.recipes.recipe_scan import prepare_scan
from musc_edge.edge.scoring import l2_normalise, patch_to_sample_distances
from musc_edge.edge.scoring.musc import MuscParams, prepare
from musc_edge.edge.scoring3d import (FusionParams, Params3D, cae, centre_map, euclidean_sample_distances, fpfh_sample,
                                prepare_3d, projection, sample_from_tokens, score_one, stack_layers)
from musc_edge.edge.scoring3d.multimodal import pose_margin, thin_points
from musc_edge.edge.synthetic3d import generate_set

SIZE = 224
DEFAULT_MODEL = Path(__file__).resolve().parents[1] / "models" / "dinov2_vits14_musc.onnx"
# 2D side as the app's defaults score it: DINOv2 ViT-S/14 at 224 px (16 x 16 x 384), blocks 6 and 9
# (--vit-b8 for MuSc-V2's DINO ViT-B/8: 28 x 28 x 768, three blocks).
DEFAULT_2D, VIT_B8 = ((16, 16), 384, 2), ((28, 28), 768, 3)


def timeit(fn, repeat: int) -> tuple[float, object]:
    """Median milliseconds over ``repeat`` runs (after one warm-up) and the last result."""
    result = fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times) * 1e3), result


def whole_part(cloud: np.ndarray, image: np.ndarray, params: Params3D, pool_3d: list[np.ndarray], pool: int,
               repeat: int) -> list[tuple[str, float]]:
    """One 2D+3D part as the line runs it, with the default model: rows for the 2D features and the total."""
    engine = FeatureEngine(DEFAULT_MODEL, size=SIZE)

    def sets_of(image_c: np.ndarray) -> list[np.ndarray]:
        layers = select_layers(engine([image_c], 1), engine.manifest.blocks, DEFAULT_BLOCKS)
        return prepare(layers, engine.grid, MuscParams())

    warped = prepare_scan(cloud, image, params, True, "bench")[1]
    t_features, _ = timeit(lambda: engine([warped], 1), repeat)
    pool_2d = [np.repeat(s, pool, axis=0) for s in sets_of(warped)]

    def part() -> object:
        query, image_c = prepare_scan(cloud, image, params, True, "bench")
        query_2d = [s[0] for s in sets_of(image_c)]
        return score_one(query_2d, query, pool_2d, pool_3d, engine.grid, SIZE, FusionParams())
    t_part, _ = timeit(part, repeat)
    return [("2D features, default model (ONNX Runtime)", t_features),
            ("one 2D+3D part: preprocess + FPFH + 2D + score", t_part)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--pool", type=int, default=20)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--grouping", choices=("ipg", "knn"), default="ipg")
    parser.add_argument("--tokens", choices=("fpfh", "groups"), default="fpfh")
    parser.add_argument("--vit-b8", action="store_true", help="2D shapes of MuSc-V2's ViT-B/8 (3 layers)")
    parser.add_argument("--cloud", help="a real organised scan (.tiff) to time instead of a synthetic one")
    args = parser.parse_args()
    grid_2d, dim_2d, layers = VIT_B8 if args.vit_b8 else DEFAULT_2D
    params = Params3D(size=SIZE, grouping=args.grouping, tokens=args.tokens, scales=(0.25, 0.5, 1.0)[-layers:],
                      patch_degrees=(1, 3, 5)[:layers])
    data = generate_set(args.pool + 1, seed=0, size=SIZE)
    clouds = data.clouds if args.cloud is None else [read_cloud(args.cloud)] * (args.pool + 1)
    cloud = clouds[0]

    rows = []
    t, prepared = timeit(lambda: prepare_cloud(cloud, SIZE, params.preprocess, pose_margin=pose_margin(params)),
                         args.repeat)
    rows.append((f"preprocess (plane, cluster, {params.pose} view, normalise)", t))
    if args.tokens == "fpfh":
        pts, pixel_ids = thin_points(prepared, params.stride)
        t, (dist2, index) = timeit(lambda: knn(pts, params.fpfh_neighbours, cKDTree(pts)), args.repeat)
        rows.append((f"kNN ({params.fpfh_neighbours} nearest, KD-tree)", t))
        sensor = -prepared.centroid / prepared.scale
        t, normals = timeit(lambda: pca_normals(pts, index[:, :params.fpfh_normal_neighbours], sensor), args.repeat)
        rows.append((f"normals (PCA of {params.fpfh_normal_neighbours} nearest)", t))
        t, _ = timeit(lambda: spfh(pts, normals, index), args.repeat)
        rows.append(("SPFH (Darboux angles, histograms)", t))
        t, per_point = timeit(lambda: fpfh(pts, params.fpfh_normal_neighbours, params.fpfh_neighbours, sensor),
                              args.repeat)
        rows.append(("FPFH end to end (kNN + normals + SPFH + mixing)", t))
        t, _ = timeit(lambda: box_degrees(pool_to_grid(per_point, pixel_ids, SIZE, SIZE // params.patch_pixels),
                                          params.patch_degrees), args.repeat)
        rows.append((f"pooling to the patch grid + box layers {params.patch_degrees}", t))
        t, query = timeit(lambda: fpfh_sample(prepared, params), args.repeat)
        rows.append(("3D sample end to end (FPFH + pooling + map set-up)", t))
    else:
        t, grouping = timeit(lambda: group_points(prepared.points, params.n_groups, params.group_size,
                                                  params.grouping, params.k_iter, params.tau, params.seed), args.repeat)
        rows.append((f"grouping ({params.grouping}, FPS + kNN + curvature)", t))
        t, tokens = timeit(lambda: descriptor_layers(prepared.points, grouping, params.scales,
                                                     normal_neighbours=params.normal_neighbours), args.repeat)
        rows.append(("descriptors (normals + 3 scales)", t))
        t, query = timeit(lambda: sample_from_tokens(prepared, grouping, tokens, params.degrees, params.tau),
                          args.repeat)
        rows.append(("SNAMD-3D + map set-up", t))
    t, _ = timeit(lambda: prepare_3d(cloud, params), args.repeat)
    rows.append(("prepare_3d end to end (all of the above)", t))

    pool_3d = stack_layers([prepare_3d(c, params) for c in clouds[1:]])
    rng = np.random.default_rng(0)
    p = grid_2d[0] * grid_2d[1]
    query_2d = [l2_normalise(rng.normal(size=(p, dim_2d))).astype(np.float32) for _ in range(layers)]
    pool_2d = [l2_normalise(rng.normal(size=(args.pool, p, dim_2d))).astype(np.float32) for _ in range(layers)]

    t, d3 = timeit(lambda: [euclidean_sample_distances(q, r) for q, r in zip(query.layers, pool_3d)], args.repeat)
    rows.append((f"3D MSM distances, {layers} layers", t))
    t, d2 = timeit(lambda: [patch_to_sample_distances(q, r) for q, r in zip(query_2d, pool_2d)], args.repeat)
    rows.append((f"2D MSM distances, {layers} layers ({p} x {dim_2d})", t))
    proj = projection(query.centre_pixels, SIZE, grid_2d)
    t, _ = timeit(lambda: [cae(a, b, proj) for a, b in zip(d2, d3)], args.repeat)
    rows.append((f"CAE, {layers} layers", t))
    t, _ = timeit(lambda: centre_map(d3[0].mean(axis=1), query.propagation), args.repeat)
    rows.append(("3D map (3-NN propagation + blur)", t))
    for mode in ("3d", "2d+3d"):
        fusion = FusionParams(mode=mode)
        t, _ = timeit(lambda fusion=fusion: score_one(query_2d, query, pool_2d, pool_3d, grid_2d, SIZE, fusion),
                      args.repeat)
        rows.append((f"score_one end to end, mode {mode}", t))
    image_path = None if args.cloud is None else Path(args.cloud).parent.parent / "rgb" / (Path(args.cloud).stem + ".png")
    if image_path is not None and image_path.is_file() and DEFAULT_MODEL.is_file() and not args.vit_b8:
        rows += whole_part(cloud, read_image(image_path), params, pool_3d, args.pool, args.repeat)

    print(f"3D / 2D+3D path ({args.tokens} tokens), one part: {SIZE}x{SIZE}, G={query.centres.shape[0]}, "
          f"M={query.group_pixels.shape[1]}, {len(prepared.points)} foreground points on the grid, "
          f"{len(pts) if args.tokens == 'fpfh' else len(prepared.points)} described, pool {args.pool} "
          f"(numpy on CPU, median of {args.repeat})")
    for name, ms in rows:
        print(f"  {name:<48} {ms:8.1f} ms")


if __name__ == "__main__":
    main()
