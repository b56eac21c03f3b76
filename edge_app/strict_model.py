"""The one policy every config model follows (line, link, telemetry): unknown keys refused, values frozen,
and every number finite, a number (``true`` is not 1), and within the range its field states.

A numeric field states both ends of its range (``ge``/``gt`` and ``le``/``lt``); durations are capped, so
no setting can turn into an overflow, a busy loop or a wait that never ends. ``tests/test_bounds.py``
walks every numeric field of every config model and holds each to this.
"""
from __future__ import annotations

import types
from typing import Any, Union, get_args, get_origin

from pydantic import BaseModel, ConfigDict, model_validator

MAX_DURATION_S = 86_400.0   # a day: the longest any period, timeout or interval may be


def numeric_annotation(annotation: Any) -> bool:
    """True for ``int``, ``float`` and their ``Optional`` forms (the fields the numeric policy covers)."""
    if get_origin(annotation) in (Union, types.UnionType):
        args = [a for a in get_args(annotation) if a is not type(None)]
        return len(args) == 1 and numeric_annotation(args[0])
    return annotation in (int, float)


class StrictModel(BaseModel):
    """Base of every config section: see the module docstring."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _booleans_are_not_numbers(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for key, value in data.items():
                field = cls.model_fields.get(key) if isinstance(key, str) else None
                if isinstance(value, bool) and field is not None and numeric_annotation(field.annotation):
                    raise ValueError(f"{key} must be a number, not {str(value).lower()}")
        return data
