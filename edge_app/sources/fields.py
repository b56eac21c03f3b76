"""The fields of a new part, checked where it is created (sources, control socket, test fire).

Everything a part carries must fit where it goes later: the part id on the wire (1..64 bytes of UTF-8,
docs/wire-protocol.md) and in the ledger, the encoder count in SQLite's INTEGER (int64), times as finite
UTC epoch seconds. A part with a field that does not fit is *not* refused: it keeps its place in the
stream, under a safe id derived from the bad one, and is decided NO_VERDICT (decode_error) with the
offending value (truncated) in its detail, so it gets one row and one signal like every other part:
a 65-byte ``part_id`` becomes ``BAD-<12 hex digits>`` and NO_VERDICT, ``encoder: 2**70`` becomes None.
"""
from __future__ import annotations

import hashlib
import math
import time

from ..record import PartRecord, Reason, Verdict

MAX_PART_ID_BYTES = 64             # the wire's limit (edge_app/links/framing.py)
MAX_RECIPE_BYTES = 64
INT64 = (-(2 ** 63), 2 ** 63 - 1)  # SQLite INTEGER
LATEST_CAPTURE_S = 1e10            # UTC epoch seconds, year 2286: later is a broken clock or a hostile header
SHOWN_CHARS = 80                   # of an offending value in the detail


class PartFieldError(ValueError):
    """A field of a new part does not fit the wire or the ledger."""


def shown(value: object) -> str:
    """``repr(value)`` cut to SHOWN_CHARS characters (with its full length when cut)."""
    text = repr(value)
    return text if len(text) <= SHOWN_CHARS else f"{text[:SHOWN_CHARS]}... ({len(text)} chars)"


def part_id_problem(part_id: object) -> str | None:
    """Why ``part_id`` cannot be a part id (wire and ledger), or None."""
    if not isinstance(part_id, str):
        return f"part_id {shown(part_id)} is not a string"
    try:
        size = len(part_id.encode("utf-8"))
    except UnicodeEncodeError:
        return f"part_id {shown(part_id)} is not valid UTF-8 (lone surrogate)"
    if not 1 <= size <= MAX_PART_ID_BYTES:
        return f"part_id {shown(part_id)} is {size} bytes of UTF-8, must be 1..{MAX_PART_ID_BYTES}"
    if not part_id.isprintable():
        return f"part_id {shown(part_id)} contains control characters"
    return None


def require_part_id(part_id: object) -> str:
    """``part_id`` if it can be a part id, else PartFieldError (for ids a person types: test fire)."""
    problem = part_id_problem(part_id)
    if problem is not None:
        raise PartFieldError(problem)
    return part_id


def safe_part_id(bad: object) -> str:
    """A valid id standing for an invalid one: ``BAD-`` + 12 hex digits of its SHA-256 (stable, no echo)."""
    return "BAD-" + hashlib.sha256(repr(bad).encode("utf-8", "backslashreplace")).hexdigest()[:12]


def _recipe_ok(recipe: object) -> bool:
    try:
        return isinstance(recipe, str) and 1 <= len(recipe.encode("utf-8")) <= MAX_RECIPE_BYTES
    except UnicodeEncodeError:
        return False


def storable_text(text: str) -> str:
    """``text`` with anything UTF-8 cannot encode (lone surrogates from JSON) backslash-escaped."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _problems(part: PartRecord) -> list[str]:
    problems = []
    if (problem := part_id_problem(part.part_id)) is not None:
        problems.append(problem)
    recipe = part.recipe
    if not _recipe_ok(recipe):
        problems.append(f"recipe {shown(recipe)} must be 1..{MAX_RECIPE_BYTES} bytes of UTF-8")
    encoder = part.encoder
    if encoder is not None and (isinstance(encoder, bool) or not isinstance(encoder, int)
                                or not INT64[0] <= encoder <= INT64[1]):
        problems.append(f"encoder {shown(encoder)} is not a 64-bit integer")
    capture = part.capture_time
    if isinstance(capture, bool) or not isinstance(capture, (int, float)) or not math.isfinite(capture) \
            or not 0 <= capture <= LATEST_CAPTURE_S:
        problems.append(f"capture_time {shown(capture)} is not UTC epoch seconds in 0..{LATEST_CAPTURE_S:g}")
    if not isinstance(part.test_part, bool):
        problems.append(f"test_part {shown(part.test_part)} is not true or false")
    return problems


def check_part_fields(part: PartRecord, *, default_recipe: str | None = None) -> PartRecord:
    """``part`` itself, made safe: every field that does not fit is replaced (id by :func:`safe_part_id`,
    recipe by ``default_recipe``, encoder by None, capture time by now) and the part decided NO_VERDICT
    (decode_error) naming the offending values. A part without problems is returned untouched."""
    if isinstance(part.source_ref, str):
        part.source_ref = storable_text(part.source_ref)
    if isinstance(part.detail, str):
        part.detail = storable_text(part.detail)
    problems = _problems(part)
    if not problems:
        return part
    if part_id_problem(part.part_id) is not None:
        part.part_id = safe_part_id(part.part_id)
    if isinstance(part.source_ref, str):
        part.source_ref = part.source_ref[:SHOWN_CHARS]
    if not _recipe_ok(part.recipe):
        part.recipe = default_recipe or "default"
    if part.encoder is not None and any(p.startswith("encoder") for p in problems):
        part.encoder = None
    if any(p.startswith("capture_time") for p in problems):
        part.capture_time = time.time()
    if not isinstance(part.test_part, bool):
        part.test_part = False
    part.raw = part.image = part.cloud = None
    return part.decide(Verdict.NO_VERDICT, Reason.DECODE_ERROR,
                       storable_text("bad part fields: " + "; ".join(problems)))


def quarantine(part: PartRecord, why: str) -> PartRecord:
    """Last resort for a part the ledger refused for its content (not for its storage): only safe fields
    remain, decided NO_VERDICT (decode_error) saying why."""
    part.part_id = safe_part_id(part.part_id)
    part.recipe = part.recipe if _recipe_ok(part.recipe) else "default"
    part.encoder, part.source_ref = None, None
    part.raw_score = part.score = part.threshold = None
    part.raw = part.image = part.cloud = None
    return part.decide(Verdict.NO_VERDICT, Reason.DECODE_ERROR, storable_text(f"unrecordable part: {why}")[:500])
