"""The control socket's commands, by name, and which pool members a pool command acts on.

Shared by the line (``Line`` dispatches through a table keyed by these names) and the client
(``musc-calibrate``), so neither spells a command the other does not know.
"""
from __future__ import annotations

import numpy as np

STATUS = "status"
POOL_INSPECT = "pool_inspect"
POOL_SCORES = "pool_scores"
POOL_PURGE = "pool_purge"
POOL_FREEZE = "pool_freeze"
POOL_UNFREEZE = "pool_unfreeze"
POOL_RESEED = "pool_reseed"
APPLY = "apply"
TEST_FIRE = "test_fire"
AUDIT_APPEND = "audit_append"   # a technician client without the device secret has the line append its record

READ_ONLY = frozenset({STATUS, POOL_INSPECT, POOL_SCORES})
POOL_CHANGES = {"purge": POOL_PURGE, "freeze": POOL_FREEZE, "unfreeze": POOL_UNFREEZE}


class SelectionError(ValueError):
    """A pool command named members the pool does not have."""


def select_members(part_ids: list, raw_scores: np.ndarray, golden: np.ndarray, request: dict) -> np.ndarray:
    """Slots a pool command acts on, from its request: ``part_ids``, the ``highest`` / ``lowest`` N by raw
    score (``highest`` among ordinary members: the suspects to purge; ``lowest`` among all: the core to
    freeze), or ``all`` (ordinary members only unless ``include_golden``)."""
    n = len(part_ids)
    if request.get("all"):
        return np.arange(n) if request.get("include_golden") else np.flatnonzero(~golden[:n])
    if request.get("highest"):
        ordinary = np.flatnonzero(~golden[:n])
        return ordinary[np.argsort(-raw_scores[ordinary], kind="stable")][:int(request["highest"])]
    if request.get("lowest"):
        return np.argsort(raw_scores[:n], kind="stable")[:int(request["lowest"])]
    wanted = set(request.get("part_ids") or [])
    slots = [i for i, pid in enumerate(part_ids[:n]) if pid in wanted]
    missing = wanted - {part_ids[i] for i in slots}
    if missing:
        raise SelectionError(f"not pool members: {sorted(missing)}")
    return np.array(slots, int)
