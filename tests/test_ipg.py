"""Point grouping: farthest-point sampling, curvature, plain kNN groups and IPG region growing."""
from __future__ import annotations

import numpy as np
import pytest

from musc_edge.edge.pointcloud import (farthest_point_sampling, group_points, grow_groups, knn_groups, relative_groups,
                                 surface_variation)


def _naive_fps(points: np.ndarray, n: int, first: int) -> np.ndarray:
    chosen = [first]
    for _ in range(n - 1):
        d = np.min(np.linalg.norm(points[:, None] - points[chosen][None], axis=2), axis=1)
        chosen.append(int(np.argmax(d)))
    return np.array(chosen)


def _step(size: int = 30, gap: float = 0.06, drop: float = 0.12, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A plane (x < 0) next to a lower plane (x > gap): a discontinuity. Returns (points, on_second)."""
    u = np.linspace(-1, 1, 2 * size)
    gx, gy = [a.ravel() for a in np.meshgrid(u, u)]
    keep = (gx < 0) | (gx > gap)
    gx, gy = gx[keep], gy[keep]
    second = gx > gap
    z = np.where(second, drop, 0.0) + np.random.default_rng(seed).normal(0, 1e-3, gx.size)
    return np.stack([gx, gy, z], axis=1).astype(np.float32), second


def test_fps_matches_the_definition_and_is_seeded():
    points = np.random.default_rng(0).normal(size=(400, 3)).astype(np.float32)
    chosen = farthest_point_sampling(points, 25, seed=3)
    np.testing.assert_array_equal(chosen, _naive_fps(points, 25, int(chosen[0])))
    np.testing.assert_array_equal(chosen, farthest_point_sampling(points, 25, seed=3))
    assert len(set(chosen.tolist())) == 25
    with pytest.raises(ValueError, match="cannot sample 401 centres from 400 points"):
        farthest_point_sampling(points, 401)


def test_fps_spreads_centres_much_wider_than_random():
    points = np.random.default_rng(1).uniform(size=(3000, 3)).astype(np.float32)

    def min_gap(idx: np.ndarray) -> float:
        d = np.linalg.norm(points[idx][:, None] - points[idx][None], axis=2)
        return d[np.triu_indices(len(idx), 1)].min()

    assert min_gap(farthest_point_sampling(points, 64)) > 3 * min_gap(np.arange(64))


def test_surface_variation_separates_planes_and_spheres():
    rng = np.random.default_rng(0)
    plane = np.c_[rng.uniform(-1, 1, (500, 2)), np.zeros(500)]
    sphere = rng.normal(size=(500, 3))
    sphere /= np.linalg.norm(sphere, axis=1, keepdims=True)
    for points, low, high in ((plane, 0.0, 1e-6), (sphere, 0.01, 0.34)):
        centre = np.array([0])
        nb = knn_groups(points, centre, 64)
        kappa = surface_variation(points, centre, nb)[0]
        assert low <= kappa <= high


def test_knn_groups_are_the_nearest_points():
    points = np.random.default_rng(2).normal(size=(300, 3))
    centres = np.array([5, 17, 230])
    groups = knn_groups(points, centres, 12)
    brute = np.argsort(np.linalg.norm(points[None] - points[centres][:, None], axis=2), axis=1)[:, :12]
    np.testing.assert_array_equal(np.sort(groups, axis=1), np.sort(brute, axis=1))


def test_grown_groups_are_distinct_and_start_from_the_nearest_points():
    points, _ = _step()
    centres = np.array([0, 100, 2000])
    search = knn_groups(points, centres, 64)
    grown = grow_groups(points, search, 32, k_iter=20)
    np.testing.assert_array_equal(grown[:, :20], search[:, :20])
    assert all(len(set(row.tolist())) == 32 for row in grown)
    assert np.isin(grown, search).all()
    with pytest.raises(ValueError, match="cannot fill groups"):
        grow_groups(points, search[:, :16], 32)


def test_ipg_keeps_groups_on_their_surface_at_a_discontinuity():
    """Measured: share of group members on the *other* surface, for curved centres near the step."""
    points, second = _step()
    ipg = group_points(points, n_groups=400, group_size=64, method="ipg", seed=0)
    knn = group_points(points, n_groups=400, group_size=64, method="knn", seed=0)
    np.testing.assert_array_equal(ipg.centre_index, knn.centre_index)
    np.testing.assert_array_equal(ipg.curvature, knn.curvature)
    curved = ipg.curvature >= 0.01
    assert curved.sum() >= 20                          # the centres near the step are classed as curved
    assert (np.abs(points[ipg.centre_index[curved], 0]) < 0.3).all()
    np.testing.assert_array_equal(ipg.groups[~curved], knn.groups[~curved])

    def foreign_share(groups: np.ndarray) -> float:
        own = second[ipg.centre_index[curved]][:, None]
        return float((second[groups[curved]] != own).mean())

    knn_share, ipg_share = foreign_share(knn.groups), foreign_share(ipg.groups)
    print(f"members on the other surface: kNN {knn_share:.3f}, IPG {ipg_share:.3f}")
    assert ipg_share < 0.8 * knn_share


def test_group_points_clamps_small_clouds_and_rejects_tiny_ones():
    points = np.random.default_rng(3).normal(size=(40, 3)).astype(np.float32)
    grouping = group_points(points, n_groups=1024, group_size=128)
    assert grouping.groups.shape == (40, 40) and grouping.centres.shape == (40, 3)
    assert relative_groups(points, grouping).shape == (40, 40, 3)
    np.testing.assert_allclose(relative_groups(points, grouping)[np.arange(40), 0], 0.0, atol=1e-6)
    with pytest.raises(ValueError, match="too few foreground points to group: 10 < 16"):
        group_points(points[:10])
    with pytest.raises(ValueError, match="unknown grouping"):
        group_points(points, method="ball")
