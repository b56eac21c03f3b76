"""The synthetic scanner + camera: seeded, pixel-aligned, defects visible only where they should be."""
from __future__ import annotations

import numpy as np
import pytest

from musc_edge.edge.pointcloud import valid_mask
from musc_edge.edge.synthetic3d import DEFECT_MODALITY, generate_set, render_part

SIZE = 96


def test_generate_set_is_seeded_and_shaped():
    a, b = generate_set(12, seed=4, size=SIZE), generate_set(12, seed=4, size=SIZE)
    np.testing.assert_array_equal(a.images, b.images)
    np.testing.assert_array_equal(a.clouds, b.clouds)
    assert a.kinds == b.kinds
    assert not np.array_equal(a.clouds, generate_set(12, seed=5, size=SIZE).clouds)
    assert a.images.shape == (12, SIZE, SIZE, 3) and a.images.dtype == np.uint8
    assert a.clouds.shape == (12, SIZE, SIZE, 3) and a.clouds.dtype == np.float32
    assert a.masks.shape == a.gap_bands.shape == (12, SIZE, SIZE)


def test_defect_counts_kinds_and_masks():
    data = generate_set(60, seed=1, defect_fraction=1 / 3, size=SIZE)
    assert data.labels.sum() == 20
    assert {k for k in data.kinds if k != "good"} == set(DEFECT_MODALITY)
    for label, kind, modality, mask in zip(data.labels, data.kinds, data.modalities, data.masks):
        assert (label == 1) == (kind != "good") == mask.any()
        assert modality == ("none" if kind == "good" else DEFECT_MODALITY[kind])


def test_cloud_has_missing_points_a_background_plane_and_a_rail_gap():
    part = render_part(np.random.default_rng(0), SIZE)
    valid = valid_mask(part.cloud)
    assert 0.99 < valid.mean() < 1.0                              # a few dropouts, as NaN
    depth = part.cloud[..., 2]
    assert np.nanmax(depth) - np.nanmin(depth) > 0.01             # part stands > 10 mm off the table
    band_depths = depth[part.gap_band & valid]
    assert band_depths.max() - band_depths.min() > 0.005          # the band spans plate, gap (table) and rail


@pytest.mark.parametrize("kind, modality", sorted(DEFECT_MODALITY.items()))
def test_each_defect_shows_only_in_its_modality(kind, modality):
    """The same seed renders the same part with and without the defect, so the difference is the defect."""
    for seed in range(4):
        good = render_part(np.random.default_rng(seed), SIZE, "good")
        bad = render_part(np.random.default_rng(seed), SIZE, kind)
        both = valid_mask(good.cloud) & valid_mask(bad.cloud)
        depth_change = np.abs(bad.cloud[..., 2] - good.cloud[..., 2])[both]
        colour_change = np.abs(bad.image.astype(int) - good.image.astype(int)).max(axis=-1)
        in_mask = bad.mask[both]
        assert (depth_change[in_mask].max() > 1e-3) == (modality in ("3d", "both"))
        assert (colour_change[bad.mask].mean() > 30) == (modality in ("2d", "both"))
        assert depth_change[~in_mask].max() < 0.6e-3              # geometry changes stay near the mask
        assert colour_change[~bad.mask].mean() < 1.0


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown defect kind 'scratch'"):
        render_part(np.random.default_rng(0), SIZE, "scratch")
    with pytest.raises(ValueError, match="defect_fraction"):
        generate_set(4, defect_fraction=1.5)
