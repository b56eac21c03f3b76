"""Which numbered frames of a ZeroMQ sender never arrived.

A sender may number its messages: header ``sender`` (who) and ``frame_id`` (its counter, one up per message;
:class:`~musc_edge.edge.sources.zmq_source.ZmqFramePusher` does both). One sender's messages arrive in order
(one TCP stream at a time, and ZeroMQ drops a broken connection's queue rather than replaying it), so a later id
after a broken connection shows at once which ones were lost: a message over ``max_message_bytes``, or what was
in flight when the connection broke. An id at or below the last one is the sender's counter starting again (a
restarted sender), not a loss. A numbered frame's ``source_ref`` is ``zmq://<sender>/<frame id>``
(:func:`frame_ref`), so that a restarted line resumes each sender's count from its ledger
(:meth:`SenderFrames.resume`) and the frames the last run received but never recorded (a kill, a power cut) are
found as well. Pure bookkeeping, no I/O.
"""
from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Iterable
from typing import Any, NamedTuple

from .fields import shown

MAX_SENDER_CHARS = 48    # so that a frame_ref fits the 80 characters of a source_ref
MAX_FRAME_ID = 2 ** 63 - 1
MAX_SENDERS = 256        # senders remembered; the one heard from least recently is forgotten first
RESUME_ROWS = 4096       # newest ledger rows a restarted line reads the senders' counts from
LOSS_WINDOW_S = 60.0     # lost-frame parts are budgeted over this window (LossBudget)
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


class Arrival(NamedTuple):
    """What one numbered frame's arrival shows about its sender's earlier ones."""

    lost: range            # ids lost in transport: skipped across a broken connection (or a restart of the line)
    skipped: range = range(0)   # ids skipped while the connection held: the sender's own doing, not a loss
    restarted: bool = False     # the id is at or below the last one: the sender counts again


class SenderFrames:
    """The last frame id of each sender (the :data:`MAX_SENDERS` most recent ones), and how many broken
    connections the source had seen by then.

    ZeroMQ loses frames only with a connection (an oversized message breaks it; so does a network fault or a
    stop of the line), so a gap counts as lost only when a connection broke since the sender's last frame, or the
    count was resumed from a ledger. Without one, the sender skipped the ids itself (a bug, or a peer that is not
    a real sender): no part is made for them, so a rogue peer cannot multiply its parts by skipping ids.
    """

    def __init__(self, max_senders: int = MAX_SENDERS) -> None:
        self.max_senders = max_senders
        self._last: OrderedDict[str, tuple[int, int]] = OrderedDict()   # sender -> (frame id, breaks seen)
        self.missing = 0     # frame ids found lost so far
        self.restarts = 0    # counters that started again

    def resume(self, source_refs: Iterable[str | None]) -> int:
        """Take each sender's last frame id from a ledger's ``source_refs`` (oldest first); how many senders.
        The line's own stop lies between, so a gap after a resumed id counts as lost."""
        for ref in source_refs:
            if (numbered := parse_frame_ref(ref)) is not None:
                sender, frame_id = numbered
                self._remember(sender, max(frame_id, self._last.pop(sender, (-1, -1))[0]), RESUMED)
        return len(self._last)

    def _remember(self, sender: str, frame_id: int, breaks: int) -> None:
        self._last[sender] = (frame_id, breaks)
        if len(self._last) > self.max_senders:
            self._last.popitem(last=False)

    def observe(self, sender: str, frame_id: int, breaks: int, breaks_before: int | None = None) -> Arrival:
        """Record that ``sender``'s frame ``frame_id`` arrived when the source had seen ``breaks`` broken
        connections in all, ``breaks_before`` of them (default: all) surely before this frame was sent; what that
        shows about the ids before it. (A break the source notices while the frame waits to be read may have come
        after it: the next gap of this sender counts it.)"""
        last = self._last.pop(sender, None)
        self._remember(sender, frame_id, breaks if breaks_before is None else breaks_before)
        if last is None:
            return Arrival(range(0))
        last_id, breaks_then = last
        if frame_id <= last_id:
            self.restarts += 1
            return Arrival(range(0), restarted=True)
        between = range(last_id + 1, frame_id)
        if breaks_then != RESUMED and breaks <= breaks_then:
            return Arrival(range(0), skipped=between)
        self.missing += len(between)
        return Arrival(between)


class LossBudget:
    """At most ``rows`` lost-frame parts within any ``window_s`` seconds, all senders together.

    ZeroMQ loses frames rarely (an oversized message, a broken connection, a stop of the line), a few at a time.
    A peer that reconnects before each message and skips ids in between would otherwise have each of its messages
    make many parts; past the budget its gaps give an alarm instead.
    """

    def __init__(self, rows: int, window_s: float = 60.0) -> None:
        self.rows, self.window_s = rows, window_s
        self._granted: deque[tuple[float, int]] = deque()   # (monotonic time, parts) of the gaps given rows
        self._used = 0

    def take(self, n: int, now: float) -> bool:
        """Whether ``n`` more lost-frame parts fit the budget at monotonic time ``now`` (taken if they do)."""
        while self._granted and now - self._granted[0][0] >= self.window_s:
            self._used -= self._granted.popleft()[1]
        if self._used + n > self.rows:
            return False
        self._granted.append((now, n))
        self._used += n
        return True


RESUMED = -1   # the "breaks seen" of a count taken from a ledger: the line's stop broke every connection
