"""Which numbered frames of a ZeroMQ sender never arrived.

A sender may number its messages: header ``sender`` (who) and ``frame_id`` (its counter, one up per message;
:class:`~musc_edge.edge.sources.zmq_source.ZmqFramePusher` does both). One sender's messages arrive in order
(one TCP stream at a time, and ZeroMQ drops a broken connection's queue rather than replaying it), so a later id
shows at once which ones were lost: a message over ``max_message_bytes``, or what was in flight when a
connection broke. An id at or below the last one is the sender's counter starting again (a restarted sender),
not a loss. Pure bookkeeping, no I/O.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Any

from .fields import shown

MAX_SENDER_CHARS = 64
MAX_FRAME_ID = 2 ** 63 - 1
MAX_SENDERS = 256        # senders remembered; the one heard from least recently is forgotten first


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

    def observe(self, sender: str, frame_id: int) -> range:
        """Record that ``sender``'s frame ``frame_id`` arrived; the ids it skipped since its last one."""
        last = self._last.pop(sender, None)
        self._last[sender] = frame_id
        if len(self._last) > self.max_senders:
            self._last.popitem(last=False)
        if last is None:
            return range(0)
        if frame_id <= last:
            self.restarts += 1
            return range(0)
        self.missing += frame_id - last - 1
        return range(last + 1, frame_id)
