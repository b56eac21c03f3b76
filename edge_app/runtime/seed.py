"""Fill a recipe's pool from a folder of recent unlabeled captures, so a line can start warm.

Seeding changes what the line accepts, so the offline path (``musc-edge pool seed``, line stopped) has the
same authority as a live reseed: the technician role (the token), a reason, and an intent and a result
record in the audit log, written with the line's device secret.
"""
from __future__ import annotations

from pathlib import Path

from ..config import LineConfig
from ..errors import UsageError
from .calibration_state import (AuditError, CalibrationStore, audit_key_path, ensure_audit_key, read_audit_key,
                                who)
from .control import ControlError, MIN_TOKEN_CHARS, ensure_token, request, token_path
from .faults import StartupError
from .inspector import Inspector
from .storage_lock import StorageInUse, StorageLock


def seed_pool(inspector: Inspector, recipe: str, folder: str | Path, progress: bool = True) -> int:
    """Seed ``recipe``'s pool from ``folder`` (images for a 2d recipe, image + cloud pairs for a scan recipe);
    returns the pool size. Every file is read and prepared before the pool changes."""
    return inspector.recipe(recipe).seed_folder(folder, progress)


def seed_offline(config: LineConfig, recipe: str, folder: str | Path, reason: str | None,
                 progress: bool = True) -> int:
    """Seed a stopped line's pool and save it, as a technician's audited change; returns the pool size.

    UsageError (nothing changed) when the line is running (reseed it live), no reason is given, this user
    lacks the technician role (cannot read the token), or the audit log cannot be extended (its device
    secret exists but is readable only by the runtime's user)."""
    if not reason or not reason.strip():
        raise UsageError("seeding changes what the line accepts: give --reason \"...\" (it goes into the audit log)")
    storage = Path(config.storage.dir)
    socket = config.control.socket or storage / "control.sock"
    try:
        request(socket, {"cmd": "status"}, timeout=5)
    except (ControlError, OSError):
        pass
    else:
        raise UsageError(f"the line is running (socket {socket}): reseed it live with `musc-calibrate pool reseed`")
    try:   # a line that is starting has no socket yet, but holds the storage; none may start while this runs
        lock = StorageLock.acquire(storage)
    except StorageInUse as exc:
        raise UsageError(f"the line is running ({exc.holder}): reseed it live with `musc-calibrate pool reseed`") \
            from None
    except StartupError as exc:
        raise UsageError(str(exc)) from None
    try:
        return _seed_stopped_line(config, storage, recipe, folder, reason, progress)
    finally:
        lock.release()


def _seed_stopped_line(config: LineConfig, storage: Path, recipe: str, folder: str | Path, reason: str,
                       progress: bool) -> int:
    require_technician(storage)
    store = CalibrationStore(storage, audit_key(storage))
    inspector = Inspector(config)
    if recipe not in inspector.recipes:
        raise UsageError(f"unknown recipe {recipe!r}: this line has {sorted(inspector.recipes)}")
    before = sorted(p.name for p in (storage / "pools").glob(f"{recipe}*")) if (storage / "pools").is_dir() else []

    def perform() -> dict:   # the seeded pool replaces the saved one, as at a first start
        size = seed_pool(inspector, recipe, folder, progress)
        inspector.save_pools()
        return {"size": size}
    with store.lock():
        try:
            _, outcome = store.audit.record_change(
                who=who(), action="pool.seed", target=f"pool {recipe}", old={"replaces": before},
                new={"recipe": recipe, "folder": str(Path(folder).resolve())}, reason=reason, perform=perform)
        except AuditError as exc:
            raise UsageError(str(exc)) from None
    return outcome["size"]


def require_technician(storage: Path) -> None:
    """The technician role offline: the token the line checks live must be readable by this user (created
    when the line has none yet, which needs the storage folder's owner)."""
    path = token_path(storage)
    try:
        token = path.read_text().strip() if path.exists() else ensure_token(storage)
    except OSError as exc:
        raise UsageError(f"seeding needs the technician role: {path} is not readable by {who()} "
                         f"({exc.strerror or exc})") from None
    if len(token) < MIN_TOKEN_CHARS:
        raise UsageError(f"the technician token {path} is unusable; start the line once, it writes a new one")


def audit_key(storage: Path) -> bytes:
    """The device secret to extend the audit log with (created when the line has none yet)."""
    key = read_audit_key(storage)
    if key is not None:
        return key
    if audit_key_path(storage).exists():
        raise UsageError(f"the audit log's device secret {audit_key_path(storage)} is readable only by the "
                         "runtime's user: run this as that user")
    try:
        return ensure_audit_key(storage)[0]
    except (OSError, AuditError) as exc:
        raise UsageError(f"the audit log's device secret cannot be created: {exc}") from None
