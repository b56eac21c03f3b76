"""On the line, tall frames are tiled at model scale and the part's map comes back in the frame's geometry."""
from __future__ import annotations

import numpy as np
import pytest

from musc_edge.edge.config import parse_config
from musc_edge.edge.record import PartRecord, Reason
from musc_edge.edge.runtime.inspector import Inspector
from musc_edge.edge.synthetic import render_part

SIZE = 112
FRAME = (280, SIZE)   # tall 1:2.5 frames: synthetic parts stacked (windows overlap)


BASE = np.concatenate([render_part(np.random.default_rng(s), SIZE)[0] for s in range(3)])[:FRAME[0]]


def tall_frame(rng: np.random.Generator, defect: bool = False) -> np.ndarray:
    """The same part under sensor noise; the defect a small red square."""
    frame = np.clip(BASE + rng.normal(0, 4, BASE.shape), 0, 255).astype(np.uint8)
    if defect:
        frame[226:238, 50:62] = (255, 20, 20)   # near the bottom, left of centre
    return frame


def inspector_for(model, tmp_path, fit: str) -> Inspector:
    return Inspector(parse_config({
        "model": {"path": str(model), "size": SIZE, "blocks": [6, 9], "fit": fit, "frame": list(FRAME)},
        "recipes": {"default": {"threshold": 1.0, "pool": {"capacity": 8, "min_size": 4, "near_duplicate_distance": 0.0}}},
        "source": {"type": "replay", "path": str(tmp_path), "pattern": "*.png"},
        "link": {"type": "zmq"}, "storage": {"dir": str(tmp_path / "store")}}))


def inspect(inspector: Inspector, part_id: str, image: np.ndarray) -> PartRecord:
    part, prepared = inspector.inspect(PartRecord(part_id, "default", 0.0, image=image))
    inspector.admit(part, prepared)
    return part


@pytest.mark.parametrize("fit", ["tile", "pad"])
def test_a_tall_frame_is_scored_whole_and_its_map_keeps_the_frame_geometry(toy_model, tmp_path, fit):
    inspector = inspector_for(toy_model, tmp_path, fit)
    assert inspector.plan.n_windows == (3 if fit == "tile" else 1)
    rng = np.random.default_rng(0)
    for i in range(6):
        assert inspect(inspector, f"good{i}", tall_frame(rng)).reason in (Reason.WARMUP, Reason.OK, Reason.ANOMALY)
    part = inspect(inspector, "bad", tall_frame(rng, defect=True))
    gh, gw = part.anomaly_map.shape
    assert (gh, gw) == inspector.plan.grid and gh >= 2 * gw          # stitched: as tall as the frame
    y, x = np.unravel_index(part.anomaly_map.argmax(), part.anomaly_map.shape)
    assert abs((y + 0.5) / gh - 232 / FRAME[0]) < 0.1 and abs((x + 0.5) / gw - 56 / FRAME[1]) < 0.25


def test_tiled_pools_are_not_mistaken_for_square_ones(toy_model, tmp_path):
    tiled = inspector_for(toy_model, tmp_path, "tile").pool_identity()
    squashed = inspector_for(toy_model, tmp_path, "squash").pool_identity()
    assert tiled != squashed and "input" not in squashed


def test_a_bad_frame_is_refused_naming_the_key(toy_model, tmp_path):
    from musc_edge.edge.config import ConfigError

    with pytest.raises(ConfigError, match="frame"):
        parse_config({"model": {"path": str(toy_model), "frame": [0, 100]},
                      "recipes": {"default": {"threshold": 1.0}},
                      "source": {"type": "replay", "path": str(tmp_path), "pattern": "*.png"},
                      "link": {"type": "zmq"}, "storage": {"dir": str(tmp_path / "store")}})


def test_frames_unlike_model_frame_are_scored_but_said_so(toy_model, tmp_path, caplog):
    inspector = inspector_for(toy_model, tmp_path, "tile")
    square = np.zeros((SIZE, SIZE, 3), np.uint8)
    with caplog.at_level("WARNING"):
        prepared = inspector.features([square, square])
    assert len(prepared) == 2 and prepared[0][0].shape[0] == inspector.grid[0] * inspector.grid[1]
    assert "model.frame" in caplog.text
