"""How the line keeps going: a fault of one part is that part's NO_VERDICT row or an alarm; a thread that
faults between parts is restarted (:func:`keep_alive`); what the line cannot survive ends ``Line.run()`` with
:class:`LineStopped` (``musc-edge run`` exits 3 with its one line, and systemd restarts it)."""
from __future__ import annotations

import logging
import time
from collections import deque
from typing import Callable

log = logging.getLogger(__name__)

THREAD_FAULTS, THREAD_FAULT_WINDOW_S = 10, 60.0   # a thread that faults this often in this window stops the line


class LineStopped(RuntimeError):
    """The line cannot go on without losing something (the ledger cannot be written): nothing was lost,
    the PLC's inspect window rejects the parts that follow. The message says why, in one line."""


class StartupError(LineStopped):
    """The line cannot start as configured (a port it must listen on is taken, ...); one line says why."""


def one_line(exc: BaseException, limit: int = 300) -> str:
    """An exception's message on one line, shortened."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[:limit] + "..."


def keep_alive(loop: Callable[[], None], name: str, *, on_alarm: Callable[[str], None],
               on_fatal: Callable[[str], None], pass_end_on: Callable[[], None] | None = None) -> Callable[[], None]:
    """``loop``, started again when an exception escapes it (each loop decides single parts' faults itself;
    what escapes is a fault between parts), each restart alarmed. Faulting ``THREAD_FAULTS`` times within
    ``THREAD_FAULT_WINDOW_S`` is fatal (``on_fatal``); ``pass_end_on`` then tells the next stage it is over."""
    def run() -> None:
        faults: deque = deque(maxlen=THREAD_FAULTS)
        while True:
            try:
                return loop()
            except Exception as exc:
                log.exception("%s thread fault", name)
                faults.append(time.monotonic())
                if len(faults) == faults.maxlen and faults[-1] - faults[0] < THREAD_FAULT_WINDOW_S:
                    on_fatal(f"the {name} thread failed {len(faults)} times within {THREAD_FAULT_WINDOW_S:.0f} s, "
                             f"last: {type(exc).__name__}: {one_line(exc)}")
                    if pass_end_on is not None:
                        pass_end_on()
                    return
                on_alarm(f"{name} thread fault, restarted: {type(exc).__name__}: {one_line(exc)}")
                time.sleep(0.05)
    return run
