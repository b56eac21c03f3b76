"""TensorRT engines, built on the device that runs them (engines are tied to the TensorRT version and GPU).

TensorRT is imported lazily: it ships with JetPack on a Jetson and cannot be installed everywhere. The
engine gets a sidecar JSON keyed by (ONNX sha256, TensorRT version, GPU, precision, shapes), and
:func:`check_engine_key` names the first field where a sidecar differs from a device's key. The runtime
never loads these engines, so nothing refuses one: it runs the ONNX model through ONNX Runtime, whose
TensorRT execution provider builds and caches its own engines (``edge_app/features.py``). What
``musc-export trt`` gives a device is the check that TensorRT runs this model within tolerance. Running an
engine for the parity check needs CUDA buffers, which come from PyTorch's CUDA tensors (present on JetPack
images with PyTorch).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from musc_edge.edge.manifest import load_manifest


class TensorRTUnavailable(ImportError):
    """TensorRT (or CUDA for running it) is not installed on this machine."""


def _trt():
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise TensorRTUnavailable("TensorRT is not installed here; on a Jetson it comes with JetPack "
                                  "(python3-libnvinfer). Build engines on the device that will run them.") from exc
    return trt


def engine_key(onnx_sha256: str, trt_version: str, gpu: str, precision: str, shapes: dict) -> dict:
    """Everything an engine depends on; two engines are interchangeable only if their keys are equal."""
    return {"onnx_sha256": onnx_sha256, "tensorrt": trt_version, "gpu": gpu, "precision": precision,
            "shapes": {k: list(v) for k, v in sorted(shapes.items())}}


def check_engine_key(engine_path: str | Path, expected: dict) -> None:
    """Raise ValueError naming the first field where the engine's sidecar differs from ``expected``."""
    sidecar = Path(engine_path).with_suffix(".json")
    if not sidecar.is_file():
        raise ValueError(f"engine {engine_path} has no sidecar {sidecar}; rebuild it with `musc-export trt`")
    stored = json.loads(sidecar.read_text())
    for field in expected:
        if stored.get(field) != expected[field]:
            raise ValueError(f"engine {engine_path} was built for {field}={stored.get(field)!r}, "
                             f"this device needs {expected[field]!r}; rebuild it with `musc-export trt`")


def _gpu_name() -> str:
    import torch

    props = torch.cuda.get_device_properties(0)
    return f"{props.name} sm_{props.major}{props.minor}"


def build_engine(model_path: str | Path, out: str | Path | None = None, size: int = 224, max_batch: int = 1,
                 fp16: bool = True, workspace_bytes: int = 2 << 30) -> Path:
    """Parse the ONNX feature model and build a serialized engine with one optimisation profile."""
    trt = _trt()
    manifest = load_manifest(model_path)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0 if int(trt.__version__.split(".")[0]) >= 10 else 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(model_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ValueError(f"TensorRT could not parse {model_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    if fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    shape = (1, 3, size, size)
    profile = builder.create_optimization_profile()
    profile.set_shape(manifest.input_name, shape, shape, (max_batch, 3, size, size))
    config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ValueError(f"TensorRT failed to build an engine for {model_path} (see the log above)")
    precision = "fp16" if fp16 else "fp32"
    out = Path(out) if out else Path(model_path).with_name(f"{Path(model_path).stem}.{precision}.{size}.engine")
    out.write_bytes(bytes(serialized))
    key = engine_key(manifest.model_sha256, trt.__version__, _gpu_name(), precision,
                     {manifest.input_name: (max_batch, 3, size, size)})
    out.with_suffix(".json").write_text(json.dumps(key, indent=2) + "\n")
    return out


def run_engine(engine_path: str | Path, batch: np.ndarray, output_names: list[str]) -> list[np.ndarray]:
    """Execute a serialized engine on one input batch (CUDA buffers from PyTorch)."""
    trt = _trt()
    try:
        import torch
    except ImportError as exc:
        raise TensorRTUnavailable("running an engine here needs PyTorch with CUDA for device buffers") from exc
    logger = trt.Logger(trt.Logger.WARNING)
    engine = trt.Runtime(logger).deserialize_cuda_engine(Path(engine_path).read_bytes())
    context = engine.create_execution_context()
    inputs = torch.from_numpy(np.ascontiguousarray(batch)).cuda()
    input_name = engine.get_tensor_name(0)
    context.set_input_shape(input_name, tuple(inputs.shape))
    context.set_tensor_address(input_name, inputs.data_ptr())
    outputs = {}
    for name in output_names:
        out = torch.empty(tuple(context.get_tensor_shape(name)), dtype=torch.float32, device="cuda")
        context.set_tensor_address(name, out.data_ptr())
        outputs[name] = out
    stream = torch.cuda.Stream()
    if not context.execute_async_v3(stream.cuda_stream):
        raise RuntimeError(f"TensorRT execution of {engine_path} failed")
    stream.synchronize()
    return [outputs[n].cpu().numpy() for n in output_names]


def verify_engine(model_path: str | Path, engine_path: str | Path, size: int = 224, count: int = 4,
                  min_cos: float = 0.999):
    """Parity of the engine against ONNX Runtime (CPU) on seeded synthetic parts, per output."""
    import onnxruntime as ort

    from musc_edge.edge.features import preprocess

    from .verify import compare, load_images

    manifest = load_manifest(model_path)
    names = [*manifest.token_outputs, manifest.image_token_output]
    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    rows = []
    for image in load_images(None, count):
        batch = preprocess([image], size, manifest)
        ours = run_engine(engine_path, batch, names)
        reference = session.run(names, {manifest.input_name: batch})
        rows.append([compare(n, a, b, atol=float("inf"), min_cos=min_cos) for n, a, b in zip(names, ours, reference)])
    # Worst case per output over the images.
    return [min(group, key=lambda r: r.min_cos) for group in zip(*rows)]
