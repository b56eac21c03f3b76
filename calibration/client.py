"""The running line as ``musc-calibrate`` sees it: its storage, its control socket, its config."""
from __future__ import annotations

import pwd
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from musc_edge.edge.config import LineConfig, load_config
from musc_edge.edge.errors import UsageError
from musc_edge.edge.ledger import Ledger, LedgerError, LedgerReader, LedgerRow
from musc_edge.edge.runtime import commands
from musc_edge.edge.runtime.calibration_state import (AuditError, AuditLog, CalibrationStore, audit_key_path,
                                                       calibration_dir, ensure_audit_key, read_audit_key)
from musc_edge.edge.runtime.control import ControlError, ReplyLost, request

from .shadow import SCORED


class LineNotRunning(UsageError):
    """Nothing listens on the line's control socket."""


class OutcomeUnknown(UsageError):
    """A change was sent but its reply was lost: recorded in the audit log as unknown, not as failed."""

    outcome_unknown = True


class RemoteAuditLog(AuditLog):
    """The audit log as a technician who cannot read the line's device secret extends it: the running line
    appends each record with its secret (``audit_append``, technician token). With the line stopped, a
    secret that does not exist yet is created (staging before the first start); one that exists but is not
    readable means: run as the runtime's user."""

    def __init__(self, ctx: "LineContext"):
        super().__init__(calibration_dir(ctx.storage), None)
        self._ctx = ctx

    def append(self, *, who: str, action: str, target: str, old: Any, new: Any, reason: str,
               result_of: int | None = None) -> dict:
        if self.key is None and not self._ctx.running():
            path = audit_key_path(self._ctx.storage)
            if path.exists():
                raise AuditError(f"the line is stopped and its device secret {path} is readable only by "
                                 f"{_owner(path)}: run this change as that user (sudo -u {_owner(path)} ...)")
            try:
                self.key = ensure_audit_key(self._ctx.storage)[0]
            except OSError as exc:
                raise AuditError(f"the line has no device secret yet and {path} cannot be created: "
                                 f"{exc.strerror or exc}") from None
        if self.key is not None:
            return super().append(who=who, action=action, target=target, old=old, new=new, reason=reason,
                                  result_of=result_of)
        from .roles import technician_token

        record = {"who": who, "action": action, "target": target, "old": old, "new": new, "reason": reason,
                  "result_of": result_of}
        return self._ctx.request({"cmd": commands.AUDIT_APPEND, "record": record},
                                 token=technician_token(self._ctx.storage))["record"]


def _owner(path: Path) -> str:
    try:
        return pwd.getpwuid(path.stat().st_uid).pw_name
    except (KeyError, OSError):
        return "the runtime's user"


@dataclass
class LineContext:
    """A line's storage folder, control socket and (when given) config."""

    storage: Path
    socket: Path
    config: LineConfig | None = None
    store: CalibrationStore = field(init=False)
    _status: dict | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        key = read_audit_key(self.storage)
        self.store = CalibrationStore(self.storage, key, None if key is not None else RemoteAuditLog(self))

    @classmethod
    def open(cls, config: Path | None, storage: Path | None, socket: Path | None) -> LineContext:
        """The line named by exactly one of a config file or a storage folder (``socket`` overrides theirs)."""
        if (config is None) == (storage is None):
            raise UsageError("give exactly one of --config LINE.yaml or --storage DIR")
        if config is not None:
            loaded = load_config(config)
            return cls(loaded.storage.dir, Path(socket or loaded.control.socket or loaded.storage.dir / "control.sock"),
                       loaded)
        return cls(storage, socket or storage / "control.sock")

    def request(self, payload: dict, *, token: str | None = None, timeout: float = 90.0) -> dict:
        """One control request; UsageError when the line is not running or refuses."""
        if token is not None:
            payload = {**payload, "token": token}
        try:
            reply = request(self.socket, payload, timeout=timeout)
        except ReplyLost as exc:
            raise OutcomeUnknown(f"{exc}: whether '{payload['cmd']}' took effect is not known; see "
                                 "`musc-calibrate status`") from None
        except ControlError as exc:
            raise LineNotRunning(str(exc)) from None
        except OSError as exc:   # e.g. no permission on the socket: the line may well be running
            raise UsageError(f"cannot talk to the line on {self.socket}: {exc.strerror or exc}") from None
        if not reply.get("ok"):
            raise UsageError(f"the line refused '{payload['cmd']}': {reply.get('error')}")
        return reply

    def status(self) -> dict:
        """The running line's status (UsageError when it is not running)."""
        if self._status is None:
            self._status = self.request({"cmd": commands.STATUS})
        return self._status

    def running(self) -> bool:
        """Whether a line answers (UsageError when the socket exists but cannot be used)."""
        try:
            self.status()
        except LineNotRunning:
            return False
        return True

    def recipes(self) -> set[str] | None:
        if self.config is not None:
            return set(self.config.recipes)
        return set(self.status()["recipes"]) if self.running() else None

    def check_recipe(self, recipe: str) -> None:
        known = self.recipes()
        if known is not None and recipe not in known:
            raise UsageError(f"unknown recipe {recipe!r}: this line has {sorted(known)}")

    def ledger(self) -> LedgerReader:
        try:
            return Ledger.open_readonly(self.storage / "ledger.sqlite")
        except LedgerError as exc:
            raise UsageError(f"{exc}: has this line run yet?") from None

    def has_ledger(self) -> bool:
        return (self.storage / "ledger.sqlite").is_file()

    def recent_scores(self, recipe: str, last: int) -> list[float]:
        """Scores of the scored parts of ``recipe`` among the ``last`` newest ledger rows, oldest first (none
        without a ledger)."""
        if not self.has_ledger():
            return []
        with self.ledger() as reader:
            return [r.score for r in recent_scored(reader, recipe, last)]


def recent_scored(reader: LedgerReader, recipe: str, last: int) -> list[LedgerRow]:
    """Scored, non-test parts of ``recipe`` among the ``last`` newest ledger rows, oldest first."""
    rows = reader.recent(last)
    return [r for r in reversed(rows) if r.recipe == recipe and r.reason in SCORED and r.score is not None
            and not r.test_part]
