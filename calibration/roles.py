"""Who may do what: operators read, technicians change.

The running line creates ``<storage>/calibration/technician.token`` (mode 0640) and accepts changes on its
control socket only with that token. Holding the technician role therefore *is* being able to read that
file: give the technicians' Unix group read access (``chgrp technicians technician.token``) and keep it
out of the operators' reach. Reading (status, pool inspect, audit log) needs only access to the control
socket and the storage folder.
"""
from __future__ import annotations

import grp
from pathlib import Path

from musc_edge.edge.runtime.calibration_state import who
from musc_edge.edge.runtime.control import MIN_TOKEN_CHARS, ensure_token, token_path


class RoleError(PermissionError):
    """This user lacks the technician role; nothing was changed."""


def _group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


def technician_token(storage_dir: str | Path, *, create: bool = False) -> str:
    """The technician token (RoleError when this user cannot read it). ``create``: make one if the line
    has none yet (staging before the first start), which needs write access to the storage folder."""
    path = token_path(storage_dir)
    try:
        if create:
            return ensure_token(storage_dir)
        token = path.read_text().strip()
    except FileNotFoundError:
        raise RoleError(f"no technician token at {path}: the line creates it when it first starts") from None
    except PermissionError:
        try:
            stat = path.stat()
        except OSError:
            raise RoleError(f"changing the line needs the technician role: {who()} may not create or read "
                            f"{path}") from None
        raise RoleError(f"changing the line needs the technician role: {path} is not readable by {who()} "
                        f"(it belongs to group {_group_name(stat.st_gid)!r}, mode {stat.st_mode & 0o777:o}); "
                        "ask for membership of that group") from None
    if len(token) < MIN_TOKEN_CHARS:
        raise RoleError(f"the technician token {path} is unusable ({len(token)} characters; the line refuses every "
                        "change with it): restart the line, which writes a new one")
    return token
