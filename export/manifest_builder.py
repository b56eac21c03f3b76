"""Write an exported feature model together with its sidecar manifest."""
from __future__ import annotations

from pathlib import Path

import onnx

from musc_edge.edge.manifest import Manifest, Preprocessing, sha256_of, write_manifest

EXPORTER_VERSION = "0.1.0"


def save_with_manifest(model: onnx.ModelProto, out_path: str | Path, *, architecture: str, patch_size: int,
                       blocks: tuple[int, ...], token_dim: int, preprocessing: Preprocessing,
                       source: dict, extra: dict | None = None, image_token: bool = True,
                       cut_block: int = 0) -> Manifest:
    """Save ``model`` atomically to ``out_path`` and write ``out_path.with_suffix('.json')`` beside it."""
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_suffix(".onnx.tmp")
    onnx.save(model, str(tmp))
    tmp.replace(out_path)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    manifest = Manifest(
        architecture=architecture, patch_size=patch_size, blocks=tuple(blocks), token_dim=token_dim,
        preprocessing=preprocessing, opset=opset, exporter_version=EXPORTER_VERSION, source=source,
        model_sha256=sha256_of(out_path), input_name=model.graph.input[0].name,
        token_outputs=tuple(f"tokens_block{b}" for b in blocks), image_token_output="image_token" if image_token else None,
        extra=extra or {}, cut_block=cut_block)
    write_manifest(out_path, manifest)
    return manifest
