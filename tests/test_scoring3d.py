"""MuSc-V2 3D / multimodal scoring: SNAMD-3D, CAE, 3D maps, batch and one-vs-pool, and detection on
synthetic 2D+3D parts.

The 2D features here are a cheap deterministic stand-in for a ViT: per-patch soft colour histograms (three
bin counts as three "layers"), unit-normalised, on the patch grid of an 8-pixel patch, with no SWPooling
(with real DINO tokens, whose norms are ~30, SWPooling is close to the identity; MuSc-V2 SWPooling).
Colour histograms see stains but are blind to geometry, like a ViT under dome lighting.
"""
from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest
from scipy.spatial.distance import cdist
from sklearn.metrics import roc_auc_score
from threadpoolctl import threadpool_limits

from musc_edge.edge.pointcloud import CloudError, foreground_mask, zero_background
from musc_edge.edge.pointcloud.fpfh import root_histograms
from musc_edge.edge.scoring import MuscParams, PoolTooSmallError, l2_normalise, rescore_batch
from musc_edge.edge.scoring import score_batch as score_batch_2d
from musc_edge.edge.scoring.maps import upsample
from musc_edge.edge.scoring3d import (FusionParams, Params3D, adaptive_pool_matrix, batch_euclidean_distances, cae,
                                centre_map, euclidean_sample_distances, histogram_match, nearest_centres,
                                prepare_3d, projection, propagation, score_batch, score_one, snamd3d, stack_layers)
from musc_edge.edge.scoring3d.cae import enhance_3d
from musc_edge.edge.scoring3d.multimodal import typical_score
from musc_edge.edge.synthetic3d import generate_set

SIZE, PATCH = 112, 8
GRID = (SIZE // PATCH, SIZE // PATCH)
# The fusion tests score MuSc-V2's group tokens (224-grid defaults, halved); FPFH patch tokens have their own.
# They pair the clouds with 2D features of the whole frame, so the clouds are scored on the whole frame too
# (pose "none"); the canonical view, where the image is warped with the cloud, is tested through prepare_scan.
PARAMS_3D = Params3D(size=SIZE, tokens="groups", n_groups=256, group_size=32, normal_neighbours=8, pose="none")
SIGMA = 2.0                                                                            # 4 px at 224


@pytest.fixture(scope="module", autouse=True)
def single_thread_blas():
    """Many small matrix products: BLAS threads only add contention on a shared 2-core machine."""
    with threadpool_limits(1):
        yield


def colour_patch_features(images: np.ndarray, patch: int = PATCH,
                          bins: tuple[int, ...] = (6, 8, 10)) -> list[np.ndarray]:
    """Stand-in 2D features: per layer ``[N, P, 3 * b]`` unit-norm soft per-channel colour histograms."""
    n, size = images.shape[:2]
    h = size // patch
    px = (images.astype(np.float32).reshape(n, h, patch, h, patch, 3).transpose(0, 1, 3, 5, 2, 4)
          .reshape(n * h * h * 3, patch * patch))
    rows = np.arange(px.shape[0])[:, None]
    layers = []
    for b in bins:
        pos = np.clip(px / 256.0 * b - 0.5, 0, b - 1)
        left = np.minimum(pos.astype(np.int64), b - 2)
        frac = pos - left
        hist = np.bincount((rows * b + left).ravel(), (1 - frac).ravel(), px.shape[0] * b)
        hist += np.bincount((rows * b + left + 1).ravel(), frac.ravel(), px.shape[0] * b)
        layers.append(l2_normalise(hist.reshape(n, h * h, 3 * b).astype(np.float32)))
    return layers


def _prepare(data, params: Params3D = PARAMS_3D):
    samples = [prepare_3d(cloud, params, f"part{i}") for i, cloud in enumerate(data.clouds)]
    images = np.stack([zero_background(im, foreground_mask(c)) for im, c in zip(data.images, data.clouds)])
    return samples, colour_patch_features(images)


# --- building blocks ------------------------------------------------------------------------------------

def _reference_snamd3d(tokens, centres, curvature, degrees=(1, 3, 5), tau=0.01):
    unit = tokens / np.linalg.norm(tokens, axis=1, keepdims=True)
    out = np.empty_like(unit)
    for g in range(len(unit)):
        d = np.linalg.norm(centres - centres[g], axis=1)
        d[g] = -1
        nb = np.argsort(d)[:max(degrees)]
        w = np.exp(-np.linalg.norm(unit[nb] - unit[g], axis=1))
        z = [(w[:r, None] * unit[nb[:r]]).sum(0) / w[:r].sum() for r in degrees]
        out[g] = np.concatenate(z).reshape(-1, 3).mean(axis=1) if curvature[g] < tau else unit[g]
    return out


def test_snamd3d_matches_the_definition():
    rng = np.random.default_rng(0)
    tokens = rng.normal(size=(40, 12)).astype(np.float32)
    centres = rng.normal(size=(40, 3)).astype(np.float32)
    curvature = rng.uniform(0, 0.02, 40).astype(np.float32)
    out = snamd3d(tokens, centres, curvature)
    np.testing.assert_allclose(out, _reference_snamd3d(tokens, centres, curvature), atol=1e-5)
    curved = curvature >= 0.01
    np.testing.assert_allclose(np.linalg.norm(out[curved], axis=1), 1.0, atol=1e-5)
    assert (np.linalg.norm(out[~curved], axis=1) < 0.99).all()          # pooled flat groups: no re-normalisation


def test_nearest_centres_put_self_first_even_for_duplicates():
    centres = np.array([[0, 0, 0], [0, 0, 0], [1, 0, 0], [3, 0, 0]], np.float32)
    nb = nearest_centres(centres, 3)
    np.testing.assert_array_equal(nb[:2], [[0, 1, 2], [1, 0, 2]])
    assert nb[3, 0] == 3 and nb[3, 1] == 2 and nb[3, 2] in (0, 1)


def test_adaptive_pool_matrix_matches_torch_bins():
    np.testing.assert_allclose(np.arange(12.0) @ adaptive_pool_matrix(12, 4), [1, 4, 7, 10])
    np.testing.assert_allclose(np.arange(5.0) @ adaptive_pool_matrix(5, 3), [0.5, 2.0, 3.5])


def test_histogram_match_transfers_values_and_keeps_ranks():
    rng = np.random.default_rng(1)
    source, target = rng.normal(size=(6, 5)), rng.uniform(size=(6, 5))
    out = histogram_match(source, target)
    np.testing.assert_array_equal(np.sort(out, axis=None), np.sort(source, axis=None))
    np.testing.assert_array_equal(np.argsort(out, axis=None), np.argsort(target, axis=None))
    with pytest.raises(ValueError, match="equal sizes"):
        histogram_match(source, target[:3])


def _reference_cae(d2, d3, centre_pixels, size, grid):
    def match(s, t):
        ranks = np.argsort(np.argsort(t, axis=None, kind="stable"), kind="stable")
        return np.sort(s, axis=None)[ranks].reshape(t.shape)

    h, w = grid
    patch_of = [(p // size) // (size // h) * w + (p % size) // (size // w) for p in centre_pixels]
    c2 = np.zeros_like(d2)
    for p in range(h * w):
        members = [g for g, q in enumerate(patch_of) if q == p]
        if members:
            c2[p] = d3[members].mean(axis=0)
    c3 = d2[patch_of]
    conf2 = 1 - match(d2.std(axis=1, ddof=1), c2.std(axis=1, ddof=1))
    conf3 = 1 - match(d3.std(axis=1, ddof=1), c3.std(axis=1, ddof=1))
    c3 = match(d3, c3)
    covered = np.array([p in patch_of for p in range(h * w)])
    c2[covered] = match(d2[covered], c2[covered])
    e2 = match(d2, conf2[:, None] * np.maximum(d2, c2))
    e3 = match(d3, conf3[:, None] * np.maximum(d3, c3))
    return (d2 + e2) / 2, (d3 + e3) / 2


def test_cae_matches_the_definition():
    rng = np.random.default_rng(2)
    size, grid, k = 32, (4, 4), 7
    pixels = rng.choice(np.arange(size * 20), 30, replace=False)      # bottom rows have no centre: empty patches
    d2, d3 = rng.uniform(0.2, 1.0, (16, k)), rng.uniform(0.0, 0.5, (30, k))
    e2, e3 = cae(d2, d3, projection(pixels, size, grid))
    r2, r3 = _reference_cae(d2, d3, pixels, size, grid)
    np.testing.assert_allclose(e2, r2, atol=1e-12)
    np.testing.assert_allclose(e3, r3, atol=1e-12)
    np.testing.assert_array_equal(enhance_3d(d2, d3, projection(pixels, size, grid)), e3)
    with pytest.raises(ValueError, match="different pools"):
        cae(d2, d3[:, :3], projection(pixels, size, grid))


def test_projection_rejects_a_grid_that_does_not_tile_the_image():
    with pytest.raises(ValueError, match="not a whole number of 5x5 patches"):
        projection(np.array([0]), 32, (5, 5))


def test_centre_map_propagates_to_pixels_and_blurs():
    rng = np.random.default_rng(3)
    size = 20
    pixel_ids = np.arange(size * size)
    rows, cols = np.divmod(pixel_ids, size)
    points = np.stack([cols, rows, np.zeros_like(rows)], axis=1).astype(np.float32)
    centres = points[rng.choice(len(points), 15, replace=False)]
    prop = propagation(points, pixel_ids, centres, size)
    np.testing.assert_allclose(prop.weight.sum(axis=1), 1.0, rtol=1e-6)
    scores = np.zeros(15, np.float32)
    scores[4] = 1.0
    sharp = centre_map(scores, prop, sigma=0)
    peak = np.unravel_index(sharp.argmax(), sharp.shape)
    assert np.allclose(peak[::-1], centres[4, :2]) and np.isclose(sharp.max(), 1.0)
    blurred = centre_map(scores, prop, sigma=2)
    assert blurred.max() < sharp.max() and np.isclose(blurred.sum(), sharp.sum(), rtol=0.05)
    quantised = centre_map(scores * 3, prop, sigma=2, quantise=True)
    np.testing.assert_allclose(quantised, centre_map(scores * 3, prop, sigma=2), atol=3 * 2 / 255)


def _grid_like(rng: np.random.Generator) -> np.ndarray:
    """Tokens of a sparse patch grid: most cells empty (all zero), one part filling its grid, one with none."""
    feats = rng.normal(size=(5, 9, 6)).astype(np.float32)
    feats[rng.random((5, 9)) < 0.6] = 0.0
    feats[1] = rng.normal(size=(9, 6))
    feats[3] = 0.0
    return feats


@pytest.mark.parametrize("tokens", ["dense", "sparse grid"])
def test_euclidean_distances_match_cdist(tokens):
    rng = np.random.default_rng(4)
    feats = rng.normal(size=(5, 9, 6)).astype(np.float32) if tokens == "dense" else _grid_like(rng)
    batch = batch_euclidean_distances(feats, chunk=2)
    for i in range(5):
        for j in range(5):
            expected = np.inf if i == j else cdist(feats[i], feats[j]).min(axis=1)
            np.testing.assert_allclose(batch[i, :, j], expected, rtol=1e-4, atol=1e-5)
    for i in range(5):
        one = euclidean_sample_distances(feats[i], np.delete(feats, i, axis=0))
        np.testing.assert_allclose(one, np.delete(batch[i], i, axis=1), rtol=1e-4, atol=1e-5)


# --- pipeline -------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def small():
    data = generate_set(7, seed=2, defect_fraction=0.3, size=64)
    params = Params3D(size=64, n_groups=48, group_size=16, normal_neighbours=6, pose="none")
    samples = [prepare_3d(c, params) for c in data.clouds]
    images = np.stack([zero_background(im, foreground_mask(c)) for im, c in zip(data.images, data.clouds)])
    return samples, colour_patch_features(images), (8, 8)


def gemm_order_rtol(layers: list[np.ndarray]) -> float:
    """Relative difference two fp32 evaluations of the same maps may show when their distance GEMMs sum in
    different orders (one part against the pool vs the batch's pairs). ``|a - b|^2 = |a|^2 + |b|^2 - 2 a.b`` over
    F + 1 terms is off by at most gamma_{F+1} (|a| + |b|)^2 per evaluation (Higham, Accuracy and Stability,
    3.1), so a distance is off relatively by gamma (|a| + |b|)^2 / d^2: the cancellation factor, taken at the
    median nearest pair of distinct tokens of these features (float64). A map is a positive combination of
    distances divided by another (the typical score): twice that for each evaluation. Holds for any CPU's BLAS
    (AVX2, AVX-512, NEON)."""
    u = float(np.finfo(np.float32).eps) / 2
    factors, width = [], 0
    for layer in layers:
        x = np.asarray(layer, np.float64)
        width = max(width, x.shape[-1] + 1)
        for i in range(len(x)):
            query = x[i][np.linalg.norm(x[i], axis=1) > 0]
            refs = np.concatenate([x[j] for j in range(len(x)) if j != i])
            refs = refs[np.linalg.norm(refs, axis=1) > 0]
            dist = cdist(query, refs)
            nearest = dist.argmin(axis=1)
            d = dist[np.arange(len(query)), nearest]
            norms = np.linalg.norm(query, axis=1) + np.linalg.norm(refs[nearest], axis=1)
            apart = d > 0            # identical tokens: the same exact products in both evaluations
            factors.append(norms[apart] ** 2 / d[apart] ** 2)
    gamma = width * u / (1 - width * u)
    return 2 * 2 * gamma * float(np.median(np.concatenate(factors)))


@pytest.mark.parametrize("mode", ["3d", "2d+3d"])
@pytest.mark.parametrize("distance", ["euclidean", "hellinger"])
def test_one_vs_pool_equals_the_batch_row(small, mode, distance):
    samples, sets_2d, grid = small
    params = FusionParams(mode=mode, sigma=1.0, image_distance=distance)
    batch = score_batch(sets_2d, samples, grid, 64, params)
    layers = ([*sets_2d] if mode != "3d" else []) + list(stack_layers(samples))
    if distance == "hellinger":
        layers += [root_histograms(layer) for layer in stack_layers(samples)]
    rtol = gemm_order_rtol(layers)
    for i in (0, 4):
        others = [j for j in range(len(samples)) if j != i]
        one = score_one([s[i] for s in sets_2d], samples[i], [s[others] for s in sets_2d],
                        stack_layers([samples[j] for j in others]), grid, 64, params)
        np.testing.assert_allclose(one.map, batch.maps[i], rtol=rtol, atol=rtol * float(np.median(batch.maps[i])))
        assert np.isclose(one.raw, batch.raw[i], rtol=rtol)
        np.testing.assert_allclose(one.feature, batch.features[i], atol=1e-5)
    assert batch.maps.shape == (7, 64, 64) and np.isfinite(batch.rescored).all()


def test_fused_map_weighs_each_modality_by_the_parts_typical_score(small):
    samples, sets_2d, grid = small
    raw = score_batch(sets_2d, samples, grid, 64, FusionParams(sigma=1.0, map_units="raw"))
    part = score_batch(sets_2d, samples, grid, 64, FusionParams(sigma=1.0))
    np.testing.assert_allclose(raw.raw, raw.maps.reshape(len(samples), -1).max(axis=1), rtol=1e-6)
    np.testing.assert_allclose(part.raw, raw.raw)            # the image score is MuSc-V2's either way
    n = len(samples)
    map_2d = upsample(part.patch_2d, (64, 64)) / typical_score(part.patch_2d.reshape(n, -1))[:, None, None]
    map_3d = np.stack([centre_map(c, s.propagation, sigma=1.0) for c, s in zip(part.centre_3d, samples)])
    map_3d /= typical_score(part.centre_3d)[:, None, None]
    np.testing.assert_allclose(part.maps, map_2d + map_3d, rtol=1e-5, atol=1e-6)
    assert not np.allclose(part.maps, raw.maps, rtol=1e-3)


def test_pools_too_small_and_mismatched_inputs(small):
    samples, sets_2d, grid = small
    with pytest.raises(PoolTooSmallError):
        score_batch([s[:1] for s in sets_2d], samples[:1], grid, 64)
    with pytest.raises(PoolTooSmallError):
        score_one([s[0] for s in sets_2d], samples[0], [s[:0] for s in sets_2d],
                  [layer[:0] for layer in stack_layers(samples)], grid, 64)
    with pytest.raises(ValueError, match="unknown mode"):
        FusionParams(mode="rgb")
    with pytest.raises(ValueError, match="unknown mode"):   # 2D alone is the core's (scoring/musc.py)
        FusionParams(mode="2d")
    with pytest.raises(ValueError, match="needs 3D samples"):
        score_batch(sets_2d, None, grid, 64)
    with pytest.raises(ValueError, match="2D pool has 6 samples but 3D pool has 5"):
        score_one([s[0] for s in sets_2d], samples[0], [s[1:] for s in sets_2d], stack_layers(samples[2:]), grid, 64)
    with pytest.raises(ValueError, match="prepared for a \\[64\\] grid"):
        score_batch(None, samples, None, 128, FusionParams(mode="3d"))
    with pytest.raises(ValueError, match="2D has 3 layers but 3D has 2"):
        score_batch(sets_2d, [replace(s, layers=s.layers[:2]) for s in samples], grid, 64)


@pytest.mark.parametrize("mode", ["3d", "2d+3d"])
def test_a_hellinger_image_score_takes_its_3d_term_from_rooted_tokens_and_leaves_the_map(small, mode):
    samples, sets_2d, grid = small
    sets = sets_2d if mode == "2d+3d" else None
    plain = score_batch(sets, samples, grid, 64, FusionParams(mode=mode, sigma=1.0))
    hellinger = score_batch(sets, samples, grid, 64, FusionParams(mode=mode, sigma=1.0, image_distance="hellinger"))
    rooted = score_batch(sets, [replace(s, layers=tuple(root_histograms(l) for l in s.layers)) for s in samples],
                         grid, 64, FusionParams(mode=mode, sigma=1.0))
    for name in ("maps", "patch_2d", "centre_3d", "features"):
        np.testing.assert_array_equal(getattr(hellinger, name), getattr(plain, name))
    # MuSc-V2's plain sum, its 2D term from the map's pass and its 3D term (after CAE) from the rooted tokens
    image = np.stack([centre_map(c, s.propagation, sigma=1.0) for c, s in zip(rooted.centre_3d, samples)])
    if mode == "2d+3d":
        image += upsample(plain.patch_2d, (64, 64))
    np.testing.assert_allclose(hellinger.raw, image.reshape(len(samples), -1).max(axis=1), rtol=1e-6)
    assert not np.allclose(hellinger.raw, plain.raw, rtol=1e-3)
    with pytest.raises(ValueError, match="unknown image_distance"):
        FusionParams(image_distance="cosine")


def test_sample_geometry_is_consistent():
    cloud = generate_set(1, seed=2, size=64).clouds[0]
    sample = prepare_3d(cloud, Params3D(size=64, tokens="groups", n_groups=48, group_size=16, normal_neighbours=6))
    assert sample.centres.shape == (48, 3) and sample.group_pixels.shape == (48, 16)
    np.testing.assert_array_equal(sample.group_pixels[:, 0], sample.centre_pixels)   # a centre is its own 1st NN
    assert len(sample.layers) == 3 and sample.size == 64


def test_fpfh_tokens_are_patches_of_the_grid(small):
    sample = small[0][0]
    assert sample.centres.shape == (64, 3) and sample.group_pixels.shape == (64, 64)   # 8 x 8 patches of 8 px
    assert all((sample.group_pixels == c).any(axis=1)[i] for i, c in enumerate(sample.centre_pixels))
    assert len(sample.layers) == 3 and sample.layers[0].shape == (64, 33) and sample.size == 64
    # the map covers the patches the part touches: every foreground pixel, and no patch without one
    fg = foreground_mask(generate_set(7, seed=2, defect_fraction=0.3, size=64).clouds[0])
    on_grid = np.zeros(64 * 64, bool)
    on_grid[sample.propagation.pixel_ids] = True
    assert on_grid.reshape(64, 64)[fg].all() and not (on_grid.reshape(8, 8, 8, 8).any(axis=(1, 3)) &
                                                      (np.stack(sample.layers[0]).sum(axis=1) == 0).reshape(8, 8)).any()


def test_unusable_clouds_are_named():
    cloud = generate_set(1, seed=0, size=64).clouds[0]
    with pytest.raises(CloudError, match="scan_9: .*no valid point"):
        prepare_3d(np.full_like(cloud, np.nan), Params3D(size=64), "scan_9")
    sparse = np.full_like(cloud, np.nan)
    sparse[30:33, 30:33] = cloud[30:33, 30:33]          # the part is almost all missing: 9 points left
    sparse[0, :] = cloud[0, :]
    with pytest.raises(CloudError, match="scan_3: too few foreground points to group"):
        prepare_3d(sparse, Params3D(size=64, tokens="groups"), "scan_3")
    with pytest.raises(CloudError, match="scan_3: too few foreground points for FPFH"):
        prepare_3d(sparse, Params3D(size=64), "scan_3")


# --- detection on synthetic parts -------------------------------------------------------------------------

def _score_2d(sets_2d: list[np.ndarray]) -> SimpleNamespace:
    """2D alone, batch, as the line scores it (the core, scoring/musc.py), its map upsampled to the frame."""
    core = score_batch_2d(list(sets_2d), GRID, MuscParams())
    return SimpleNamespace(raw=core.raw, features=core.features, maps=upsample(core.patch_maps, (SIZE, SIZE)))


@pytest.fixture(scope="module")
def line():
    """60 seeded parts, a third defective with every defect kind, scored in the three modes (batch): 2D alone
    by the core's scorer, 3D and 2D+3D by MuSc-V2's."""
    data = generate_set(60, seed=7, defect_fraction=1 / 3, size=SIZE)
    samples, sets_2d = _prepare(data)
    scores = {mode: score_batch(sets_2d, samples, GRID, SIZE, FusionParams(mode=mode, sigma=SIGMA))
              for mode in ("3d", "2d+3d")}
    scores["2d"] = _score_2d(sets_2d)
    return data, samples, scores


def _image_auroc(data, scores, modality: str | None = None) -> float:
    modalities = np.array(data.modalities)
    keep = np.ones(len(modalities), bool) if modality is None else (data.labels == 0) | (modalities == modality)
    return roc_auc_score(data.labels[keep], scores.raw[keep])


def test_set_is_mixed(line):
    data = line[0]
    assert data.labels.sum() == 20 and len(set(data.kinds)) == 6


def test_3d_only_defects_are_found_by_3d_and_fused_scoring(line):
    data, _, scores = line
    au = {mode: _image_auroc(data, scores[mode], "3d") for mode in scores}
    print(f"3D-only defects, image AUROC: {au}")
    assert au["3d"] >= 0.95 and au["2d+3d"] >= 0.95
    assert au["2d"] < 0.8                                  # colour features cannot see them


def test_2d_only_defects_are_found_by_2d_and_fused_scoring(line):
    data, _, scores = line
    au = {mode: _image_auroc(data, scores[mode], "2d") for mode in scores}
    print(f"2D-only defects, image AUROC: {au}")
    assert au["2d"] >= 0.95 and au["2d+3d"] >= 0.95
    assert au["3d"] < 0.8


def test_fusion_beats_either_modality_on_all_defects(line):
    data, _, scores = line
    au = {mode: _image_auroc(data, scores[mode]) for mode in scores}
    rescored = {mode: roc_auc_score(data.labels, rescore_batch(scores[mode].raw, scores[mode].features, (1, 7)))
                for mode in scores}
    pixel = {mode: roc_auc_score(data.masks.ravel(), scores[mode].maps.ravel()) for mode in scores}
    print(f"all defects, image AUROC: {au}; after RsCon {{1, 7}}: {rescored}; pixel AUROC: {pixel}")
    assert au["2d+3d"] > max(au["2d"], au["3d"])
    assert pixel["2d+3d"] >= 0.95
    assert pixel["2d+3d"] > max(pixel["2d"], pixel["3d"])


def test_fpfh_patch_tokens_find_the_geometric_defects(line):
    data, _, _ = line
    samples = [prepare_3d(cloud, Params3D(size=SIZE)) for cloud in data.clouds]
    scores = score_batch(None, samples, None, SIZE, FusionParams(mode="3d", sigma=SIGMA))
    au, pixel = _image_auroc(data, scores, "3d"), roc_auc_score(data.masks.ravel(), scores.maps.ravel())
    print(f"FPFH patch tokens: 3D-only defects image AUROC {au:.3f}, pixel AUROC (all defects) {pixel:.3f}")
    assert au >= 0.95


def test_ipg_lowers_false_positives_at_the_discontinuity(line):
    """Good parts only: mean 3D score in the band around the part-rail gap relative to the rest of the part."""
    data, samples, _ = line
    good = np.flatnonzero(data.labels == 0)
    knn = [prepare_3d(data.clouds[i], replace(PARAMS_3D, grouping="knn")) for i in good]

    def excess(pool) -> float:
        maps = score_batch(None, pool, None, SIZE, FusionParams(mode="3d", sigma=SIGMA)).maps
        ratios = []
        for m, band in zip(maps, data.gap_bands[good]):
            part = m > 0
            ratios.append(m[band & part].mean() / m[~band & part].mean())
        return float(np.mean(ratios)) - 1.0

    ipg_excess, knn_excess = excess([samples[i] for i in good]), excess(knn)
    print(f"gap-band excess 3D score on good parts: kNN {knn_excess:+.1%}, IPG {ipg_excess:+.1%}")
    assert ipg_excess < 0.8 * knn_excess
