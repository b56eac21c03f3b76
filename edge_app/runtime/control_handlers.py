"""The running line's answers to the control socket (``control.py`` serves them): one table, command -> handler
(command names in ``commands.py``). Reads are answered on the connection's own thread; changes are queued to the
worker and run there between two parts (:class:`BetweenParts`), and the reply comes once they are in force."""
from __future__ import annotations

import queue
import threading
import time
from typing import Callable

from ..background import idle_this_thread
from ..config import LineConfig
from ..pool import leave_one_out_scores
from ..record import PartRecord, Reason, Verdict
from ..scoring import PoolTooSmallError
from ..sources.fields import PartFieldError, require_part_id
from . import commands
from .calibration_state import AuditError, Authorised, CalibrationAuthority, CalibrationError, StoreError, \
    parse_calibration
from .control import ControlError
from .in_force import InForce
from .inspector import Inspector
from .messages import WorkerTask

LOO_REUSE_S = 10.0  # a pool's leave-one-out scores younger than this answer `pool_scores` again


class BetweenParts:
    """Control changes queued to the worker thread, which runs them between two parts."""

    def __init__(self) -> None:
        self._tasks: queue.Queue[WorkerTask] = queue.Queue()

    def run(self, task: Callable[[], dict], timeout: float = 60.0) -> dict:
        """Have the worker run ``task`` between two parts and return its result (or raise its exception)."""
        queued = WorkerTask(task)
        self._tasks.put(queued)
        if not queued.done.wait(timeout):
            raise ControlError(f"the line did not reach a gap between parts within {timeout:.0f} s")
        if queued.error is not None:
            raise queued.error
        return queued.result

    def run_pending(self) -> None:
        """Run the queued changes (worker thread, between two parts; or at shutdown)."""
        while True:
            try:
                task = self._tasks.get_nowait()
            except queue.Empty:
                return
            try:
                task.result = task.run()
            except Exception as exc:
                task.error = exc
            task.done.set()


class ControlHandlers:
    """``handle(request) -> reply`` for every command of a running line."""

    def __init__(self, config: LineConfig, inspector: Inspector, authority: CalibrationAuthority, *,
                 between_parts: BetweenParts, in_force: Callable[[], InForce],
                 put_in_force: Callable[[Authorised], None], save_pools: Callable[[], None],
                 signal_test_part: Callable[[PartRecord, float], bool], status: Callable[[], dict]):
        self.config, self.inspector, self.authority = config, inspector, authority
        self._between_parts, self._in_force, self._put_in_force = between_parts.run, in_force, put_in_force
        self._save_pools, self._signal_test_part, self._status = save_pools, signal_test_part, status
        self._loo_lock = threading.Lock()
        self._loo_cache: dict[str, tuple[float, list[float]]] = {}
        self._table = {commands.STATUS: lambda _: self._status(), commands.POOL_INSPECT: self.pool_inspect,
                       commands.POOL_SCORES: self.pool_scores, commands.APPLY: self.apply,
                       commands.POOL_PURGE: self.pool_change, commands.POOL_FREEZE: self.pool_change,
                       commands.POOL_UNFREEZE: self.pool_change, commands.POOL_RESEED: self.pool_reseed,
                       commands.TEST_FIRE: self.test_fire, commands.AUDIT_APPEND: self.audit_append}

    def handle(self, request: dict) -> dict:
        """Control-socket requests, by command name (``runtime/commands.py``; protocol in ``control.py``)."""
        handler = self._table.get(request["cmd"])
        if handler is None:
            raise ControlError(f"unknown command {request['cmd']!r}")
        return handler(request)

    def _recipe_pool(self, request: dict):
        name = request.get("recipe", "default")
        if name not in self.inspector.recipes:
            raise ControlError(f"unknown recipe {name!r}: this line has {sorted(self.inspector.recipes)}")
        return self.inspector.recipes[name]

    def pool_inspect(self, request: dict) -> dict:
        rp = self._recipe_pool(request)
        pool = rp.pool
        return {"recipe": rp.name, "members": [
            {"slot": i, "part_id": pool.part_ids[i], "raw_score": float(pool.raw_scores[i]),
             "admitted_time": float(pool.admitted_time[i]), "golden": bool(pool.golden[i])}
            for i in range(pool.size)]}

    def pool_scores(self, request: dict) -> dict:
        """Leave-one-out scores of a pool, never computed on the scoring thread: the worker only copies the
        pool's scores and re-scoring features between two parts (microseconds); this control thread scores
        them at idle priority, one request at a time, and a result younger than ``LOO_REUSE_S`` is reused, so
        any number of operators asking costs the line at most one computation in that time."""
        rp = self._recipe_pool(request)
        with self._loo_lock:
            cached = self._loo_cache.get(rp.name)
            if cached is not None and time.monotonic() - cached[0] < LOO_REUSE_S:
                return {"recipe": rp.name, "threshold": rp.threshold, "scores": cached[1], "reused": True}
            raw, features, scale = self._between_parts(lambda: (rp.pool.raw_scores[:rp.pool.size].copy(),
                                                                rp.pool.features[:rp.pool.size].copy(),
                                                                rp.pool.frozen_scale))
            idle_this_thread()   # this connection's own thread: the line's threads pre-empt it at once
            try:
                scores = leave_one_out_scores(raw, features, self.inspector.params, scale)
            except PoolTooSmallError as exc:
                raise ControlError(f"PoolTooSmallError: {exc}") from None
            self._loo_cache[rp.name] = (time.monotonic(), scores)
        return {"recipe": rp.name, "threshold": rp.threshold, "scores": scores, "reused": False}

    def apply(self, request: dict) -> dict:
        """Put an audited calibration in force between two parts: checked, written to current.json and
        recorded by the runtime itself (:meth:`CalibrationAuthority.put_in_force`), then swapped in."""
        try:
            calibration = parse_calibration(request.get("calibration") or {}, set(self.config.recipes))
        except CalibrationError as exc:
            raise ControlError(str(exc)) from None

        def apply() -> dict:
            try:
                authorised = self.authority.put_in_force(calibration, self._in_force().authorised,
                                                         self.config.line.name)
            except (CalibrationError, StoreError, OSError, AuditError) as exc:
                raise ControlError(f"apply refused: {exc}") from None
            self._put_in_force(authorised)
            return {"version": calibration.version}
        return self._between_parts(apply)

    def audit_append(self, request: dict) -> dict:
        """Append a technician client's audit record with the line's device secret (a client that cannot
        read the secret itself). The client holds the calibration lock; the runtime serialises its writers."""
        record = request.get("record")
        if not isinstance(record, dict):
            raise ControlError("audit_append needs a 'record' object")
        try:
            return {"record": self.authority.append_for_client(record)}
        except (AuditError, OSError) as exc:
            raise ControlError(f"audit record refused: {exc}") from None

    def pool_change(self, request: dict) -> dict:
        """Purge, freeze or unfreeze the members the request selects (:func:`commands.select_members`)."""
        cmd, rp = request["cmd"], self._recipe_pool(request)

        def change() -> dict:
            pool = rp.pool
            try:
                slots = commands.select_members(pool.part_ids, pool.raw_scores, pool.golden, request)
            except commands.SelectionError as exc:
                raise ControlError(str(exc)) from None
            if cmd == commands.POOL_PURGE:
                golden = [pool.part_ids[i] for i in slots if pool.golden[i]]
                if golden and not request.get("include_golden"):
                    raise ControlError(f"golden members are never purged implicitly: {golden}; "
                                       f"unfreeze them first")
                pool.remove(slots)
            else:
                pool.golden[slots] = cmd == commands.POOL_FREEZE
            self._save_pools()  # in order, by the writer thread
            return {"changed": int(len(slots)), "size": pool.size, "golden": int(pool.golden[:pool.size].sum())}
        return self._between_parts(change)

    def pool_reseed(self, request: dict) -> dict:
        rp = self._recipe_pool(request)
        try:   # read and prepared off the worker, before the pool changes: a bad folder leaves it as it is
            prepared = rp.read_seed(request.get("folder", ""))
        except (ValueError, OSError) as exc:
            raise ControlError(f"reseed refused, the pool is unchanged: {exc}") from None

        def reseed() -> dict:
            size = rp.seed(prepared, replace=True)
            self._save_pools()  # in order, by the writer thread
            return {"size": size}
        return self._between_parts(reseed)

    def test_fire(self, request: dict) -> dict:
        """A REJECT for a part that was never inspected (``test_part``), through the ledger and the link."""
        try:
            part_id = require_part_id(request.get("part_id") or f"TEST-{int(time.time())}")
        except PartFieldError as exc:
            raise ControlError(f"test fire refused: {exc}") from None
        if request.get("recipe", "default") not in self.inspector.recipes:
            raise ControlError(f"test fire refused: unknown recipe {str(request.get('recipe'))[:80]!r}")
        part = PartRecord(part_id=part_id, recipe=request.get("recipe", "default"), capture_time=time.time(),
                          test_part=True)
        part.decide(Verdict.REJECT, Reason.TEST_FIRE, "technician test fire")
        part.deadline = time.monotonic() + self.config.line.deadline_ms / 1e3
        if not self._signal_test_part(part, 30):
            raise ControlError("the test fire was queued but not signalled within 30 s")
        return {"part_id": part_id, "seq": part.seq, "acked": part.acked}
