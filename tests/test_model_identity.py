"""Which feature model a line runs, and which stored pools it may score against (Manifest.tokens_identity).

A model cut after the deepest scored block gives the same tokens as its full graph, so a line configured with
the full model runs the cut one beside it, and the pools of either restore on the other, including pools
stored before pool identities named tokens rather than model files.
"""
from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from musc_edge.edge.config import parse_config
from musc_edge.edge.features import FeatureEngine, select_model
from musc_edge.edge.manifest import load_manifest
from musc_edge.edge.mediaio import read_image
from musc_edge.edge.record import PartRecord
from musc_edge.edge.runtime.inspector import Inspector
from musc_edge.edge.runtime.pool_store import PoolMismatchError, pool_path, save_pool

from .toymodel import build_toy_model, cut_outputs

SOURCE = {"kind": "toy", "seed": 0, "sha256": "5" * 64}


def _export(folder: Path, name: str, blocks: tuple[int, ...], cut_block: int, source: dict = SOURCE,
            seed: int = 0) -> Path:
    """The toy model as the exporter writes DINOv2: only ``blocks`` as outputs, cut after ``cut_block``, the
    source's hash recorded."""
    (folder / "uncut").mkdir(exist_ok=True)
    full = build_toy_model(folder / "uncut" / name, seed=seed)
    return cut_outputs(full, folder / name, blocks, cut_block=cut_block, source=source)


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> tuple[Path, Path]:
    """A folder with the full toy export (blocks 3, 6, 9, 12) and its cut at the scored blocks 6 and 9."""
    folder = tmp_path_factory.mktemp("models")
    return _export(folder, "full.onnx", (3, 6, 9, 12), 12), _export(folder, "cut.onnx", (6, 9), 9)


def test_tokens_identity_names_what_the_outputs_depend_on(exported):
    full, cut = (load_manifest(path) for path in exported)
    assert full.model_sha256 != cut.model_sha256
    same = full.tokens_identity((6, 9))
    assert cut.tokens_identity((6, 9)) == same and same.startswith("fp32:")
    differs = {
        "the image token (CLS where each graph ends)": cut.tokens_identity((6, 9), image_token=True),
        "other blocks": full.tokens_identity((9, 12)),
        "other source weights": replace(cut, source={**SOURCE, "sha256": "6" * 64}).tokens_identity((6, 9)),
        "another exporter": replace(cut, exporter_version="9.9").tokens_identity((6, 9)),
        "other preprocessing": replace(cut, preprocessing=replace(cut.preprocessing, resize="area")
                                       ).tokens_identity((6, 9)),
    }
    assert full.tokens_identity((6, 9), image_token=True) != differs["the image token (CLS where each graph ends)"]
    for what, identity in differs.items():
        assert identity != same, what
    # reduced precision, or no recorded source: the model file itself is the identity
    assert replace(cut, precision="int8").tokens_identity((6, 9)) == cut.model_sha256
    assert replace(cut, source={"kind": "toy"}).tokens_identity((6, 9)) == cut.model_sha256


def test_a_configured_model_runs_its_cut_when_the_tokens_are_the_same(exported, tmp_path):
    full, cut = exported
    assert select_model(full, (6, 9)) == cut
    assert select_model(full, (6, 9), image_token=True) == full, "the cut's image token is another block's"
    assert select_model(full, (9, 12)) == full, "the cut lacks block 12"
    assert select_model(cut, (6, 9)) == cut
    image = np.random.default_rng(0).integers(0, 256, (1, 112, 112, 3), np.uint8)
    ran_full, ran_cut = FeatureEngine(full, size=112)(list(image)), FeatureEngine(cut, size=112)(list(image))
    for block in (6, 9):   # same tokens: the pools of one are valid for the other
        np.testing.assert_array_equal(ran_full.layers[(3, 6, 9, 12).index(block)], ran_cut.layers[(6, 9).index(block)])
    # a cut of other weights beside the model is not run in its place
    other = tmp_path / "other"
    other.mkdir()
    lone = _export(other, "full.onnx", (3, 6, 9, 12), 12)
    _export(other, "cut.onnx", (6, 9), 9, source={**SOURCE, "sha256": "6" * 64}, seed=1)
    assert select_model(lone, (6, 9)) == lone


def _config(model: Path, storage: Path):
    return parse_config({
        "model": {"path": str(model), "size": 112, "blocks": [6, 9], "fast_path": "off"},
        "recipes": {"default": {"threshold": 1.0, "pool": {"capacity": 8, "min_size": 4}}},
        "source": {"type": "replay", "paths": ["unused.png"]},
        "link": {"type": "zmq", "endpoint": "tcp://127.0.0.1:1"}, "storage": {"dir": str(storage)}}, "test")


def _fill(inspector: Inspector, paths: list[Path]) -> None:
    for i, path in enumerate(paths):
        part = PartRecord(part_id=f"p{i}", recipe="default", capture_time=time.time(), image=read_image(path))
        part, prepared = inspector.inspect(part, inspector.extract(part))
        inspector.admit(part, prepared)


def test_pools_restore_across_the_cut_and_from_an_older_release(exported, synthetic_parts, tmp_path):
    full, cut = exported
    parts = sorted((synthetic_parts / "test" / "good").glob("*.png"))[:6]
    by_full_name = Inspector(_config(full, tmp_path))
    assert by_full_name.engine.model_path == cut
    _fill(by_full_name, parts)
    size = by_full_name.recipes["default"].pool.size
    assert size >= 4
    by_full_name.save_pools()
    assert Inspector(_config(cut, tmp_path)).restore_pools() == {"default": size}

    # a pool stored before identities named tokens: {"model_sha256": <the model file>, ...}
    path = pool_path(tmp_path, "default")
    with np.load(path, allow_pickle=False) as data:
        state = {name: data[name] for name in data.files if name != "identity"}
        identity = json.loads(str(data["identity"]))
    legacy = {**{k: v for k, v in identity.items() if k != "tokens"},
              "model_sha256": load_manifest(full).model_sha256}
    save_pool(path, state, legacy)
    assert Inspector(_config(full, tmp_path)).restore_pools() == {"default": size}
    save_pool(path, state, {**legacy, "model_sha256": "0" * 64})   # a model this install does not have
    with pytest.raises(PoolMismatchError, match="tokens"):
        Inspector(_config(full, tmp_path)).restore_pools()
