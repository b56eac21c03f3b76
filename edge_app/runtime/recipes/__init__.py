"""Recipes: one protocol (:class:`Recipe`) for 2D, 3D and 2D+3D, one implementation per feature kind."""
from __future__ import annotations

from ...config import RecipeSettings
from ...score import PoolScore, Prepared, PreparedScan
from .base import FeatureStage, Recipe, Scoring
from .recipe2d import Recipe2D
from .recipe_scan import ScanRecipe


def make_recipe(name: str, settings: RecipeSettings, scoring: Scoring, n_sets: int, patches: int,
                dim: int) -> Recipe:
    """The recipe of ``settings.modality`` (``2d``, or a scan recipe for ``3d`` / ``2d+3d``)."""
    if settings.modality == "2d":
        return Recipe2D(name, settings, scoring, n_sets, patches, dim)
    return ScanRecipe(name, settings, scoring, n_sets, patches, dim)


__all__ = [
    "FeatureStage", "PoolScore", "Prepared", "PreparedScan", "Recipe", "Recipe2D", "ScanRecipe", "Scoring",
    "make_recipe",
]
