"""Point-cloud ingest (one NaN convention, clear errors), preprocessing and 3D descriptors."""
from __future__ import annotations

import cv2
import numpy as np
import pytest
import tifffile

from musc_edge.edge.pointcloud import (CloudError, Grouping, PreprocessParams, descriptor_layers, estimate_normals,
                                 fit_plane_ransac, foreground_mask, group_points, knn_groups, largest_cluster,
                                 normalise_points, pair_descriptors, prepare_cloud, read_cloud, resize_nearest,
                                 to_organised, valid_mask, zero_background)
from musc_edge.edge.synthetic3d import generate_set


def _cloud(h: int = 6, w: int = 5, seed: int = 0) -> np.ndarray:
    xyz = np.random.default_rng(seed).uniform(-0.05, 0.05, size=(h, w, 3)).astype(np.float32)
    xyz[..., 2] += 0.5
    return xyz


def _write_ply(path, xyz: np.ndarray, binary: bool) -> None:
    flat = xyz.reshape(-1, 3).astype(np.float32)
    header = ["ply", f"format {'binary_little_endian' if binary else 'ascii'} 1.0", f"element vertex {len(flat)}",
              "property float x", "property float y", "property float z", "property uchar red", "end_header"]
    with open(path, "wb") as f:
        f.write(("\n".join(header) + "\n").encode())
        if binary:
            table = np.zeros(len(flat), dtype=[("x", "<f4"), ("y", "<f4"), ("z", "<f4"), ("red", "u1")])
            table["x"], table["y"], table["z"] = flat.T
            f.write(table.tobytes())
        else:
            f.write("".join(f"{x!r} {y!r} {z!r} 7\n" for x, y, z in flat.tolist()).encode())


def _write_pcd(path, xyz: np.ndarray, binary: bool, organised: bool, data: str | None = None) -> None:
    flat = xyz.reshape(-1, 3).astype(np.float32)
    width, height = (xyz.shape[1], xyz.shape[0]) if organised else (len(flat), 1)
    mode = data or ("binary" if binary else "ascii")
    header = ["# .PCD v0.7", "VERSION 0.7", "FIELDS x y z", "SIZE 4 4 4", "TYPE F F F", "COUNT 1 1 1",
              f"WIDTH {width}", f"HEIGHT {height}", "VIEWPOINT 0 0 0 1 0 0 0", f"POINTS {len(flat)}", f"DATA {mode}"]
    with open(path, "wb") as f:
        f.write(("\n".join(header) + "\n").encode())
        rows = "".join(f"{x!r} {y!r} {z!r}\n" for x, y, z in flat.tolist())
        f.write(flat.tobytes() if mode != "ascii" else rows.encode())


# --- ingest ---------------------------------------------------------------------------------------------

def test_zero_and_non_finite_points_become_nan():
    xyz = _cloud()
    xyz[0, 0] = 0.0
    xyz[1, 2] = [np.inf, 0.1, 0.5]
    xyz[2, 3, 1] = np.nan
    cloud = to_organised(xyz)
    assert cloud.dtype == np.float32 and cloud.shape == xyz.shape
    missing = ~valid_mask(cloud)
    assert missing.sum() == 3 and missing[0, 0] and missing[1, 2] and missing[2, 3]
    assert np.isnan(cloud[missing]).all()
    np.testing.assert_array_equal(cloud[~missing], xyz[~missing])


@pytest.mark.parametrize("suffix, writer", [
    (".tiff", lambda p, x: tifffile.imwrite(p, x, photometric="rgb")),
    (".npy", lambda p, x: np.save(p, x)),
    (".ply", lambda p, x: _write_ply(p, x, binary=False)),
    (".ply", lambda p, x: _write_ply(p, x, binary=True)),
    (".pcd", lambda p, x: _write_pcd(p, x, binary=False, organised=True)),
    (".pcd", lambda p, x: _write_pcd(p, x, binary=True, organised=True)),
])
def test_every_format_reads_into_the_same_organised_cloud(tmp_path, suffix, writer):
    xyz = _cloud()
    xyz[3, 1] = 0.0   # MVTec-style missing point
    path = tmp_path / f"cloud{suffix}"
    writer(path, xyz)
    cloud = read_cloud(path, image_shape=(6, 5, 3))
    assert cloud.shape == (6, 5, 3)
    assert np.isnan(cloud[3, 1]).all() and valid_mask(cloud).sum() == 29
    np.testing.assert_allclose(cloud[valid_mask(cloud)], xyz[valid_mask(cloud)], rtol=1e-6)


def test_unorganised_pcd_needs_the_image_shape(tmp_path):
    xyz = _cloud()
    path = tmp_path / "flat.pcd"
    _write_pcd(path, xyz, binary=True, organised=False)
    with pytest.raises(CloudError, match="flat.pcd.*unorganised"):
        read_cloud(path)
    np.testing.assert_array_equal(read_cloud(path, image_shape=(6, 5)), xyz)


@pytest.mark.parametrize("make, message", [
    (lambda: np.zeros((6, 5, 3), np.float32), "no valid point"),
    (lambda: np.full((6, 5, 3), np.nan, np.float32), "no valid point"),
    (lambda: np.zeros((6, 5, 4), np.float32), r"expected an organised cloud \[H, W, 3\]"),
    (lambda: np.zeros((0, 5, 3), np.float32), r"expected an organised cloud"),
    (lambda: _cloud() * np.array([1, 1, 1e6], np.float32), "absurd coordinate"),
    (lambda: np.array(["a"] * 90).reshape(6, 5, 3), "numeric"),
])
def test_bad_clouds_raise_errors_naming_the_file(tmp_path, make, message):
    path = tmp_path / "part_0042.npy"
    np.save(path, make())
    with pytest.raises(CloudError, match=f"part_0042.npy.*{message}"):
        read_cloud(path)


def test_size_mismatch_with_the_paired_image(tmp_path):
    path = tmp_path / "scan.tiff"
    tifffile.imwrite(path, _cloud(6, 5), photometric="rgb")
    with pytest.raises(CloudError, match=r"scan.tiff: cloud is 6x5 but the paired image is 6x6"):
        read_cloud(path, image_shape=(6, 6, 3))
    pcd = tmp_path / "scan.pcd"
    _write_pcd(pcd, _cloud(6, 5), binary=True, organised=True)
    with pytest.raises(CloudError, match=r"scan.pcd: cloud is 6x5 but the paired image is 5x6"):
        read_cloud(pcd, image_shape=(5, 6))


@pytest.mark.parametrize("name, content, message", [
    ("a.ply", b"not a ply", "not a PLY"),
    ("b.ply", b"ply\nformat binary_little_endian 1.0\nelement vertex 10\nproperty float x\nproperty float y\n"
              b"property float z\nend_header\n" + b"\x00" * 12, "truncated"),
    ("c.pcd", b"VERSION 0.7\nFIELDS x y z\nSIZE 4 4 4\nTYPE F F F\nCOUNT 1 1 1\nWIDTH 2\nHEIGHT 1\nPOINTS 2\n"
              b"DATA binary_compressed\n" + b"\x00" * 24, "binary_compressed"),
    ("d.tiff", b"garbage", "unreadable"),
    ("e.xyz", b"1 2 3", "unsupported point-cloud format"),
])
def test_unreadable_files_raise_errors_naming_the_file(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(CloudError, match=f"{name}.*{message}"):
        read_cloud(path)


def test_missing_file(tmp_path):
    with pytest.raises(CloudError, match="nothere.tiff: no such file"):
        read_cloud(tmp_path / "nothere.tiff")


# --- preprocessing --------------------------------------------------------------------------------------

def _box_on_table(size: int = 64, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A 10 mm high box on a tilted table, metres; returns (cloud, true box mask)."""
    rng = np.random.default_rng(seed)
    u = (np.arange(size) - size / 2) * 0.001
    gy, gx = np.meshgrid(u, u, indexing="ij")
    box = (np.abs(gx) < 0.012) & (np.abs(gy) < 0.008)
    depth = 0.5 + 0.05 * gx - 0.03 * gy - 0.01 * box + rng.normal(0, 2e-5, gx.shape)
    return np.stack([gx, gy, depth], axis=-1).astype(np.float32), box


def test_ransac_recovers_the_tilted_table_plane():
    cloud, box = _box_on_table()
    normal, offset = fit_plane_ransac(cloud[~box], threshold=0.001, iterations=200, seed=1)
    expected = np.array([0.05, -0.03, -1.0]) / np.linalg.norm([0.05, -0.03, -1.0])
    assert abs(abs(normal @ expected) - 1) < 1e-6
    assert np.abs(cloud[~box] @ normal + offset).max() < 1e-4


def test_foreground_is_the_part_without_table_or_stray_blob():
    cloud, box = _box_on_table()
    cloud[2:5, 40:43] = cloud[2:5, 40:43] - [0, 0, 0.05]   # a floating blob, 50 mm off the table and the box
    keep = foreground_mask(cloud)
    np.testing.assert_array_equal(keep, box)


def test_largest_cluster_joins_points_closer_than_eps_only():
    rng = np.random.default_rng(0)
    big = rng.uniform(0, 0.05, size=(2000, 3))
    near = big[:50] + [0.0, 0.0, 0.004]        # 4 mm above some big-cluster points: same cluster at eps 6 mm
    far = rng.uniform(0, 0.01, size=(300, 3)) + [0.2, 0, 0]
    keep = largest_cluster(np.concatenate([big, near, far]), eps=0.006)
    assert keep[:2050].all() and not keep[2050:].any()


def test_nan_only_regions_are_ignored_and_an_empty_foreground_is_an_error():
    cloud, box = _box_on_table()
    holes = cloud.copy()
    holes[:, :20] = np.nan                                  # scanner shadow over part of the table
    np.testing.assert_array_equal(foreground_mask(holes), box)
    no_part = cloud.copy()
    no_part[box] = np.nan                                   # the part itself is missing: only table remains
    with pytest.raises(CloudError, match="scan_7: no foreground point"):
        foreground_mask(no_part, source="scan_7")


def test_resize_nearest_follows_torch_indexing():
    grid = np.arange(6 * 4).reshape(6, 4)
    out = resize_nearest(grid, 3)
    np.testing.assert_array_equal(out, grid[[0, 2, 4]][:, [0, 1, 2]])
    np.testing.assert_array_equal(resize_nearest(grid, 12)[::2, ::3], grid)   # upsampling repeats pixels


def test_prepare_cloud_normalises_and_keeps_pixel_ids():
    cloud, box = _box_on_table(size=64)
    prepared = prepare_cloud(cloud, size=32)
    on_grid = resize_nearest(np.where(box[..., None], cloud, np.nan), 32)
    ids = np.flatnonzero(valid_mask(on_grid))
    np.testing.assert_array_equal(prepared.pixel_ids, ids)
    restored = prepared.points.astype(np.float64) * prepared.scale + prepared.centroid
    np.testing.assert_allclose(restored, on_grid.reshape(-1, 3)[ids], atol=1e-6)
    assert np.abs(prepared.points.mean(axis=0)).max() < 1e-5
    assert np.isclose(np.linalg.norm(prepared.points, axis=1).max(), 1.0, atol=1e-6)
    np.testing.assert_array_equal(prepared.foreground, box)


def test_zero_background_blanks_what_the_cloud_removed():
    image = np.full((4, 4, 3), 200, np.uint8)
    keep = np.zeros((4, 4), bool)
    keep[1:3, 1:3] = True
    out = zero_background(image, keep)
    assert (out[keep] == 200).all() and (out[~keep] == 0).all()
    with pytest.raises(ValueError, match="not aligned"):
        zero_background(image, keep[:3])


def test_normalise_rejects_a_degenerate_cloud():
    with pytest.raises(ValueError, match="no extent"):
        normalise_points(np.ones((10, 3)))


def test_preprocess_params_disable_steps():
    cloud, box = _box_on_table()
    keep = foreground_mask(cloud, PreprocessParams(remove_plane=False, keep_largest_cluster=False))
    assert keep.all()


# --- descriptors ----------------------------------------------------------------------------------------

def _surface(size: int = 40, dent: float = 0.0, angle: float = 0.0, seed: int = 0) -> np.ndarray:
    """Points of a plane (optionally dented at the centre) rotated about the sensor axis."""
    u = np.linspace(-1, 1, size)
    gx, gy = [a.ravel() for a in np.meshgrid(u, u)]
    z = -dent * np.exp(-(gx ** 2 + gy ** 2) / (2 * 0.15 ** 2)) + np.random.default_rng(seed).normal(0, 1e-4, gx.size)
    c, s = np.cos(angle), np.sin(angle)
    return np.stack([c * gx - s * gy, s * gx + c * gy, z], axis=1).astype(np.float32)


def test_normals_face_the_sensor():
    normals = estimate_normals(_surface())
    np.testing.assert_allclose(normals[:, 2], -1.0, atol=1e-3)


def test_flat_patches_put_all_mass_in_the_centre_bins_and_histograms_sum_to_one():
    points = _surface()
    centre = np.array([820])
    members = np.argsort(np.linalg.norm(points - points[centre], axis=1))[None, :64]
    desc = pair_descriptors(points, estimate_normals(points), centre, members)
    hist = desc.reshape(4, 11)
    np.testing.assert_allclose(hist.sum(axis=1), 1.0, atol=1e-6)
    assert (hist[:, 4:7].sum(axis=1) > 0.99).all()


def test_descriptors_are_rotation_invariant_and_see_a_dent():
    def centre_descriptor(points: np.ndarray) -> np.ndarray:
        centre = np.array([int(np.argmin(np.linalg.norm(points[:, :2], axis=1)))])
        groups = knn_groups(points, centre, 64)
        grouping = Grouping(centre, points[centre], groups, np.zeros(1, np.float32))
        layers = descriptor_layers(points, grouping, normal_neighbours=12)
        assert [layer.shape for layer in layers] == [(1, 44)] * 3
        return np.concatenate(layers, axis=1)[0]

    flat = centre_descriptor(_surface())
    rotated = centre_descriptor(_surface(angle=0.7))
    dented = centre_descriptor(_surface(dent=0.1))
    assert np.linalg.norm(flat - rotated) < 0.02
    assert np.linalg.norm(flat - dented) > 0.5


def test_descriptor_scales_are_validated():
    points = _surface(size=20)
    grouping = group_points(points, n_groups=8, group_size=16)
    with pytest.raises(ValueError, match="scales"):
        descriptor_layers(points, grouping, scales=(0.0, 1.0))


def test_synthetic_scan_preprocesses_to_the_part_and_rail():
    data = generate_set(2, seed=0, size=96)
    for cloud, image in zip(data.clouds, data.images):
        keep = foreground_mask(cloud)
        # The table is dark grey; what is kept is the bright plate / bulge / label and the blue rail.
        assert (image[keep].mean(axis=1) > 80).mean() > 0.95
        assert keep.sum() > 0.2 * keep.size


# --- per-point FPFH and the patch grid ------------------------------------------------------------------

def _bumpy_surface(n: int = 900, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    xy = rng.uniform(-1, 1, size=(n, 2))
    z = 0.3 * np.exp(-4 * (xy ** 2).sum(axis=1)) + 5.0          # a bump, 5 units in front of the camera
    return np.column_stack([xy, z]).astype(np.float32)


def test_fpfh_histograms_are_normalised_and_flat_surfaces_have_one_bin_per_angle():
    from musc_edge.edge.pointcloud import FPFH_DIM, fpfh

    feats = fpfh(_bumpy_surface(), normal_neighbours=12, fpfh_neighbours=30)
    assert feats.shape == (900, FPFH_DIM)
    np.testing.assert_allclose(feats.reshape(-1, 3, 11).sum(axis=2), 200.0, rtol=1e-4)   # own 100 + mixed 100
    flat = np.column_stack([_bumpy_surface()[:, :2], np.full(900, 5.0, np.float32)])
    per_angle = fpfh(flat, 12, 30).reshape(-1, 3, 11).max(axis=2)
    assert (per_angle > 199.0).all()              # every pair has the same (zero) angles on a plane


def _pair_features_pcl(p1, n1, p2, n2) -> tuple[float, float, float] | None:
    """PCL's computePairFeatures for one pair, frame vectors and all (None: degenerate)."""
    dp = p2 - p1
    length = np.linalg.norm(dp)
    if length == 0:
        return None
    dp = dp / length
    u, other, sign = n1, n2, 1.0
    if abs(n1 @ dp) < abs(n2 @ dp):   # the frame sits on the end whose normal is closer to the line
        u, other, sign = n2, n1, -1.0
    phi = sign * (u @ dp)
    v = np.cross(sign * dp, u)
    if np.linalg.norm(v) == 0:
        return None
    v = v / np.linalg.norm(v)
    w = np.cross(u, v)
    return float(np.arctan2(w @ other, u @ other)), float(v @ other), float(phi)


def test_rooted_histograms_keep_the_units_and_weigh_a_bins_change_relative_to_the_bin():
    from musc_edge.edge.pointcloud.fpfh import FPFH_MASS, fpfh, root_histograms

    assert float(fpfh(_bumpy_surface(), 12, 30)[0].sum()) == pytest.approx(FPFH_MASS, rel=1e-5)   # a point's sum
    whole = np.array([[FPFH_MASS, 0.0, 0.0], [0.0, 0.0, 0.0]], np.float32)
    np.testing.assert_array_equal(root_histograms(whole), whole)                # the whole mass in one bin; empty
    # The same mass (6) moved between two large bins and between two small bins: Euclidean distance cannot
    # tell them apart, Hellinger distance finds the small bins' change (6 of 9) much larger than the large ones'.
    base = np.array([294.0, 294.0, 3.0, 9.0], np.float32)
    large, small = base + [6, -6, 0, 0], base + [0, 0, 6, -6]
    euclid = np.linalg.norm(large - base), np.linalg.norm(small - base)
    assert euclid[0] == euclid[1]
    rooted = [np.linalg.norm(root_histograms(x) - root_histograms(base)) for x in (large, small)]
    assert rooted[1] > 5 * rooted[0]
    # Hellinger distance of the normalised histograms, times sqrt(2) and the mass
    hellinger = np.sqrt(0.5 * ((np.sqrt(small / FPFH_MASS) - np.sqrt(base / FPFH_MASS)) ** 2).sum())
    np.testing.assert_allclose(rooted[1], np.sqrt(2) * FPFH_MASS * hellinger, rtol=1e-5)


def test_spfh_closed_form_matches_the_darboux_frame_pair_by_pair():
    from musc_edge.edge.pointcloud.fpfh import FPFH_BINS, knn, pca_normals, spfh

    points = _bumpy_surface(n=300).astype(np.float64)
    _, index = knn(points, 16)
    # random unit normals reach every bin and both ends of the frame; two PCA normals make the flat case
    normals = np.random.default_rng(1).normal(size=points.shape)
    normals /= np.linalg.norm(normals, axis=1, keepdims=True)
    normals[:2] = pca_normals(points, index[:, :10])[:2]
    expected = np.zeros((len(points), 3, FPFH_BINS))
    for i, row in enumerate(index):
        for j in row[1:]:
            features = _pair_features_pcl(points[i], normals[i], points[j], normals[j]) or (0.0, 0.0, 0.0)
            for block, (value, lo, hi) in enumerate(zip(features, (-np.pi, -1, -1), (np.pi, 1, 1))):
                expected[i, block, min(max(int(np.floor(FPFH_BINS * (value - lo) / (hi - lo))), 0), 10)] += 1
    got = spfh(points, normals, index).reshape(len(points), 3, FPFH_BINS) * (15 / 100)
    # float32 against float64 may move a pair sitting on a bin edge; allow a handful of such pairs in 4,500
    moved = np.abs(got - expected).sum() / 2
    assert moved <= 5, moved


def test_spfh_does_not_depend_on_how_the_points_are_blocked():
    from musc_edge.edge.pointcloud.fpfh import knn, pca_normals, spfh

    points = _bumpy_surface(n=500)
    _, index = knn(points, 24)
    normals = pca_normals(points, index[:, :10], np.zeros(3))
    whole = spfh(points, normals, index, chunk=len(points))
    for chunk in (1, 7, 64, 499):   # blocks that do and do not divide the point count
        np.testing.assert_array_equal(spfh(points, normals, index, chunk=chunk), whole)
    np.testing.assert_allclose(whole.reshape(-1, 3, 11).sum(axis=2), 100.0)


def test_ransac_finds_the_plane_among_many_blocks_of_hypotheses():
    from musc_edge.edge.pointcloud import fit_plane_ransac

    rng = np.random.default_rng(3)
    table = np.column_stack([rng.uniform(-1, 1, (3000, 2)), rng.normal(0, 1e-3, 3000)])
    table[:, 2] += 0.2 * table[:, 0] + 1.0                       # a tilted plane ...
    clutter = rng.uniform(-1, 1, (1000, 3)) + [0, 0, 1.5]          # ... and points off it
    points = np.concatenate([table, clutter])
    # 5,000 hypotheses, scored 128 at a time against 1,024 sampled points: 40 blocks, one winner
    normal, offset = fit_plane_ransac(points, 0.004, iterations=5000)
    expected = np.array([-0.2, 0.0, 1.0]) / np.linalg.norm([-0.2, 0.0, 1.0])
    assert abs(abs(normal @ expected) - 1) < 1e-4
    assert abs(abs(offset) - 1.0 / np.linalg.norm([-0.2, 0.0, 1.0])) < 1e-3


def test_valid_mask_needs_every_coordinate_finite():
    from musc_edge.edge.pointcloud import valid_mask

    cloud = np.ones((2, 3, 3), np.float32)
    cloud[0, 0, 2] = np.nan
    cloud[1, 2, 0] = np.inf
    cloud[0, 1, 1] = -np.inf
    np.testing.assert_array_equal(valid_mask(cloud), [[False, False, True], [True, True, False]])


def test_fpfh_is_rotation_invariant():
    from musc_edge.edge.pointcloud import fpfh

    points = _bumpy_surface()
    angle = 0.7
    rot = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]], np.float32)
    centre = points.mean(axis=0)
    turned = (points - centre) @ rot.T + centre
    a = fpfh(points, 12, 30, sensor=np.zeros(3))
    b = fpfh(turned, 12, 30, sensor=np.zeros(3))
    assert np.abs(a - b).mean() < 0.05 * np.abs(a).mean()


def test_patch_pooling_counts_background_as_zero_and_the_map_weights_interpolate():
    from musc_edge.edge.pointcloud import bilinear_weights, box_degrees, covered_pixels, pool_to_grid

    size, grid = 16, 4
    pixel_ids = np.array([0, 1, 16, 17, 5 * 16 + 5])           # a full 2x2 corner of patch 0, one pixel of patch 5
    features = np.ones((5, 2), np.float32)
    tokens = pool_to_grid(features, pixel_ids, size, grid)
    assert tokens.shape == (4, 4, 2)
    assert tokens[0, 0, 0] == pytest.approx(4 / 16) and tokens[1, 1, 0] == pytest.approx(1 / 16)
    assert tokens.sum() == pytest.approx(5 * 2 / 16)
    layers = box_degrees(tokens, (1, 3))
    assert [layer.shape for layer in layers] == [(16, 2), (16, 2)]
    assert layers[1].reshape(4, 4, 2)[0, 0, 0] == pytest.approx((4 + 1) / 16 / 9)
    support = covered_pixels(pixel_ids, size, grid)
    assert len(support) == 2 * 16 and set(pixel_ids) <= set(support)
    index, weight = bilinear_weights(np.arange(size * size), size, grid)
    np.testing.assert_allclose(weight.sum(axis=1), 1.0, rtol=1e-6)
    ramp = np.arange(grid, dtype=np.float32)[None, :].repeat(grid, 0).ravel()     # value = patch column
    cols = np.arange(size * size) % size
    interior = (cols >= 2) & (cols < size - 2)
    np.testing.assert_allclose((ramp[index] * weight).sum(axis=1)[interior], ((cols + 0.5) / 4 - 0.5)[interior],
                               atol=1e-6)
    with pytest.raises(ValueError, match="whole number"):
        pool_to_grid(features, pixel_ids, 15, grid)


# --- canonical view -------------------------------------------------------------------------------------

def _knobbed_bar(angle_deg: float, shift: tuple[int, int] = (0, 0), shape: tuple[int, int] = (120, 160)) -> np.ndarray:
    """A bar with a round knob at one end (its mass sits left of its middle), turned by ``angle_deg``."""
    h, w = shape
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float64)
    t = np.deg2rad(angle_deg)
    cx, cy = w / 2 + shift[0], h / 2 + shift[1]
    u = (xs - cx) * np.cos(t) + (ys - cy) * np.sin(t)       # along the bar
    v = -(xs - cx) * np.sin(t) + (ys - cy) * np.cos(t)      # across it
    return ((np.abs(u) <= 40) & (np.abs(v) <= 8)) | ((u + 30) ** 2 + v ** 2 <= 18 ** 2)


@pytest.mark.parametrize("angle", [0, 37, 90, 180, 251])
def test_canonical_view_puts_every_pose_the_same_way_up(angle):
    from musc_edge.edge.pointcloud import canonical_affine, warp_image

    def canonical(mask: np.ndarray) -> np.ndarray:
        return warp_image(mask.astype(np.float32), canonical_affine(mask, 96, margin=1.3), 96) > 0.5

    reference, turned = canonical(_knobbed_bar(0)), canonical(_knobbed_bar(angle, shift=(9, -7)))
    assert (reference & turned).sum() / (reference | turned).sum() > 0.9
    assert (reference & turned[:, ::-1]).sum() / (reference | turned[:, ::-1]).sum() < 0.75   # not by chance
    cols = np.nonzero(reference.any(axis=0))[0]
    assert reference[:, :48].sum() > reference[:, 48:].sum()        # knob on the left, tail to the right
    assert cols.min() > 0 and cols.max() < 95 and cols.max() - cols.min() > 96 / 1.3 * 0.8   # fills the grid


def test_canonical_cloud_keeps_each_point_once_and_maps_go_back_to_the_frame():
    from musc_edge.edge.pointcloud import canonical_affine, frame_to_canonical, to_frame, warp_cloud

    mask = _knobbed_bar(30)
    ys, xs = np.nonzero(mask)
    cloud = np.full((*mask.shape, 3), np.nan, np.float32)
    cloud[ys, xs] = np.column_stack([xs, ys, np.full(len(xs), 5.0)])
    affine = canonical_affine(mask, 160)             # the view zooms in (about 1.1 x)
    warped = warp_cloud(cloud, affine, 160)
    points = warped[np.isfinite(warped).all(axis=2)]
    assert len(points) == len(np.unique(points, axis=0)) and len(points) > 0.95 * len(xs)
    # a map that marks the part in the canonical grid lands on the part in the frame's grid
    marked = np.isfinite(warped).all(axis=2).astype(np.float32)
    back = to_frame(marked, frame_to_canonical(affine, mask.shape, 160))
    frame = cv2.resize(mask.astype(np.uint8), (160, 160), interpolation=cv2.INTER_NEAREST) > 0
    assert back[frame].mean() > 0.5 and back[~frame].mean() < 0.05


def test_a_scans_image_stage_runs_beside_its_fpfh_with_the_same_result():
    import threading
    import time

    from musc_edge.edge.runtime.recipes.recipe_scan import prepare_scan, prepare_scan_with
    from musc_edge.edge.scoring3d import Params3D

    data = generate_set(1, seed=0, size=64)
    cloud, image = data.clouds[0], data.images[0]
    params = Params3D(size=64)
    sample, view = prepare_scan(cloud, image, params, True, "scan_1")
    beside, (thread, staged) = prepare_scan_with(cloud, image, params, True, "scan_1",
                                                 lambda v: (threading.current_thread(), v.copy()))
    assert thread is not threading.current_thread()
    np.testing.assert_array_equal(staged, view)
    for a, b in zip(beside.layers, sample.layers):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(beside.view, sample.view)

    sparse = np.full_like(cloud, np.nan)   # preprocesses, but 9 points are too few for FPFH
    sparse[30:33, 30:33] = cloud[30:33, 30:33]
    sparse[0, :] = cloud[0, :]
    finished = []

    def slow_stage(view):
        time.sleep(0.3)                    # still running when the cloud fails
        finished.append(view.shape)
    with pytest.raises(CloudError, match="scan_3: too few foreground points for FPFH"):
        prepare_scan_with(sparse, image, params, True, "scan_3", slow_stage)
    assert finished == [(64, 64, 3)]       # the image stage had finished when the cloud's error was raised

    def broken(view):
        raise ValueError("the feature model failed")
    with pytest.raises(ValueError, match="the feature model failed") as raised:   # not turned into a cloud error
        prepare_scan_with(cloud, image, params, True, "scan_1", broken)
    assert not isinstance(raised.value, CloudError)


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="needs os.fork")
def test_a_forked_child_gets_its_own_image_stage_thread():
    import os
    import signal

    from musc_edge.edge.runtime.recipes.recipe_scan import prepare_scan_with
    from musc_edge.edge.scoring3d import Params3D

    data = generate_set(1, seed=0, size=64)
    args = (data.clouds[0], data.images[0], Params3D(size=64), True, "scan_1")
    assert prepare_scan_with(*args, lambda view: view.shape)[1] == (64, 64, 3)   # the parent's thread exists
    pid = os.fork()
    if pid == 0:   # child: the parent's worker thread is gone; a hang ends at the alarm with a non-zero status
        signal.alarm(120)
        try:
            code = 0 if prepare_scan_with(*args, lambda view: view.shape)[1] == (64, 64, 3) else 1
        finally:
            os._exit(locals().get("code", 2))
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
