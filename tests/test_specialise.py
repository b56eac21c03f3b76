"""Folding a feature model's constant resizes for the runtime's input size: same outputs, less work."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from musc_edge.edge.features import FeatureEngine
from musc_edge.edge.specialise import fold_constant_resizes, specialised_model


def resize_model(table_from_input: bool) -> onnx.ModelProto:
    """``out = image + resize(table, image's spatial size)``: the table is a constant (like a ViT's position
    embedding) or, with ``table_from_input``, computed from the image's values."""
    table = numpy_helper.from_array(np.random.default_rng(0).normal(size=(1, 3, 5, 5)).astype(np.float32), "table")
    nodes = [helper.make_node("Shape", ["image"], ["shape"]),
             helper.make_node("Slice", ["shape", "two", "four"], ["hw"]),
             helper.make_node("Concat", ["nc", "hw"], ["sizes"], axis=0)]
    source = "table"
    if table_from_input:
        nodes.append(helper.make_node("ReduceMean", ["image"], ["mean"], axes=[2, 3], keepdims=1))
        nodes.append(helper.make_node("Mul", ["table", "mean"], ["scaled"]))
        source = "scaled"
    nodes += [helper.make_node("Resize", [source, "", "", "sizes"], ["resized"], mode="linear"),
              helper.make_node("Add", ["image", "resized"], ["out"])]
    constants = [table, numpy_helper.from_array(np.array([2], np.int64), "two"),
                 numpy_helper.from_array(np.array([4], np.int64), "four"),
                 numpy_helper.from_array(np.array([1, 3], np.int64), "nc")]
    graph = helper.make_graph(nodes, "toy", [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 3, "h", "w"])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)], constants)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def run(model: onnx.ModelProto, image: np.ndarray) -> np.ndarray:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        ["out"], {"image": image})[0]


def test_a_resize_of_a_constant_is_folded_and_the_model_computes_the_same() -> None:
    model = resize_model(table_from_input=False)
    image = np.random.default_rng(1).normal(size=(1, 3, 12, 12)).astype(np.float32)
    expected = run(model, image)
    assert fold_constant_resizes(model, 12) == 1
    assert not any(node.op_type == "Resize" for node in model.graph.node)
    assert "table" not in {init.name for init in model.graph.initializer}, \
        "the resized constant is dropped, not left for ONNX Runtime to remove with a warning at every start"
    np.testing.assert_array_equal(run(model, image), expected)


def test_a_resize_of_values_from_the_input_is_left_alone() -> None:
    model = resize_model(table_from_input=True)
    assert fold_constant_resizes(model, 12) == 0
    assert sum(node.op_type == "Resize" for node in model.graph.node) == 1


def test_specialised_model_says_when_there_is_nothing_to_fold(tmp_path) -> None:
    path = tmp_path / "values.onnx"
    onnx.save(resize_model(table_from_input=True), path)
    assert specialised_model(path, 12) is None


@pytest.mark.parametrize("size", [224, 280])
def test_the_default_model_gives_identical_tokens_after_folding(default_model, size) -> None:
    images = [np.random.default_rng(s).integers(0, 256, (300, 300, 3), dtype=np.uint8) for s in range(2)]
    folded = FeatureEngine(default_model, size=size, threads=1)
    assert specialised_model(default_model, size) is not None   # the ViT's position embedding resize
    plain = FeatureEngine.__new__(FeatureEngine)
    plain.__dict__.update(folded.__dict__)
    plain.session = ort.InferenceSession(str(default_model), providers=["CPUExecutionProvider"])
    a, b = folded(images, batch_size=2), plain(images, batch_size=2)
    for x, y in zip(a.layers, b.layers):
        np.testing.assert_array_equal(x, y)
