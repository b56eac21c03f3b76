"""Export the Point-MAE encoder used by MuSc-V2's 3D branch to ONNX, from a user's local checkpoint.

Architecture (MuSc-V2's ``point_transformer.py``): mini-PointNet token embedding (per point 3 -> 128 -> 256, max-pool,
concatenate with the per-point features, 512 -> 512 -> 384, max-pool), position MLP 3 -> 128 -> 384 on the
group centre added before every block, 12 pre-norm transformer blocks (width 384, 6 heads, MLP x4, no qkv
bias); each requested block's output goes through the final LayerNorm.

Grouping (FPS, kNN, IPG) is not exportable and stays outside the graph (``musc_edge.edge.pointcloud``): the graph
takes ``groups [B, G, M, 3]`` (member coordinates relative to their centre) and ``centres [B, G, 3]`` and
returns ``tokens_block{b} [B, G, 384]`` for each chosen block. Checkpoints are never downloaded.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import nn

WIDTH = 384
DEPTH = 12
HEADS = 6
MLP_RATIO = 4
DEFAULT_BLOCKS = (4, 8, 12)
_PREFIXES = ("MAE_encoder.", "base_model.")


class CheckpointError(ValueError):
    """The checkpoint file is not a usable Point-MAE checkpoint."""


class MiniPointNet(nn.Module):
    """Per-group token embedding (Point-MAE ``Encoder``): ``[B, G, M, 3] -> [B, G, width]``."""

    def __init__(self, width: int = WIDTH) -> None:
        super().__init__()
        self.first_conv = nn.Sequential(nn.Conv1d(3, 128, 1), nn.BatchNorm1d(128), nn.ReLU(inplace=True),
                                        nn.Conv1d(128, 256, 1))
        self.second_conv = nn.Sequential(nn.Conv1d(512, 512, 1), nn.BatchNorm1d(512), nn.ReLU(inplace=True),
                                         nn.Conv1d(512, width, 1))

    def forward(self, groups: torch.Tensor) -> torch.Tensor:
        b, g, m, _ = groups.shape
        x = self.first_conv(groups.reshape(b * g, m, 3).transpose(2, 1))
        pooled = x.max(dim=2, keepdim=True)[0]
        x = self.second_conv(torch.cat([pooled.expand(-1, -1, m), x], dim=1))
        return x.max(dim=2)[0].reshape(b, g, -1)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.scale = (dim // heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=False)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, dim * MLP_RATIO)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class _Blocks(nn.Module):
    """Holds ``blocks.blocks.N`` so checkpoint keys load unchanged."""

    def __init__(self, dim: int, depth: int, heads: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(depth))


class PointMAEEncoder(nn.Module):
    """Point-MAE encoder returning the final-LayerNorm'd tokens of ``blocks`` (1-indexed)."""

    def __init__(self, blocks: tuple[int, ...] = DEFAULT_BLOCKS, width: int = WIDTH, depth: int = DEPTH,
                 heads: int = HEADS) -> None:
        super().__init__()
        if not blocks or any(not 1 <= b <= depth for b in blocks):
            raise ValueError(f"blocks {list(blocks)} out of range: the encoder has blocks 1..{depth}")
        self.fetch = tuple(sorted(set(blocks)))
        self.encoder = MiniPointNet(width)
        self.pos_embed = nn.Sequential(nn.Linear(3, 128), nn.GELU(), nn.Linear(128, width))
        self.blocks = _Blocks(width, depth, heads)
        self.norm = nn.LayerNorm(width)

    def forward(self, groups: torch.Tensor, centres: torch.Tensor) -> tuple[torch.Tensor, ...]:
        x = self.encoder(groups)
        pos = self.pos_embed(centres)
        out = []
        for index, block in enumerate(self.blocks.blocks[:max(self.fetch)], start=1):
            x = block(x + pos)
            if index in self.fetch:
                out.append(self.norm(x))
        return tuple(out)


def load_encoder_state(path: str | Path) -> dict[str, torch.Tensor]:
    """Encoder weights from a Point-MAE ``.pth``: ``base_model`` entries, ``module.`` and
    ``MAE_encoder.`` / ``base_model.`` prefixes stripped (as the official loader does)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"{path}: not a loadable PyTorch checkpoint ({exc})") from exc
    if not isinstance(ckpt, dict) or "base_model" not in ckpt:
        keys = list(ckpt)[:5] if isinstance(ckpt, dict) else type(ckpt).__name__
        raise CheckpointError(f"{path}: expected a dict with a 'base_model' entry, got {keys}")
    state = {}
    for key, value in ckpt["base_model"].items():
        key = key.replace("module.", "")
        for prefix in _PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix):]
                break
        state[key] = value
    return state


def build_encoder(state: dict[str, torch.Tensor], blocks: tuple[int, ...] = DEFAULT_BLOCKS,
                  source: str = "<state>") -> PointMAEEncoder:
    """An eval-mode encoder with ``state`` loaded; missing encoder weights are an error, extras ignored."""
    model = PointMAEEncoder(blocks)
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    if missing:
        raise CheckpointError(f"{source}: checkpoint lacks {len(missing)} encoder weights, e.g. {missing[:3]}")
    wrong = [k for k in expected if state[k].shape != expected[k].shape]
    if wrong:
        k = wrong[0]
        raise CheckpointError(f"{source}: weight {k} has shape {tuple(state[k].shape)}, "
                              f"expected {tuple(expected[k].shape)}")
    model.load_state_dict({k: state[k] for k in expected})
    return model.eval()


def export_onnx(model: PointMAEEncoder, output: str | Path, n_groups: int = 1024, group_size: int = 128,
                opset: int = 17) -> Path:
    """Write the ONNX graph (dynamic batch, groups and points) and return its path."""
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    groups = torch.zeros(1, n_groups, group_size, 3)
    centres = torch.zeros(1, n_groups, 3)
    names = [f"tokens_block{b}" for b in model.fetch]
    axes = {"groups": {0: "batch", 1: "n_groups", 2: "group_size"}, "centres": {0: "batch", 1: "n_groups"}}
    axes.update({name: {0: "batch", 1: "n_groups"} for name in names})
    with torch.no_grad(), warnings.catch_warnings():
        # The TorchScript exporter is used on purpose: the dynamo one needs onnxscript, which we do not ship.
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(model, (groups, centres), str(output), input_names=["groups", "centres"],
                          output_names=names, dynamic_axes=axes, opset_version=opset, dynamo=False)
    return output


def export_checkpoint(checkpoint: str | Path, output: str | Path, blocks: tuple[int, ...] = DEFAULT_BLOCKS,
                      n_groups: int = 1024, group_size: int = 128) -> Path:
    """Local Point-MAE ``.pth`` -> ONNX feature model with tokens of ``blocks``."""
    model = build_encoder(load_encoder_state(checkpoint), blocks, str(checkpoint))
    return export_onnx(model, output, n_groups, group_size)
