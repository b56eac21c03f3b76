"""Per-part inspection: decode -> features -> one-vs-pool scoring -> verdict, and pool admission.

No threads and no I/O beyond the feature engine: the line (``runtime/line.py``) drives it from its worker
thread, the seed command and tests drive it directly. Recipes with modality ``3d`` / ``2d+3d`` are handed to
:class:`~edge_app.runtime.multimodal.ScanRecipePool` (same stages, plus the part's point cloud).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np

from ..config import LineConfig, RecipeSettings
from ..features import FeatureEngine, Features, select_model
from ..pool import FeaturePool
from ..record import PartRecord, Reason, Verdict
from ..scoring import MuscParams, prepare
from ..sources.base import DecodeError, decode_part
from .multimodal import ScanRecipePool
from .pool_store import load_pool, pool_path, save_pool
from .verdict import verdict_from_pool

log = logging.getLogger(__name__)
NOT_EXTRACTED = object()  # inspect(): extract() has not run for this part


@dataclass
class Prepared:
    """A part's scoring inputs: aggregated feature sets (``[P, D]`` each)."""

    sets: list[np.ndarray]
    feature: np.ndarray | None = None    # re-scoring feature, once scored
    nearest: float | None = None         # distance to the closest pool member, once scored


class RecipePool:
    """A recipe's pool with its admission rule and warm-up bookkeeping."""

    def __init__(self, name: str, settings: RecipeSettings, n_sets: int, patches: int, dim: int, seed: int = 0,
                 scorer: str = "numpy"):
        self.name, self.settings = name, settings
        ps = settings.pool
        self.pool = FeaturePool(ps.capacity, n_sets, patches, dim, min_size=ps.min_size, eviction=ps.eviction,
                                horizon=ps.horizon, seed=seed, scorer=scorer)
        self.threshold = settings.threshold
        self.rejected_duplicates = 0


class Inspector:
    """Scores parts against per-recipe rolling pools with a shared feature engine."""

    def __init__(self, config: LineConfig, engine: FeatureEngine | None = None):
        self.config = config
        self.engine = engine or FeatureEngine(
            select_model(config.model.path, config.model.blocks, config.model.precision),
            size=config.model.size, threads=config.model.threads)
        self.params: MuscParams = config.scoring.params()
        model_blocks = self.engine.manifest.blocks
        missing = [b for b in config.model.blocks if b not in model_blocks]
        if missing:
            raise ValueError(f"model.blocks {missing} are not outputs of {self.engine.model_path} "
                             f"(it has {list(model_blocks)})")
        self.layer_index = [model_blocks.index(b) for b in config.model.blocks]
        self.grid = self.engine.grid
        n_sets = len(self.layer_index) * (len(self.params.degrees) if self.params.aggregation == "lnamd" else 1)
        self.params.salient_set(n_sets)  # fail early on an impossible salient layer
        patches, dim = self.grid[0] * self.grid[1], self.engine.manifest.token_dim
        self.pools: dict[str, RecipePool | ScanRecipePool] = {
            name: RecipePool(name, recipe, n_sets, patches, dim, scorer=config.scoring.backend)
            if recipe.modality == "2d" else
            ScanRecipePool(name, recipe, n_sets, patches, dim, self.engine.size, self.params)
            for name, recipe in config.recipes.items()}

    # -- identity & persistence ----------------------------------------------------------------------------
    def pool_identity(self) -> dict:
        """What a stored pool must have been built with to be reusable."""
        return {"model_sha256": self.engine.manifest.model_sha256, "size": self.config.model.size,
                "blocks": list(self.config.model.blocks), "aggregation": self.params.aggregation,
                "degrees": list(self.params.degrees)}

    def recipe_identity(self, name: str) -> dict:
        """:meth:`pool_identity`, plus the modality and 3D settings of a 3d / 2d+3d recipe."""
        rp = self.pools[name]
        return {**self.pool_identity(), **rp.identity()} if isinstance(rp, ScanRecipePool) else self.pool_identity()

    def restore_pools(self) -> dict[str, int]:
        """Load every recipe's stored pool (PoolMismatchError for a foreign one); returns sizes."""
        for name, rp in self.pools.items():
            load_pool(pool_path(self.config.storage.dir, name), rp.pool, self.recipe_identity(name))
        return {name: rp.pool.size for name, rp in self.pools.items()}

    def snapshot_pools(self) -> dict[str, dict[str, np.ndarray]]:
        """Copies of every pool's state (cheap), to be written by :meth:`write_pools` on another thread."""
        return {name: {k: np.array(v, copy=True) for k, v in rp.pool.state().items()}
                for name, rp in self.pools.items()}

    def write_pools(self, snapshot: dict[str, dict[str, np.ndarray]]) -> None:
        for name, state in snapshot.items():
            save_pool(pool_path(self.config.storage.dir, name), state, self.recipe_identity(name))

    def save_pools(self) -> None:
        self.write_pools(self.snapshot_pools())

    # -- stages ----------------------------------------------------------------------------------------------
    def features(self, images: list[np.ndarray]) -> list[Prepared]:
        """Feature sets of decoded RGB images (one engine call)."""
        feats: Features = self.engine(images, batch_size=len(images))
        layers = [feats.layers[i] for i in self.layer_index]
        sets = prepare(layers, self.grid, self.params)
        return [Prepared([fs[i] for fs in sets]) for i in range(len(images))]

    def extract(self, part: PartRecord) -> Prepared | None:
        """Decode and features of a part: the stages the line runs one part ahead of scoring.

        A bad part gets its NO_VERDICT here. Returns None for a decided part and for a 3d / 2d+3d recipe
        (decoded only: its pool runs the rest). Never raises for a bad part."""
        if part.verdict is not None:  # already decided upstream (e.g. a scanner frame that never came)
            return None
        rp = self.pools.get(part.recipe)
        if rp is None:
            part.decide(Verdict.NO_VERDICT, Reason.ENGINE_ERROR, f"unknown recipe {part.recipe!r}")
            return None
        t0 = time.monotonic()
        try:
            decode_part(part)
        except DecodeError as exc:
            part.times.decode = time.monotonic() - t0
            part.decide(Verdict.NO_VERDICT, Reason.DECODE_ERROR, str(exc))
            return None
        t1 = time.monotonic()
        part.times.decode = t1 - t0
        if isinstance(rp, ScanRecipePool):
            return None
        try:
            prepared = self.features([part.image])[0]
        except Exception as exc:  # the engine must never take the line down with it
            log.exception("feature engine failed on part %s", part.part_id)
            part.times.features = time.monotonic() - t1
            part.decide(Verdict.NO_VERDICT, Reason.ENGINE_ERROR, f"{type(exc).__name__}: {exc}")
            return None
        part.times.features = time.monotonic() - t1
        return prepared

    def inspect(self, part: PartRecord, extracted: Prepared | None | object = NOT_EXTRACTED
                ) -> tuple[PartRecord, Prepared | None]:
        """Fill ``part``'s verdict, reason, scores, map and stage times. Never raises for a bad part.

        ``extracted`` is what :meth:`extract` returned for this part when it ran ahead (the line's prefetch)."""
        if extracted is NOT_EXTRACTED:
            extracted = self.extract(part)
        if part.verdict is not None:
            return part, None
        rp = self.pools[part.recipe]
        if isinstance(rp, ScanRecipePool):
            return rp.inspect(part, self.features, self.grid, self.params)
        prepared = extracted
        part, prepared, result = verdict_from_pool(
            part, prepared, rp.threshold,
            lambda: rp.pool.score(prepared.sets, self.grid, self.params, exclude_part_id=part.part_id))
        if result is not None:
            part.anomaly_map, prepared.nearest = result.patch_map, result.nearest
        return part, prepared

    def admit(self, part: PartRecord, prepared: Prepared | None, now: float | None = None) -> bool:
        """Pool admission after a verdict: accepted parts (or all, by config), never near-duplicates.

        During warm-up every decodable part is admitted; once the pool reaches its minimum size the members
        are scored among themselves so each has a raw score and re-scoring feature.
        """
        rp = self.pools.get(part.recipe)
        if isinstance(rp, ScanRecipePool):
            return rp.admit(part, prepared, self.grid, self.params, now)
        if rp is None or prepared is None:
            return False
        pool, settings = rp.pool, rp.settings.pool
        warming = part.reason == Reason.WARMUP
        if not warming and settings.admit == "accepted" and part.verdict != Verdict.ACCEPT:
            return False
        if part.test_part:
            return False
        nearest = prepared.nearest if prepared.nearest is not None else pool.nearest_distance(prepared.sets)
        if nearest < settings.near_duplicate_distance:
            rp.rejected_duplicates += 1
            return False
        # Warm-up members get their raw score and re-scoring feature when the pool becomes ready.
        feature = prepared.feature if prepared.feature is not None else prepared.sets[0][0]
        slot = pool.admit(part.part_id, prepared.sets, part.raw_score or 0.0, feature,
                          now=time.time() if now is None else now)
        if slot is not None and warming and pool.size == pool.min_size:  # the pool has just become ready
            pool.rescore_members(self.grid, self.params)
            if pool.drop_outliers():  # defective warm-up parts out; warm-up goes on until min_size again
                pool.rescore_members(self.grid, self.params)
        return slot is not None
