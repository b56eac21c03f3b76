"""Which numbered frames of a ZeroMQ sender never arrived.

A sender may number its messages: header ``sender`` (who) and ``frame_id`` (its counter, one up per message;
:class:`~musc_edge.edge.sources.zmq_source.ZmqFramePusher` does both). One sender's messages arrive in order
(one TCP stream at a time, and ZeroMQ drops a broken connection's queue rather than replaying it), so a later id
shows at once which ones were lost: a message over ``max_message_bytes``, or what was in flight when a
connection broke. An id at or below the last one is the sender's counter starting again (a restarted sender),
not a loss. A numbered frame's ``source_ref`` is ``zmq://<sender>/<frame id>`` (:func:`frame_ref`), so that a
restarted line resumes each sender's count from its ledger (:meth:`SenderFrames.resume`) and the frames the
last run received but never recorded (a kill, a power cut) are found as well. Pure bookkeeping, no I/O.
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from typing import Any

from .fields import shown

MAX_SENDER_CHARS = 48    # so that a frame_ref fits the 80 characters of a source_ref
MAX_FRAME_ID = 2 ** 63 - 1
MAX_SENDERS = 256        # senders remembered; the one heard from least recently is forgotten first
RESUME_ROWS = 4096       # newest ledger rows a restarted line reads the senders' counts from
REF_PREFIX = "zmq://"


def frame_ref(sender: str, frame_id: int) -> str:
    """The ``source_ref`` of a numbered frame: ``zmq://<sender>/<frame id>``."""
    return f"{REF_PREFIX}{sender}/{frame_id}"


def parse_frame_ref(ref: str | None) -> tuple[str, int] | None:
    """``(sender, frame_id)`` of a :func:`frame_ref`, None for any other ``source_ref``."""
    if not ref or not ref.startswith(REF_PREFIX):
        return None
    sender, _, frame_id = ref[len(REF_PREFIX):].rpartition("/")
    return (sender, int(frame_id)) if frame_id.isdigit() and frame_id.isascii() else None


def frame_number(header: dict[str, Any]) -> tuple[str, int] | None:
    """``(sender, frame_id)`` of a message header, None when it carries no ``frame_id``; ValueError naming the
    field when either is malformed (``sender`` defaults to "" when only ``frame_id`` is given)."""
    frame_id, sender = header.get("frame_id"), header.get("sender", "")
    if frame_id is None:
        return None
    if not isinstance(frame_id, int) or isinstance(frame_id, bool) or not 0 <= frame_id <= MAX_FRAME_ID:
        raise ValueError(f"header 'frame_id' must be an integer in 0..2^63-1, got {shown(frame_id)}")
    if not isinstance(sender, str) or len(sender) > MAX_SENDER_CHARS or not sender.isprintable():
        raise ValueError(f"header 'sender' must be printable text of at most {MAX_SENDER_CHARS} characters, "
                         f"got {shown(sender)}")
    return sender, frame_id


class SenderFrames:
    """The last frame id of each sender (the :data:`MAX_SENDERS` most recent ones)."""

    def __init__(self, max_senders: int = MAX_SENDERS) -> None:
        self.max_senders = max_senders
        self._last: OrderedDict[str, int] = OrderedDict()
        self.missing = 0     # frame ids found missing so far
        self.restarts = 0    # counters that started again

    def resume(self, source_refs: Iterable[str | None]) -> int:
        """Take each sender's last frame id from a ledger's ``source_refs`` (oldest first); how many senders."""
        for ref in source_refs:
            if (numbered := parse_frame_ref(ref)) is not None:
                sender, frame_id = numbered
                self._remember(sender, max(frame_id, self._last.pop(sender, -1)))
        return len(self._last)

    def _remember(self, sender: str, frame_id: int) -> None:
        self._last[sender] = frame_id
        if len(self._last) > self.max_senders:
            self._last.popitem(last=False)

    def observe(self, sender: str, frame_id: int) -> range:
        """Record that ``sender``'s frame ``frame_id`` arrived; the ids it skipped since its last one."""
        last = self._last.pop(sender, None)
        self._remember(sender, frame_id)
        if last is None:
            return range(0)
        if frame_id <= last:
            self.restarts += 1
            return range(0)
        self.missing += frame_id - last - 1
        return range(last + 1, frame_id)
