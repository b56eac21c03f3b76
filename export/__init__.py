"""Offline exporter of musc-edge: backbones -> ONNX feature models with multi-layer patch tokens and a
manifest -> TensorRT engines built on the device, with parity checks between stages (``musc-export``)."""
