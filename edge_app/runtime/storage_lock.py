"""One running line per storage directory.

Two runtimes on one ``storage.dir`` (a second ``musc-edge run`` beside the service, with another source, so no
port tells them apart) would both write the ledger and the pool file, answer on one control socket, and repair
each other's half-done calibration changes at start. The first line holds an exclusive ``flock`` on
``<storage>/runtime.lock`` from before it reads its calibration until it has shut down; a second one is refused
with the first one's pid. Offline pool seeding (``musc-edge pool seed``) holds it too, so a line cannot start
in the middle of it. The kernel drops the lock with the process, so a killed line (``kill -9``, a power cut)
leaves nothing to clean up.
"""
from __future__ import annotations

import fcntl
import os
import time
import weakref
from pathlib import Path

from .faults import StartupError

LOCK_NAME = "runtime.lock"


class StorageInUse(StartupError):
    """Another running line holds the storage; ``holder`` names it (its pid and start time)."""

    def __init__(self, storage: Path, holder: str) -> None:
        super().__init__(f"storage.dir {storage} is in use by another running line ({holder}): stop it first "
                         "(systemctl stop musc-edge), or give this line its own storage.dir")
        self.holder = holder


class StorageLock:
    """The held lock on a storage directory; :meth:`release` (or the process ending) frees it."""

    def __init__(self, fd: int) -> None:
        self._close = weakref.finalize(self, os.close, fd)   # also when dropped unreleased (a line never run)

    @classmethod
    def acquire(cls, storage: Path) -> StorageLock:
        """Take ``storage``'s lock: StorageInUse when another process holds it, StartupError when it cannot be
        opened."""
        path = storage / LOCK_NAME
        try:   # never truncated before the lock is ours: the file names the holder
            storage.mkdir(parents=True, exist_ok=True)
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            except PermissionError:   # another user's file (a technician seeding offline): flock needs no writing
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise StartupError(f"storage.dir {storage}: cannot open {LOCK_NAME}: {exc}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "it has not written its pid yet"
            os.close(fd)
            raise StorageInUse(storage, holder) from None
        try:   # the holder's name is for the message above; the lock is what counts (a full disk keeps it)
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode(), 0)
        except OSError:
            pass
        return cls(fd)

    def release(self) -> None:
        """Free the lock (idempotent); the file stays, naming the last holder."""
        self._close()
