"""The sources' errors, shared by their configs (edge_app/sources/configs.py) and implementations, and the
frame bytes that carry one (:class:`UndecodableFrame`)."""
from __future__ import annotations

from typing import Any


class SourceError(RuntimeError):
    """A source cannot be opened or stopped delivering frames."""


class SourceConfigError(SourceError, ValueError):
    """A source configuration is incomplete or has an invalid key or value."""


def require(ok: bool, key: str, value: Any, expected: str) -> None:
    """Raise ``SourceConfigError`` naming ``key`` and ``value`` unless ``ok``."""
    if not ok:
        raise SourceConfigError(f"source config key {key!r} must be {expected}, got {value!r}")


class UndecodableFrame(bytes):
    """Frame bytes a source already knows to be unusable; ``decode_part`` raises ``DecodeError(reason)``.

    Lets a source hand a malformed frame on as a part (so it gets its NO_VERDICT) instead of dropping it,
    while keeping whatever bytes arrived for the archive.
    """

    reason: str

    def __new__(cls, payload: bytes, reason: str) -> UndecodableFrame:
        frame = super().__new__(cls, payload)
        frame.reason = reason
        return frame
