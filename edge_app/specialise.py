"""Specialise a feature model to the one input size the runtime feeds it.

The exported ViTs take any input size, so their positional embedding is re-sampled (an ONNX ``Resize`` of a
constant to a size read from the input's shape) on every inference: ~15 ms of ~75 ms per 224 px image for the
INT8 ViT-S/14 on one CPU core, for a value that never changes while the runtime runs. Here each ``Resize`` whose
data is a constant is evaluated once, for ``size x size`` input, by ONNX Runtime on the sub-graph that feeds it,
and replaced by the result, so the specialised model computes exactly what the original computes at that size.

Needs the ``onnx`` package (the ``model`` extra); without it, or when a model has nothing to fold, the model is
run as exported.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)


_SHAPE_OPS = ("Shape", "Size")   # their outputs depend on an input's shape, not on its values


def _value_dependent(graph) -> set[str]:
    """Names of the tensors computed from the values of a graph input; the rest are fixed once the input's
    shape is (constants, and what is computed from constants and shapes)."""
    dependent = {i.name for i in graph.input} - {i.name for i in graph.initializer}
    for node in graph.node:   # ONNX graphs are topologically sorted
        if node.op_type not in _SHAPE_OPS and any(name in dependent for name in node.input if name):
            dependent.update(node.output)
    return dependent


def _feeding_nodes(graph, outputs: list[str]) -> list:
    """The nodes ``outputs`` are computed from, in graph order."""
    producer = {out: i for i, node in enumerate(graph.node) for out in node.output}
    needed, todo = set(), list(outputs)
    while todo:
        i = producer.get(todo.pop())
        if i is None or i in needed:
            continue
        needed.add(i)
        todo.extend(name for name in graph.node[i].input if name)
    return [graph.node[i] for i in sorted(needed)]


def _elem_type(graph, name: str) -> int:
    """Element type of tensor ``name`` (a Resize's output has its input's type); float when not recorded."""
    import onnx

    for info in (*graph.value_info, *graph.input, *graph.output):
        if info.name == name:
            return info.type.tensor_type.elem_type
    for init in graph.initializer:
        if init.name == name:
            return init.data_type
    return onnx.TensorProto.FLOAT


def _zeros(shape: list, batch: int, size: int) -> np.ndarray:
    """An all-zero NCHW image batch for an input of ``shape``: its fixed dims as they are, a free batch ``batch``,
    free channels 3, free height and width ``size``."""
    free = (batch, 3, size, size)
    return np.zeros([d if isinstance(d, int) else free[min(i, 3)] for i, d in enumerate(shape)], np.float32)


def fold_constant_resizes(model, size: int) -> int:
    """Replace, in place, every ``Resize`` in ``model`` (an ``onnx.ModelProto``) whose data does not depend on the
    input's values by its value for ``size x size`` input. A value that differs between batch sizes 1 and 2 is
    left as it is. Returns how many were folded."""
    import onnx
    import onnxruntime as ort
    from onnx import helper, numpy_helper

    graph = model.graph
    dependent = _value_dependent(graph)
    targets = [node for node in graph.node if node.op_type == "Resize" and node.input[0] not in dependent]
    if not targets:
        return 0
    wanted = [node.output[0] for node in targets]
    nodes = _feeding_nodes(graph, wanted)
    used = {name for node in nodes for name in node.input}
    inputs = [i for i in graph.input if i.name in used]
    sub = helper.make_graph(nodes, "fold", inputs,
                            [helper.make_tensor_value_info(node.output[0], _elem_type(graph, node.input[0]), None)
                             for node in targets],
                            [init for init in graph.initializer if init.name in used])
    sub_model = helper.make_model(sub, opset_imports=model.opset_import, ir_version=model.ir_version)
    session = ort.InferenceSession(sub_model.SerializeToString(), providers=["CPUExecutionProvider"])
    one, two = ({i.name: _zeros(i.shape, batch, size) for i in session.get_inputs()} for batch in (1, 2))
    folded = 0
    for node, value, check in zip(targets, session.run(wanted, one), session.run(wanted, two)):
        if value.shape != check.shape or not np.array_equal(value, check):
            continue
        graph.node.remove(node)
        graph.initializer.append(numpy_helper.from_array(value, node.output[0]))
        folded += 1
    _drop_unused_initializers(graph)
    return folded


def _drop_unused_initializers(graph) -> None:
    """Remove the constants no node or output reads any more (a folded Resize's data, when it was a constant):
    ONNX Runtime would drop them too, with a warning on every start."""
    read = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
    for init in [init for init in graph.initializer if init.name not in read]:
        graph.initializer.remove(init)


def specialised_model(path: str | Path, size: int) -> bytes | None:
    """The serialised model at ``path`` with its constant resizes folded for ``size x size`` input; None when
    there is nothing to fold or the ``onnx`` package is not installed (run the file as it is)."""
    try:
        import onnx
    except ImportError:
        log.info("onnx is not installed: %s runs as exported (positional embedding resized per inference)", path)
        return None
    model = onnx.load(str(path))
    if not fold_constant_resizes(model, size):
        return None
    return model.SerializeToString()
