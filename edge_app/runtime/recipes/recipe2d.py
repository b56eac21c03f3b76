"""``2d`` recipes: each part's image scored one-vs-pool against a :class:`~musc_edge.edge.pool.FeaturePool`."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from ...config import RecipeSettings
from ...mediaio import read_image
from ...pool import FeaturePool
from ...progress import Progress
from ...record import PartRecord
from ...score import PoolScore, Prepared
from .base import Recipe, Scoring, image_files


class Recipe2D(Recipe):
    """A ``2d`` recipe: its :class:`FeaturePool` (FIFO or reservoir) and how an image is prepared."""

    modality = "2d"

    def __init__(self, name: str, settings: RecipeSettings, scoring: Scoring, n_sets: int, patches: int, dim: int,
                 seed: int = 0):
        super().__init__(name, settings, scoring)
        ps = settings.pool
        self.pool = FeaturePool(ps.capacity, n_sets, patches, dim, min_size=ps.min_size, eviction=ps.eviction,
                                horizon=ps.horizon, seed=seed, scorer=scoring.scorer, scale=ps.scale)

    def prepare(self, part: PartRecord) -> Prepared:
        return Prepared(self.scoring.features([part.image])[0])

    def score(self, prepared: Prepared, part_id: str | None = None,
              look_ahead: Sequence[Prepared] = ()) -> PoolScore:
        result = self.pool.score(prepared.sets, self.scoring.grid, self.scoring.params, exclude_part_id=part_id,
                                 image_token=prepared.image_token, look_ahead=[p.sets for p in look_ahead])
        return replace(result, map=self.scoring.frame_map(result.map))   # patch grid -> the frame's geometry

    def read_seed(self, folder: str | Path, progress: bool = False,
                  batch_size: int = 8) -> list[tuple[PartRecord, Prepared]]:
        """Feature sets of the folder's images (sorted by name), a batch per engine call."""
        paths = image_files(folder)
        out = []
        with Progress(len(paths), "seeding", enabled=progress) as bar:
            for start in range(0, len(paths), batch_size):
                chunk = paths[start:start + batch_size]
                sets = self.scoring.features([read_image(p) for p in chunk])
                out += [(PartRecord(part_id=f"seed:{p.name}", recipe=self.name, capture_time=p.stat().st_mtime,
                                    source_ref=str(p)), Prepared(s)) for p, s in zip(chunk, sets)]
                bar.advance(len(chunk))
        return out

    def _nearest(self, prepared: Prepared) -> float:
        return self.pool.nearest_distance(prepared.sets)

    def _store(self, part_id: str, prepared: Prepared, raw_score: float, now: float) -> int | None:
        # Warm-up members get their raw score and re-scoring feature when the pool becomes ready.
        feature = prepared.feature if prepared.feature is not None else prepared.sets[0][0]
        return self.pool.admit(part_id, prepared.sets, raw_score, feature, now=now)
