"""Atomic persistence of a recipe's pool, bound to the feature model and scoring settings that made it.

Each save keeps the file it replaces as ``<name>.prev`` (a hard link: no copy), so a pool file damaged on
disk (truncated, unreadable) is never the end of the line: :func:`load_pool` sets the damaged file aside as
``<name>.corrupt``, restores the previous good one and says so through ``on_alarm``; with neither readable the
recipe starts with an empty pool (warm-up again), alarmed the same way.
"""
from __future__ import annotations

import json
import logging
import os
import threading
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import numpy as np

log = logging.getLogger(__name__)
# What a damaged .npz raises on open or read (a zip that ends early, a member cut short, a missing key).
DAMAGED_FILE_ERRORS = (zipfile.BadZipFile, EOFError, OSError, ValueError, KeyError)


class Restorable(Protocol):
    """A pool, or a recipe: anything that restores itself from a stored state."""

    def load_state(self, state: dict[str, np.ndarray]) -> None: ...


class PoolMismatchError(RuntimeError):
    """A stored pool was built with another feature model or other scoring settings."""


def pool_path(storage_dir: str | Path, recipe: str) -> Path:
    return Path(storage_dir) / "pools" / f"{recipe}.npz"


def previous_path(path: str | Path) -> Path:
    """Where the pool file that the last save replaced is kept."""
    path = Path(path)
    return path.with_name(path.name + ".prev")


def save_pool(path: str | Path, state: dict[str, np.ndarray], identity: dict) -> None:
    """Write ``state`` + ``identity`` to ``path`` atomically (temp file, fsync, rename); the file it replaces
    stays as :func:`previous_path` (hard-linked before the rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        with open(tmp, "wb") as handle:
            np.savez(handle, identity=np.array(json.dumps(identity, sort_keys=True)), **state)
            handle.flush()
            os.fsync(handle.fileno())
        _keep_previous(path)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)   # a full disk must not also keep a half-written copy on it
        raise


def _keep_previous(path: Path) -> None:
    if not path.is_file():
        return
    link = path.with_name(f"{path.name}.prev.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        link.unlink(missing_ok=True)
        os.link(path, link)
        os.replace(link, previous_path(path))
    except OSError as exc:   # a file system without hard links: no previous copy, the save goes on
        link.unlink(missing_ok=True)
        log.warning("pool %s: could not keep the previous file (%s)", path, exc)


def remove_temp_files(path: str | Path) -> list[Path]:
    """Delete the temp files a killed writer of ``path`` left behind (``<name>.<pid>.<thread>.tmp``)."""
    path = Path(path)
    if not path.parent.is_dir():
        return []
    left = sorted(path.parent.glob(f"{path.name}.*.tmp"))   # also <name>.prev.<pid>.<thread>.tmp
    for stale in left:
        stale.unlink(missing_ok=True)
    return left


def load_pool(path: str | Path, pool: Restorable, identity: dict,
              on_alarm: Callable[[str], None] | None = None,
              upgrade: Callable[[dict], dict] | None = None) -> bool:
    """Restore ``pool`` (a pool, or a recipe) from ``path``; False when there is no stored pool. Refuses a
    pool stored with another ``identity`` (PoolMismatchError); ``upgrade`` first rewrites a stored identity
    of an older release in today's terms. A damaged file is set aside and the previous good one restored
    (see the module docstring), each step reported through ``on_alarm``. Temp files of an interrupted save
    (kill -9, full disk) are removed first."""
    path = Path(path)
    alarm = on_alarm or (lambda text: log.error("%s", text))
    remove_temp_files(path)
    previous = previous_path(path)
    if not path.is_file():   # a save never leaves it missing: deleted on purpose, to start with an empty pool
        return False
    try:
        return _load(path, pool, identity, upgrade)
    except DAMAGED_FILE_ERRORS as exc:
        corrupt = path.with_name(path.name + ".corrupt")
        os.replace(path, corrupt)
        why = f"pool file {path} is damaged ({type(exc).__name__}: {exc}); set aside as {corrupt.name}"
    if previous.is_file():
        try:
            _load(previous, pool, identity, upgrade)
            alarm(f"{why}; restored the previous pool file {previous.name}")
            return True
        except DAMAGED_FILE_ERRORS as exc:
            why += f"; the previous file is damaged too ({type(exc).__name__})"
    alarm(f"{why}; the recipe starts with an empty pool (warm-up again)")
    return False


def stored_identity(path: str | Path, upgrade: Callable[[dict], dict] | None = None) -> dict:
    """The identity a pool file was stored with (in today's terms, through ``upgrade``); ValueError when the
    file's identity is not a JSON object."""
    with np.load(path, allow_pickle=False) as data:
        return _identity_of(data, upgrade)


def _identity_of(data, upgrade: Callable[[dict], dict] | None) -> dict:
    stored = json.loads(str(data["identity"]))
    if not isinstance(stored, dict):
        raise ValueError(f"the stored identity is a JSON {type(stored).__name__}, not an object")
    return upgrade(stored) if upgrade else stored


def _load(path: Path, pool: Restorable, identity: dict, upgrade: Callable[[dict], dict] | None) -> bool:
    with np.load(path, allow_pickle=False) as data:
        stored = _identity_of(data, upgrade)
        for key, value in identity.items():
            if stored.get(key) != value:
                raise PoolMismatchError(
                    f"stored pool {path} was built with {key}={stored.get(key)!r}, but this line runs "
                    f"{key}={value!r}; it cannot be scored against. Reseed it (`musc-edge pool seed`) or "
                    f"delete it to start with an empty pool.")
        state = {name: data[name] for name in data.files if name != "identity"}   # every member read first
    pool.load_state(state)
    return True
