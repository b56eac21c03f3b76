"""TensorRT engines: built on the device; refused when built for another model, TensorRT or GPU."""
from __future__ import annotations

import importlib.util
import json

import pytest

from musc_edge.export.cli import main as export_main
from musc_edge.export.tensorrt import TensorRTUnavailable, build_engine, check_engine_key, engine_key

HAVE_TRT = importlib.util.find_spec("tensorrt") is not None


def test_engine_key_mismatch_names_the_field(tmp_path):
    engine = tmp_path / "m.engine"
    engine.write_bytes(b"plan")
    key = engine_key("abc", "10.3.0", "Orin sm_87", "fp16", {"image": (1, 3, 224, 224)})
    engine.with_suffix(".json").write_text(json.dumps(key))
    check_engine_key(engine, key)
    for field, value in [("tensorrt", "10.7.0"), ("onnx_sha256", "def"), ("precision", "fp32")]:
        with pytest.raises(ValueError, match=field):
            check_engine_key(engine, {**key, field: value})
    engine.with_suffix(".json").unlink()
    with pytest.raises(ValueError, match="no sidecar"):
        check_engine_key(engine, key)


@pytest.mark.skipif(HAVE_TRT, reason="TensorRT is installed here: the unavailable path cannot be exercised")
def test_without_tensorrt_the_build_says_why(default_model, capsys):
    with pytest.raises(TensorRTUnavailable, match="JetPack"):
        build_engine(default_model)
    assert export_main(["trt", str(default_model)]) == 2
    assert "TensorRT is not installed" in capsys.readouterr().err


@pytest.mark.skipif(not HAVE_TRT, reason="TensorRT is not installed (it ships with JetPack on the device); "
                                         "engines are built and checked on the Jetson")
def test_engine_matches_onnx_runtime(default_model, tmp_path):
    from musc_edge.export.tensorrt import verify_engine

    engine = build_engine(default_model, tmp_path / "m.engine", size=224, fp16=True)
    rows = verify_engine(default_model, engine, size=224, count=2, min_cos=0.999)
    assert all(r.ok for r in rows), rows
