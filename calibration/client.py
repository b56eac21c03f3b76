"""The running line as ``musc-calibrate`` sees it: its storage, its control socket, its config."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from musc_edge.edge.config import LineConfig, load_config
from musc_edge.edge.errors import UsageError
from musc_edge.edge.ledger import Ledger, LedgerError, LedgerReader, LedgerRow
from musc_edge.edge.runtime import commands
from musc_edge.edge.runtime.calibration_state import CalibrationStore
from musc_edge.edge.runtime.control import ControlError, request

from .shadow import SCORED


class LineNotRunning(UsageError):
    """Nothing listens on the line's control socket."""


@dataclass
class LineContext:
    """A line's storage folder, control socket and (when given) config."""

    storage: Path
    socket: Path
    config: LineConfig | None = None
    store: CalibrationStore = field(init=False)
    _status: dict | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        self.store = CalibrationStore(self.storage)

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
