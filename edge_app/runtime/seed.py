"""Fill a recipe's pool from a folder of recent unlabeled captures, so a line can start warm."""
from __future__ import annotations

from pathlib import Path

from .inspector import Inspector


def seed_pool(inspector: Inspector, recipe: str, folder: str | Path, progress: bool = True) -> int:
    """Seed ``recipe``'s pool from ``folder`` (images for a 2d recipe, image + cloud pairs for a scan recipe);
    returns the pool size. Every file is read and prepared before the pool changes."""
    return inspector.recipe(recipe).seed_folder(folder, progress)
