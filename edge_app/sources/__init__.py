"""Frame sources (replayed conveyor, OpenCV camera, ZeroMQ, GenICam through Aravis) and the 3D-scanner interface.

Pick one from a config with :func:`make_source`; decode its parts with :func:`decode_part`.
"""
from __future__ import annotations

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
from .genicam import GenICamConfig, GenICamSource
from .opencv_camera import OpenCVCameraConfig, OpenCVCameraSource
from .replay import ReplayConfig, ReplaySource
from .scanner import cloud_problem, normalize_cloud
from .zmq_source import ZmqFramePusher, ZmqSource, ZmqSourceConfig, parse_message, send_frame

__all__ = [
    "DecodeError", "FrameSource", "GenICamConfig", "GenICamSource", "OpenCVCameraConfig", "OpenCVCameraSource",
    "PartIds", "ReplayConfig", "ReplaySource", "SourceConfig", "SourceConfigError",
    "SourceError", "SourceNotOpenError", "UndecodableFrame", "ZmqFramePusher", "ZmqSource", "ZmqSourceConfig",
    "cloud_problem", "decode_image", "decode_part", "make_source", "normalize_cloud", "parse_message",
    "send_frame", "source_config",
]
