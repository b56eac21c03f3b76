"""Reduced-precision feature models: INT8 (ONNX Runtime static quantization) for CPUs, FP16 for GPUs.

INT8 is *static*: activation ranges come from calibration images (a folder of good parts, or a line's pool
images), weights are quantized per output channel. Only the matrix products are quantized by default
(``MatMul``: attention and MLP, ~97 % of the MACs); LayerNorm, softmax and GELU stay in fp32, where
ViT activations have their outliers. The FP16 variant converts weights and activations to float16 but keeps
float32 inputs and outputs, so the runtime feeds and reads it like the fp32 model; it is meant for
CUDA/TensorRT (x86 CPUs have no fast fp16 kernels in ONNX Runtime).

Every variant gets its own manifest (``precision`` and ``quantization`` recorded) and must pass
``musc-export verify`` against its fp32 parent before it is used on a line.

The weights are exact on the CPU that builds the model: ONNX Runtime's x86 u8 x s8 kernels sum two 8-bit
products in a saturating 16-bit lane unless the CPU has VNNI or AMX (the reason ONNX Runtime documents for
``reduce_range``: 7-bit weights, for which 2 x 255 x 64 < 2^15). ``reduce_range=None`` (the default) picks 7-bit
weights on an x86 CPU without VNNI/AMX and full 8 bits elsewhere; the manifest records the choice and the
CPU (``quantization.reduce_range``, ``quantization.built_on``), so a line on another CPU can tell whether the
model is exact there (:func:`int8_exact_here`).
"""
from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from musc_edge.edge.features import preprocess
from musc_edge.edge.manifest import Manifest, load_manifest, sha256_of, write_manifest

QUANT_FORMATS = ("qdq", "qoperator")  # dynamic mode always writes QOperator (MatMulInteger) graphs
CALIBRATION_METHODS = ("minmax", "percentile", "entropy")


@dataclass(frozen=True)
class QuantSettings:
    """How an INT8 model is made (recorded in its manifest)."""

    mode: str = "static"                 # static (calibrated activation ranges) | dynamic (ranges per image)
    quant_format: str = "qdq"            # qdq (QuantizeLinear/DequantizeLinear pairs) | qoperator (QLinear ops)
    op_types: tuple[str, ...] = ("MatMul",)
    per_channel: bool = True
    method: str = "minmax"
    reduce_range: bool | None = None     # 7-bit weights; None: on x86 CPUs without VNNI/AMX (u8s8 saturation)
    weights_only: bool = True            # skip activation x activation products (attention QK^T and AV)
    keep_fp32: tuple[str, ...] = ()      # nodes whose name contains one of these stay fp32 ("edges": first
                                         # and last block)
    calibration_images: int = 0          # filled in by quantize_int8

    def validate(self) -> None:
        if self.mode not in ("static", "dynamic"):
            raise ValueError(f"unknown quantization mode {self.mode!r}: expected 'static' or 'dynamic'")
        if self.quant_format not in QUANT_FORMATS:
            raise ValueError(f"unknown quantization format {self.quant_format!r}: expected one of {QUANT_FORMATS}")
        if self.method not in CALIBRATION_METHODS:
            raise ValueError(f"unknown calibration method {self.method!r}: expected one of {CALIBRATION_METHODS}")


def cpu_has_vnni() -> bool:
    """True when this CPU has an 8-bit dot-product instruction (AVX-512 VNNI / AVX-VNNI / AMX)."""
    from musc_edge.edge.cpu_features import cpu_features

    cpu = cpu_features()
    return cpu.vnni or cpu.amx


def choose_reduce_range(settings: QuantSettings, cpu=None) -> bool:
    """The settings' ``reduce_range``, or when None what is exact on ``cpu`` (default: this machine's): 7-bit
    weights where ONNX Runtime's u8 x s8 kernels can saturate (x86 without VNNI/AMX), 8-bit elsewhere."""
    if settings.reduce_range is not None:
        return settings.reduce_range
    from musc_edge.edge.cpu_features import cpu_features

    return not (cpu or cpu_features()).int8_exact


def int8_exact_here(quantization: dict, cpu=None) -> tuple[bool, str]:
    """Whether a model quantized with ``quantization`` (its manifest's record) computes exactly on ``cpu``
    (default: this machine's), and why not: 8-bit weights saturate in u8 x s8 kernels without VNNI/AMX."""
    from musc_edge.edge.cpu_features import cpu_features

    cpu = cpu or cpu_features()
    if quantization.get("reduce_range", False) or cpu.int8_exact:
        return True, ""
    return False, (f"its weights use 8 bits (built on {quantization.get('built_on', {}).get('features', '?')}) and "
                   f"this CPU has no VNNI/AMX ({', '.join(cpu.names()) or cpu.machine}): ONNX Runtime's u8 x s8 "
                   "products can saturate here; quantize it on this CPU (7-bit weights, reduce_range)")


class _Batches:
    """ONNX Runtime calibration reader over preprocessed images, one at a time."""

    def __init__(self, input_name: str, batch: np.ndarray):
        self.input_name, self.batch, self.index = input_name, batch, 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.index >= len(self.batch):
            return None
        self.index += 1
        return {self.input_name: self.batch[self.index - 1:self.index]}

    def rewind(self) -> None:
        self.index = 0


def activation_products(model_path: str | Path) -> list[str]:
    """Names of the MatMul nodes with no weight operand (attention scores and attention-weighted values)."""
    import onnx

    model = onnx.load(str(model_path), load_external_data=False)
    weights = {t.name for t in model.graph.initializer}
    weights |= {n.output[0] for n in model.graph.node if n.op_type == "Constant"}
    return [n.name for n in model.graph.node if n.op_type == "MatMul" and not any(x in weights for x in n.input)]


def node_names(model_path: str | Path) -> list[str]:
    import onnx

    return [n.name for n in onnx.load(str(model_path), load_external_data=False).graph.node]


def edge_blocks(model_path: str | Path) -> list[str]:
    """Node-name parts of the first and last transformer block in the graph (``layer.0/``, ``layer.8/``).

    Keeping these two in fp32 (``keep_fp32=("edges",)``) halved the INT8 verdict flips on the bottle line."""
    import re

    found = {int(m.group(1)) for name in node_names(model_path) if (m := re.search(r"/layer\.(\d+)/", name))}
    return [f"/layer.{min(found)}/", f"/layer.{max(found)}/"] if found else []


def variant_manifest(parent: Manifest, out_path: Path, precision: str, quantization: dict) -> Manifest:
    """The parent's manifest for a derived model: same contract, new bytes, precision and lineage recorded."""
    from dataclasses import replace

    source = {"kind": parent.source.get("kind", ""), "parent_sha256": parent.model_sha256,
              **{k: v for k, v in parent.source.items() if k != "kind"}}
    return replace(parent, model_sha256=sha256_of(out_path), precision=precision, source=source,
                   quantization=quantization)


def quantize_int8(model_path: str | Path, out_path: str | Path, images: list[np.ndarray], size: int = 224,
                  settings: QuantSettings = QuantSettings()) -> Manifest:
    """INT8 quantization of an exported fp32 feature model; static mode is calibrated on ``images`` (RGB uint8).

    Dynamic mode measures each activation's range per image at run time (no calibration set, a little
    slower, closer to fp32); measured on bottle in docs/benchmarks.md."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_dynamic, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from dataclasses import asdict, replace

    from musc_edge.edge.cpu_features import cpu_features

    settings.validate()
    settings = replace(settings, reduce_range=choose_reduce_range(settings))
    if not images and settings.mode == "static":
        raise ValueError("static INT8 calibration needs at least one image")
    model_path, out_path = Path(model_path), Path(out_path)
    parent = load_manifest(model_path)
    if parent.precision != "fp32":
        raise ValueError(f"{model_path} is already {parent.precision}; quantize the fp32 model")
    batch = preprocess(images, size, parent) if images else np.zeros((0, 3, size, size), np.float32)
    method = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
              "entropy": CalibrationMethod.Entropy}[settings.method]
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="musc-quant-") as tmp:
        prepped = Path(tmp) / "prepped.onnx"
        # Shape inference + graph optimisation first, as ONNX Runtime recommends before quantization.
        quant_pre_process(str(model_path), str(prepped), skip_symbolic_shape=True)
        exclude = activation_products(prepped) if settings.weights_only else []
        keep = edge_blocks(prepped) + [p for p in settings.keep_fp32 if p != "edges"] \
            if "edges" in settings.keep_fp32 else list(settings.keep_fp32)
        exclude += [name for name in node_names(prepped) if any(part in name for part in keep)]
        target = str(out_path.with_suffix(".onnx.tmp"))
        if settings.mode == "dynamic":
            quantize_dynamic(str(prepped), target, op_types_to_quantize=list(settings.op_types),
                             per_channel=settings.per_channel, reduce_range=settings.reduce_range,
                             weight_type=QuantType.QInt8, nodes_to_exclude=exclude)
        else:
            quantize_static(
                str(prepped), target, _Batches(parent.input_name, batch),
                quant_format=QuantFormat.QDQ if settings.quant_format == "qdq" else QuantFormat.QOperator,
                op_types_to_quantize=list(settings.op_types), per_channel=settings.per_channel,
                reduce_range=settings.reduce_range, activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8, calibrate_method=method, nodes_to_exclude=exclude,
                extra_options={"CalibTensorRangeSymmetric": False, "CalibMovingAverage": False})
    out_path.with_suffix(".onnx.tmp").replace(out_path)
    recorded = {**asdict(replace(settings, calibration_images=len(images))), "built_on": cpu_features().as_dict()}
    if settings.mode == "dynamic":  # no calibration, and always MatMulInteger (QOperator) nodes
        for key in ("quant_format", "method", "calibration_images"):
            recorded.pop(key)
    manifest = variant_manifest(parent, out_path, "int8", {**recorded, "op_types": list(settings.op_types),
                                                           "keep_fp32": list(settings.keep_fp32), "size": size})
    write_manifest(out_path, manifest)
    return manifest


def convert_fp16(model_path: str | Path, out_path: str | Path) -> Manifest:
    """Float16 weights and activations, float32 inputs/outputs (for CUDA / TensorRT execution providers)."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model_path, out_path = Path(model_path), Path(out_path)
    parent = load_manifest(model_path)
    if parent.precision != "fp32":
        raise ValueError(f"{model_path} is already {parent.precision}; convert the fp32 model")
    model = convert_float_to_float16(onnx.load(str(model_path)), keep_io_types=True,
                                     op_block_list=["Resize"])  # bicubic position-embedding resize stays fp32
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_suffix(".onnx.tmp")
    onnx.save(model, str(tmp))
    tmp.replace(out_path)
    manifest = variant_manifest(parent, out_path, "fp16", {"keep_io_types": True})
    write_manifest(out_path, manifest)
    return manifest
