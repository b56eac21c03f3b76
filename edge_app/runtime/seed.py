"""Fill a recipe's pool from a folder of recent unlabeled captures, so a line can start warm."""
from __future__ import annotations

from pathlib import Path

from ..mediaio import IMAGE_SUFFIXES, read_image
from ..progress import Progress
from ..record import PartRecord, Reason, Verdict
from .inspector import Inspector, Prepared


def check_seedable(inspector: Inspector, recipe: str) -> None:
    """ValueError unless ``recipe`` exists and can be seeded from a folder of images (a 2d recipe); called
    before anything is removed from a pool, so a refused reseed leaves the pool as it was."""
    if recipe not in inspector.pools:
        raise ValueError(f"unknown recipe {recipe!r}: the config has {sorted(inspector.pools)}")
    modality = inspector.config.recipes[recipe].modality
    if modality != "2d":
        raise ValueError(f"recipe {recipe!r} scores {modality}: its pool needs scans (image + point cloud), "
                         "which a folder of images cannot give; let the line warm up on live parts instead")


def prepare_folder(inspector: Inspector, folder: str | Path, batch_size: int = 8,
                   progress: bool = False) -> list[tuple[Path, Prepared]]:
    """Feature sets of the folder's images, sorted by name (no pool is touched)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"seed folder not found: {folder}")
    paths = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise FileNotFoundError(f"no images (.png/.jpg/.bmp) under {folder}")
    out = []
    with Progress(len(paths), "seeding", enabled=progress) as bar:
        for start in range(0, len(paths), batch_size):
            chunk = paths[start:start + batch_size]
            out += zip(chunk, inspector.features([read_image(p) for p in chunk]))
            bar.advance(len(chunk))
    return out


def admit_prepared(inspector: Inspector, recipe: str, prepared: list[tuple[Path, Prepared]]) -> int:
    """Admit prepared captures as warm-up members (near-duplicates skipped), then score the members among
    themselves. Returns the pool size; the pool keeps at most its capacity (the last files win)."""
    if recipe not in inspector.pools:
        raise ValueError(f"unknown recipe {recipe!r}: the config has {sorted(inspector.pools)}")
    rp = inspector.pools[recipe]
    for path, prep in prepared:
        part = PartRecord(part_id=f"seed:{path.name}", recipe=recipe, capture_time=path.stat().st_mtime)
        part.decide(Verdict.NO_VERDICT, Reason.WARMUP, "seed")
        inspector.admit(part, prep)
    if rp.pool.size >= 2:
        rp.pool.rescore_members(inspector.grid, inspector.params)
        if rp.pool.drop_outliers() and rp.pool.size >= 2:
            rp.pool.rescore_members(inspector.grid, inspector.params)
    return rp.pool.size


def seed_pool(inspector: Inspector, recipe: str, folder: str | Path, progress: bool = True) -> int:
    """Seed ``recipe``'s pool from ``folder``; returns the pool size."""
    check_seedable(inspector, recipe)
    return admit_prepared(inspector, recipe, prepare_folder(inspector, folder, progress=progress))
