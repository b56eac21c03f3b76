"""What travels on the line's queues: one small type per queue, and :data:`END`, the end of a stream.

=====================  ===========================  ==============================================
queue                  carries                      from -> to
=====================  ===========================  ==============================================
``Line._in``           ``PartRecord`` | ``END``     source -> prefetch (bounded: line.queue_size)
``Line._ready``        :class:`Extracting` | END    prefetch -> worker, in arrival order
``OutputStage.queue``  :class:`Decided` | END       worker (and overload, test fire) -> output
``OutputStage._acks``  :class:`Ack`                 reject link's thread -> output (it writes the ledger)
``BetweenParts``       :class:`WorkerTask`          control requests -> worker, run between two parts
``PoolWriter``         pool snapshot | END          worker -> pool-writer thread
=====================  ===========================  ==============================================
"""
from __future__ import annotations

import threading
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable

from ..record import PartRecord
from .in_force import InForce


@dataclass(frozen=True)
class End:
    """Nothing more will come on this queue."""


END = End()


@dataclass(frozen=True)
class Extracting:
    """A part and its extraction (decode, features), running or done on an extract thread."""

    part: PartRecord
    pending: Future


@dataclass(frozen=True)
class Decided:
    """A part with its verdict (or NO_VERDICT), for the output stage. ``in_force`` is the calibration that
    decided it; None for a part decided outside the worker (overload, a fault, a test fire): its row then
    carries the calibration in force when it is written."""

    part: PartRecord
    in_force: InForce | None = None


@dataclass(frozen=True)
class Ack:
    """The PLC acknowledged wire sequence ``seq`` (``late``: after the part's deadline) at ``when``."""

    seq: int
    late: bool
    when: float


@dataclass(eq=False)
class WorkerTask:
    """A control change the worker runs between two parts; the requesting thread waits on ``done``."""

    run: Callable[[], Any]
    done: threading.Event = field(default_factory=threading.Event)
    result: Any = None
    error: BaseException | None = None
