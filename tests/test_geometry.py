"""Aspect-preserving input: window plans, the windows themselves, and patch maps mapped back to the image."""
from __future__ import annotations

import numpy as np
import pytest

from musc_edge.edge.geometry import plan_for, plan_input, stitch, to_image, windows

SIZE, PATCH = 224, 14
T = SIZE // PATCH


def crop_grid(grid_map: np.ndarray, plan) -> np.ndarray:
    """Window patch maps that a perfect model would give for a map defined on the scaled image's patch grid
    (cells outside the image, i.e. padding, get a value that stitching must ignore)."""
    gh, gw = plan.grid
    padded = np.full((gh + 4 * T, gw + 4 * T), 1e6, np.float32)
    padded[2 * T:2 * T + gh, 2 * T:2 * T + gw] = grid_map
    return np.stack([padded[y // PATCH + 2 * T:y // PATCH + 3 * T, x // PATCH + 2 * T:x // PATCH + 3 * T]
                     for y, x in plan.origins])


@pytest.mark.parametrize("shape", [(1250, 500), (500, 1250), (100, 300), (600, 130), (3000, 200)])
def test_tiles_keep_the_aspect_and_cover_the_whole_image(shape):
    plan = plan_input(shape, SIZE, PATCH, "tile")
    h, w = shape
    sh, sw = plan.scaled
    assert min(sh, sw) == SIZE or plan.n_windows == 8                 # short side at model scale (or capped)
    assert abs((sh / sw) / (h / w) - 1) < 0.1                          # aspect kept within patch rounding
    covered = np.zeros(plan.scaled, bool)
    for y, x in plan.origins:
        assert y % PATCH == 0 and x % PATCH == 0
        covered[max(y, 0):y + SIZE, max(x, 0):x + SIZE] = True
    assert covered.all()
    assert plan.n_windows == max(1, -(-max(sh, sw) // SIZE))          # no more windows than needed


def test_square_and_nearly_square_images_are_one_plain_window():
    for shape in [(900, 900), (400, 420), (224, 224), (60, 64)]:
        for fit in ("tile", "pad", "squash"):
            plan = plan_input(shape, SIZE, PATCH, fit)
            assert (plan.scaled, plan.origins) == ((SIZE, SIZE), ((0, 0),))


def test_pad_letterboxes_the_short_side_in_one_window():
    plan = plan_input((1250, 500), SIZE, PATCH, "pad")
    assert plan.scaled[0] == SIZE and plan.scaled[1] < SIZE and plan.n_windows == 1
    assert plan.origins[0][1] < 0                                       # padding left and right


def test_small_images_are_brought_up_to_the_model_scale():
    plan = plan_input((100, 300), SIZE, PATCH, "tile")
    assert plan.scaled == (SIZE, 3 * SIZE) and plan.n_windows == 3


def test_max_tiles_bounds_the_windows_of_very_long_images():
    plan = plan_input((100, 5000), SIZE, PATCH, "tile", max_tiles=4)
    assert plan.n_windows == 4 and plan.scaled[1] <= 4 * SIZE and plan.scaled[0] < SIZE


@pytest.mark.parametrize("shape, fit", [((1250, 500), "tile"), ((500, 1250), "tile"), ((1250, 500), "pad"),
                                        ((300, 100), "pad"), ((700, 700), "tile"), ((3000, 200), "tile")])
def test_stitch_inverts_the_window_cut_exactly(shape, fit):
    plan = plan_input(shape, SIZE, PATCH, fit)
    truth = np.random.default_rng(0).random(plan.grid).astype(np.float32)
    assert np.allclose(stitch(crop_grid(truth, plan), plan), truth)
    batch = np.stack([crop_grid(truth, plan), crop_grid(2 * truth, plan)])     # leading batch axes work
    assert np.allclose(stitch(batch, plan), np.stack([truth, 2 * truth]))


def test_windows_show_the_image_where_the_plan_says():
    shape = (1250, 500)
    plan = plan_input(shape, SIZE, PATCH, "tile")
    yy, xx = np.mgrid[0:shape[0], 0:shape[1]]
    image = np.stack([yy * 255 // shape[0], xx * 255 // shape[1], np.zeros_like(yy)], -1).astype(np.uint8)
    cut = windows(image, plan)
    assert len(cut) == plan.n_windows and all(w.shape == (SIZE, SIZE, 3) for w in cut)
    sh = plan.scaled[0]
    for (y, _), window in zip(plan.origins, cut):
        # the vertical ramp of each window starts where its origin lies in the scaled image
        assert abs(int(window[SIZE // 2, SIZE // 2, 0]) - (y + SIZE // 2) * 255 // sh) <= 2


def test_a_defect_comes_back_where_it_was_in_the_original_image():
    shape = (1250, 500)
    plan = plan_input(shape, SIZE, PATCH, "tile")
    truth = np.zeros(plan.grid, np.float32)
    truth[30, 4] = 1.0                                                  # lower part, left of centre
    full = to_image(stitch(crop_grid(truth, plan), plan), shape)
    assert full.shape == shape
    y, x = np.unravel_index(full.argmax(), shape)
    assert abs(y / shape[0] - 30 / (plan.grid[0] - 1)) < 0.02 and abs(x / shape[1] - 4 / (plan.grid[1] - 1)) < 0.02


def test_one_plan_for_crops_of_varying_size_gives_equal_window_counts():
    shapes = [(120, 300), (100, 310), (140, 290), (600, 1500)]
    plan = plan_for(shapes, SIZE, PATCH, "tile")
    for shape in shapes:
        cut = windows(np.zeros((*shape, 3), np.uint8), plan)
        assert len(cut) == plan.n_windows == 3


def test_bad_requests_are_refused():
    with pytest.raises(ValueError, match="fit"):
        plan_input((10, 20), SIZE, PATCH, "stretch")
    with pytest.raises(ValueError, match="multiple"):
        plan_input((10, 20), 225, PATCH)
    with pytest.raises(ValueError, match="positive"):
        plan_input((0, 20), SIZE, PATCH)
    plan = plan_input((1250, 500), SIZE, PATCH)
    with pytest.raises(ValueError, match="window maps"):
        stitch(np.zeros((2, T, T)), plan)
