"""Frame sources (replayed conveyor, OpenCV camera, ZeroMQ, GenICam through Aravis) and the 3D-scanner interface.

Pick one from a config with :func:`make_source`; decode its parts with :func:`decode_part`. The configs
(edge_app/sources/configs.py) import no implementation, and each implementation's module is imported on
demand: by :func:`make_source` for the type a line opens, or here when one of its names is first used.
"""
from __future__ import annotations

import importlib
from typing import Any

from .base import (
    DecodeError,
    FrameSource,
    PartIds,
    SourceConfig,
    SourceConfigError,
    SourceError,
    SourceNotOpenError,
    UndecodableFrame,
    decode_image,
    decode_part,
    make_source,
    source_config,
)
from .configs import (
    AnySourceConfig,
    GenICamConfig,
    OpenCVCameraConfig,
    ReplayConfig,
    SourceSection,
    ZmqSourceConfig,
    parse_source_config,
)
from .scanner import cloud_problem, normalize_cloud

# Names of the implementations, by module (imported when first used: see the module docstring).
_ON_DEMAND = {
    "GenICamSource": "genicam", "OpenCVCameraSource": "opencv_camera", "ReplaySource": "replay",
    "ZmqFramePusher": "zmq_source", "ZmqSource": "zmq_source", "parse_message": "zmq_source",
    "send_frame": "zmq_source",
}


def __getattr__(name: str) -> Any:
    if name in _ON_DEMAND:
        return getattr(importlib.import_module(f"{__name__}.{_ON_DEMAND[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "AnySourceConfig", "DecodeError", "FrameSource", "GenICamConfig", "GenICamSource", "OpenCVCameraConfig",
    "OpenCVCameraSource", "PartIds", "ReplayConfig", "ReplaySource", "SourceConfig", "SourceConfigError",
    "SourceError", "SourceNotOpenError", "SourceSection", "UndecodableFrame", "ZmqFramePusher", "ZmqSource",
    "ZmqSourceConfig", "cloud_problem", "decode_image", "decode_part", "make_source", "normalize_cloud",
    "parse_message", "parse_source_config", "send_frame", "source_config",
]
