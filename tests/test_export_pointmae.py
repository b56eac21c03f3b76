"""Point-MAE encoder export: checkpoint loading and ONNX Runtime vs PyTorch parity (random weights)."""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
ort = pytest.importorskip("onnxruntime")

from musc_edge.export.pointmae import (CheckpointError, PointMAEEncoder, build_encoder, export_checkpoint,  # noqa: E402
                             load_encoder_state)


def _random_checkpoint(path, seed: int = 0) -> None:
    """A Point-MAE-style pretraining checkpoint: DDP ``module.`` prefix, encoder under ``MAE_encoder.``,
    plus decoder weights the exporter must ignore. BatchNorm statistics are randomised too."""
    torch.manual_seed(seed)
    base = {}
    for key, value in PointMAEEncoder().state_dict().items():
        if key.endswith("running_var"):
            value = torch.rand_like(value) + 0.5
        elif value.dtype.is_floating_point:
            value = torch.randn_like(value) * 0.05
        base[f"module.MAE_encoder.{key}"] = value
    base["module.MAE_decoder.blocks.0.norm1.weight"] = torch.ones(384)
    base["module.mask_token"] = torch.zeros(1, 1, 384)
    torch.save({"base_model": base, "epoch": 300}, path)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("pointmae") / "pointmae_pretrain.pth"
    _random_checkpoint(path)
    return path


def test_onnx_matches_pytorch_for_any_group_count(tmp_path, checkpoint):
    ckpt = checkpoint
    onnx_path = export_checkpoint(ckpt, tmp_path / "pointmae.onnx", blocks=(2, 4), n_groups=16, group_size=8)
    model = build_encoder(load_encoder_state(ckpt), blocks=(2, 4))
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == ["tokens_block2", "tokens_block4"]
    gen = torch.Generator().manual_seed(1)
    groups, centres = torch.randn(2, 24, 12, 3, generator=gen) * 0.1, torch.randn(2, 24, 3, generator=gen)
    with torch.no_grad():
        expected = model(groups, centres)
    got = session.run(None, {"groups": groups.numpy(), "centres": centres.numpy()})
    for exp, out in zip(expected, got):
        assert out.shape == (2, 24, 384)
        np.testing.assert_allclose(out, exp.numpy(), atol=1e-4)
    assert not np.allclose(got[0], got[1], atol=1e-2)     # different blocks really differ


def test_tokens_follow_their_groups_and_ignore_member_order(checkpoint):
    model = build_encoder(load_encoder_state(checkpoint), blocks=(2,))
    gen = torch.Generator().manual_seed(0)
    groups, centres = torch.randn(1, 10, 16, 3, generator=gen) * 0.1, torch.randn(1, 10, 3, generator=gen)
    order = torch.randperm(10, generator=gen)
    with torch.no_grad():
        base = model(groups, centres)[0]
        members_shuffled = model(groups[:, :, torch.randperm(16, generator=gen)], centres)[0]
        groups_shuffled = model(groups[:, order], centres[:, order])[0]
    torch.testing.assert_close(members_shuffled, base, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(groups_shuffled, base[:, order], atol=1e-5, rtol=1e-5)
    assert (base[0, 0] - base[0, 1]).abs().max() > 1e-3


def test_checkpoint_errors_name_the_file(tmp_path, checkpoint):
    with pytest.raises(CheckpointError, match="missing.pth: no such checkpoint"):
        load_encoder_state(tmp_path / "missing.pth")
    wrong = tmp_path / "wrong.pth"
    torch.save({"model": {}}, wrong)
    with pytest.raises(CheckpointError, match="wrong.pth: expected a dict with a 'base_model' entry"):
        load_encoder_state(wrong)
    partial = tmp_path / "partial.pth"
    base = torch.load(checkpoint, weights_only=True)["base_model"]
    del base["module.MAE_encoder.norm.weight"]
    torch.save({"base_model": base}, partial)
    with pytest.raises(CheckpointError, match="partial.pth: checkpoint lacks 1 encoder weights.*norm.weight"):
        export_checkpoint(partial, tmp_path / "x.onnx")
    with pytest.raises(ValueError, match=r"blocks \[13\] out of range"):
        PointMAEEncoder(blocks=(13,))
