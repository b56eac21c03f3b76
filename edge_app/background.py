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
