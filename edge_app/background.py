"""Background threads yield the CPU to the line's hot path."""
from __future__ import annotations

import os
import threading

BACKGROUND_NICENESS = 10   # archive writing, pool persistence: on a busy device they run late, parts don't


def lower_this_thread(niceness: int = BACKGROUND_NICENESS) -> None:
    """Give the calling thread a lower CPU priority (Linux: per-thread niceness); elsewhere, or when not
    permitted, it keeps its priority."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), niceness)
    except (AttributeError, OSError):
        pass


def idle_this_thread() -> None:
    """Run the calling thread (and every process or thread it starts later) only when a CPU would otherwise
    idle: Linux ``SCHED_IDLE``, which a waking line thread pre-empts at once; weaker than any niceness. Where
    that is not available the thread gets the lowest niceness instead."""
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    except (AttributeError, OSError):
        lower_this_thread(19)
