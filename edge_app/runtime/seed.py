"""Fill a recipe's pool from a folder of recent unlabeled captures, so a line can start warm."""
from __future__ import annotations

from pathlib import Path

from ..evaluation.datasets import read_image
from ..progress import Progress
from ..record import PartRecord, Reason, Verdict
from .inspector import Inspector

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")


def seed_pool(inspector: Inspector, recipe: str, folder: str | Path, batch_size: int = 8,
              progress: bool = True) -> int:
    """Admit the folder's images (sorted by name, near-duplicates skipped) and score the members among
    themselves. Returns the pool size. The pool keeps at most its capacity (the newest files win)."""
    if recipe not in inspector.pools:
        raise ValueError(f"unknown recipe {recipe!r}: the config has {sorted(inspector.pools)}")
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"seed folder not found: {folder}")
    paths = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise FileNotFoundError(f"no images (.png/.jpg/.bmp) under {folder}")
    rp = inspector.pools[recipe]
    with Progress(len(paths), "seeding", enabled=progress) as bar:
        for start in range(0, len(paths), batch_size):
            chunk = paths[start:start + batch_size]
            prepared = inspector.features([read_image(p) for p in chunk])
            for path, prep in zip(chunk, prepared):
                part = PartRecord(part_id=f"seed:{path.name}", recipe=recipe, capture_time=path.stat().st_mtime)
                part.decide(Verdict.NO_VERDICT, Reason.WARMUP, "seed")
                inspector.admit(part, prep)
            bar.advance(len(chunk))
    if rp.pool.size >= 2:
        rp.pool.rescore_members(inspector.grid, inspector.params)
    return rp.pool.size
