"""Atomic persistence of a recipe's pool, bound to the feature model and scoring settings that made it."""
from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Protocol

import numpy as np


class Restorable(Protocol):
    """A pool, or a recipe: anything that restores itself from a stored state."""

    def load_state(self, state: dict[str, np.ndarray]) -> None: ...


class PoolMismatchError(RuntimeError):
    """A stored pool was built with another feature model or other scoring settings."""


def pool_path(storage_dir: str | Path, recipe: str) -> Path:
    return Path(storage_dir) / "pools" / f"{recipe}.npz"


def save_pool(path: str | Path, state: dict[str, np.ndarray], identity: dict) -> None:
    """Write ``state`` + ``identity`` to ``path`` atomically (temp file, fsync, rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        with open(tmp, "wb") as handle:
            np.savez(handle, identity=np.array(json.dumps(identity, sort_keys=True)), **state)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)   # a full disk must not also keep a half-written copy on it
        raise


def remove_temp_files(path: str | Path) -> list[Path]:
    """Delete the temp files a killed writer of ``path`` left behind (``<name>.<pid>.<thread>.tmp``)."""
    path = Path(path)
    if not path.parent.is_dir():
        return []
    left = sorted(path.parent.glob(f"{path.name}.*.tmp"))
    for stale in left:
        stale.unlink(missing_ok=True)
    return left


def load_pool(path: str | Path, pool: Restorable, identity: dict) -> bool:
    """Restore ``pool`` (a pool, or a recipe) from ``path``; False when there is no stored pool. Refuses a
    pool stored with another ``identity``. Temp files of an interrupted save (kill -9, full disk) are
    removed first."""
    path = Path(path)
    remove_temp_files(path)
    if not path.is_file():
        return False
    with np.load(path, allow_pickle=False) as data:
        stored = json.loads(str(data["identity"]))
        for key, value in identity.items():
            if stored.get(key) != value:
                raise PoolMismatchError(
                    f"stored pool {path} was built with {key}={stored.get(key)!r}, but this line runs "
                    f"{key}={value!r}; it cannot be scored against. Reseed it (`musc-edge pool seed`) or "
                    f"delete the file to start with an empty pool.")
        pool.load_state({name: data[name] for name in data.files if name != "identity"})
    return True
