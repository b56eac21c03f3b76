"""Per-part inspection: decode -> the part's recipe (features, one-vs-pool scoring, verdict) -> admission.

No threads: the line (``runtime/line.py``) drives it from its worker thread, the seed command and tests drive
it directly. Its I/O is the feature engine and the pools' files (:meth:`Inspector.restore_pools`,
:meth:`Inspector.write_pools`). Every recipe, 2D or scan, goes through the same
:class:`~musc_edge.edge.runtime.recipes.Recipe` methods.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import replace

import numpy as np

from ..config import ConfigError, LineConfig
from ..errors import UsageError
from ..features import FeatureEngine, Features, models_in, select_model
from ..geometry import plan_input, stitch, windows
from ..install_paths import resolve_model_path
from ..manifest import load_manifest
from ..record import PartRecord, Reason, Verdict
from ..scoring import MuscParams, prepare
from ..scoring.onnx_msm import make_scorer
from ..sources.base import DecodeError, decode_part
from .fast_path import FastPath, FastPathEvent, adopt, compare_paths, decide, plan_fast_path, shadow_pool
from .pool_store import DAMAGED_FILE_ERRORS, PoolMismatchError, load_pool, pool_path, save_pool, stored_identity
from .recipes import Recipe, Scoring, make_recipe

log = logging.getLogger(__name__)
NOT_EXTRACTED = object()  # inspect(): extract() has not run for this part


class Inspector:
    """Scores parts against per-recipe rolling pools with a shared feature engine."""

    def __init__(self, config: LineConfig, engine: FeatureEngine | None = None):
        self.config = config
        self.on_alarm = lambda text: log.warning("ALARM: %s", text)   # the line routes it to its alarm path
        self.params: MuscParams = config.scoring.params()
        self.engine = engine or FeatureEngine(
            select_model(config.model.path, config.model.blocks, config.model.precision, self._reads_image_token()),
            size=config.model.size, threads=config.model.threads)
        model_blocks = self.engine.manifest.blocks
        missing = [b for b in config.model.blocks if b not in model_blocks]
        if missing:
            raise ConfigError(f"model.blocks {missing} are not outputs of {self.engine.model_path} "
                             f"(it has {list(model_blocks)})")
        self.layer_index = [model_blocks.index(b) for b in config.model.blocks]
        # Aspect-preserving input: a part is scored as the concatenated patches of its windows (self.grid stacks
        # the window grids); its map is stitched back to the frame's geometry.
        frame = config.model.frame or (self.engine.size, self.engine.size)
        self.plan = plan_input(frame, self.engine.size, self.engine.manifest.patch_size, config.model.fit)
        if self.plan.scaled != (self.engine.size, self.engine.size) and \
                any(r.modality != "2d" for r in config.recipes.values()):
            raise ConfigError(f"model.frame {list(frame)} is not square: 3d / 2d+3d recipes score square frames "
                             "pixel-aligned with their clouds; set model.fit 'squash'")
        self._warned_shape = False
        self.grid = self.plan.stacked_grid
        n_sets = len(self.layer_index) * (len(self.params.degrees) if self.params.aggregation == "lnamd" else 1)
        try:
            self.params.salient_set(n_sets)  # fail early on an impossible salient layer
        except ValueError as exc:
            raise ConfigError(f"scoring.{exc} (model.blocks)") from None
        patches, dim = self.grid[0] * self.grid[1], self.engine.manifest.token_dim
        scoring = Scoring(self.features, self.grid, self.params, self.engine.size, self.pool_identity(),
                          self.frame_map, scorer=config.scoring.backend)
        self.recipes: dict[str, Recipe] = {name: make_recipe(name, settings, scoring, n_sets, patches, dim)
                                           for name, settings in config.recipes.items()}
        # The fast path (runtime/fast_path.py): warm-up parts shadowed through the INT8 model, then one decision.
        self.on_fast_path: Callable[[FastPathEvent], None] = lambda event: log.info("fast path: %s", event.reason)
        plan = plan_fast_path(config)
        self.fast_path: FastPath | None = FastPath(plan) if plan.model is not None else None
        self._generation: dict[str, int] = {}   # part id -> fast-path generation of the model that extracted it
        if plan.model is None:
            log.info("fast path: not tried (%s)", plan.why_not)

    # -- identity & persistence ----------------------------------------------------------------------------
    def _reads_image_token(self) -> bool:
        return self.params.rescore_feature == "image_token"

    def pool_identity(self) -> dict:
        """What a stored pool must have been built with to be reusable: the tokens it holds (the feature model
        up to :meth:`Manifest.tokens_identity`, so a model cut after an earlier block reuses the pools of its
        full graph), the input and the aggregation."""
        tokens = self.engine.manifest.tokens_identity(self.config.model.blocks, self._reads_image_token())
        identity = {"tokens": tokens, "size": self.config.model.size,
                    "blocks": list(self.config.model.blocks), "aggregation": self.params.aggregation,
                    "degrees": list(self.params.degrees)}
        if self.plan.scaled != (self.engine.size, self.engine.size):   # square frames keep their old identity
            identity["input"] = {"scaled": list(self.plan.scaled), "windows": [list(o) for o in self.plan.origins]}
        return identity

    def upgrade_identity(self, stored: dict) -> dict:
        """A stored pool identity of a release before ``tokens``: its ``model_sha256`` becomes the tokens
        identity of the model with that hash beside this line's models (kept as the hash when none is)."""
        if "tokens" in stored or "model_sha256" not in stored:
            return stored
        upgraded = {key: value for key, value in stored.items() if key != "model_sha256"}
        upgraded["tokens"] = stored["model_sha256"]
        for folder in {self.engine.model_path.parent, resolve_model_path(self.config.model.path)}:
            for _, manifest in models_in(folder if folder.is_dir() else folder.parent):
                if manifest.model_sha256 == stored["model_sha256"]:   # its blocks are compared on their own
                    upgraded["tokens"] = manifest.tokens_identity(self.config.model.blocks, self._reads_image_token())
                    return upgraded
        return upgraded

    def recipe(self, name: str) -> Recipe:
        """The recipe called ``name``; UsageError naming the recipes the config has."""
        if name not in self.recipes:
            raise UsageError(f"unknown recipe {name!r}: the config has {sorted(self.recipes)}")
        return self.recipes[name]

    def restore_pools(self, on_alarm: Callable[[str], None] | None = None) -> dict[str, int]:
        """Load every recipe's stored pool (PoolMismatchError for a foreign one); returns sizes. Pools stored by
        a line that had switched to the fast path put this line on it too (it was verified with this model).
        A damaged pool file falls back to the previous one (pool_store.load_pool), told to ``on_alarm``."""
        for name, recipe in self.recipes.items():
            try:
                load_pool(pool_path(self.config.storage.dir, name), recipe, recipe.identity(), on_alarm,
                          self.upgrade_identity)
            except PoolMismatchError:
                if not self._resume_fast_path():
                    raise
                load_pool(pool_path(self.config.storage.dir, name), recipe, recipe.identity(), on_alarm,
                          self.upgrade_identity)
        if self.fast_path is not None and self.fast_path.shadowing() and \
                all(r.pool.size >= r.pool.min_size for r in self.recipes.values()):
            self._end_trial(False, "the pools were restored ready: no warm-up parts to shadow", record=False)
        return {name: recipe.pool.size for name, recipe in self.recipes.items()}

    def snapshot_pools(self) -> dict[str, dict[str, np.ndarray]]:
        """Copies of every pool's state (cheap), to be written by :meth:`write_pools` on another thread."""
        return {name: {k: np.array(v, copy=True) for k, v in recipe.state().items()}
                for name, recipe in self.recipes.items()}

    def write_pools(self, snapshot: dict[str, dict[str, np.ndarray]]) -> None:
        for name, state in snapshot.items():
            save_pool(pool_path(self.config.storage.dir, name), state, self.recipes[name].identity())

    def save_pools(self) -> None:
        self.write_pools(self.snapshot_pools())

    # -- stages ----------------------------------------------------------------------------------------------
    def features(self, images: list[np.ndarray], engine: FeatureEngine | None = None) -> list[list[np.ndarray]]:
        """Each decoded RGB image's aggregated feature sets (``[P, D]`` each; the patches of all its windows),
        in one engine call over all their windows (``engine``: another model than the line's, e.g. a shadow)."""
        plan, t = self.plan, self.plan.n_windows
        engine = engine or self.engine
        if not self._warned_shape and images and not _same_aspect(images[0].shape, plan.source):
            self._warned_shape = True
            log.warning("frames are %dx%d but model.frame is %s: they are stretched to that aspect; set "
                        "model.frame to the camera's [height, width]", images[0].shape[1], images[0].shape[0],
                        self.config.model.frame)
        cut = [w for image in images for w in windows(image, plan)] if plan.n_windows > 1 or \
            plan.scaled != (self.engine.size, self.engine.size) else images
        feats: Features = engine(cut, batch_size=len(cut))
        index = self.layer_index if engine is self.engine else \
            [engine.manifest.blocks.index(b) for b in self.config.model.blocks]   # a shadow may be cut differently
        layers = [feats.layers[i] for i in index]
        sets = [fs.reshape(len(images), t * fs.shape[1], fs.shape[2])
                for fs in prepare(layers, plan.window_grid, self.params)]
        return [[fs[i] for fs in sets] for i in range(len(images))]

    def frame_map(self, patch_map: np.ndarray) -> np.ndarray:
        """A part's scored patch map (``self.grid``) as a patch map of its frame (same aspect as the frame)."""
        th, tw = self.plan.window_grid
        return stitch(patch_map.reshape(self.plan.n_windows, th, tw), self.plan)

    def extract(self, part: PartRecord) -> object | None:
        """Decode and prepare (features) a part: the stages the line runs one part ahead of scoring. A bad
        part gets its NO_VERDICT here and None is returned. Never raises for a bad part."""
        if part.verdict is not None:  # already decided upstream (e.g. a scanner frame that never came)
            return None
        recipe = self.recipes.get(part.recipe)
        if recipe is None:
            part.decide(Verdict.NO_VERDICT, Reason.ENGINE_ERROR, f"unknown recipe {part.recipe!r}")
            return None
        t0 = time.monotonic()
        try:
            decode_part(part)
        except DecodeError as exc:
            part.times.decode = time.monotonic() - t0
            part.decide(Verdict.NO_VERDICT, Reason.DECODE_ERROR, str(exc))
            return None
        part.times.decode = time.monotonic() - t0
        fast = self.fast_path
        before = fast.generation if fast is not None else 0
        prepared = recipe.extract(part)
        if fast is not None and (fast.shadowing() or fast.generation != before):   # only around the trial
            self._shadow(part, recipe)
            if len(self._generation) > 256:   # parts that were never scored (a bounded leftover)
                self._generation.clear()
            self._generation[part.part_id] = before
        return prepared

    def inspect(self, part: PartRecord, extracted: object | None = NOT_EXTRACTED,
                look_ahead: Sequence[tuple[PartRecord, object]] = ()) -> tuple[PartRecord, object | None]:
        """Fill ``part``'s verdict, reason, scores, map and stage times; also returns what its recipe
        prepared (for :meth:`admit`). Never raises for a bad part. ``extracted``: what :meth:`extract`
        returned for this part when the line ran it ahead; ``look_ahead``: later parts of the same recipe with
        what it returned for them (extra references). A part or reference extracted before a fast-path switch
        counts with its shadow features (the fast model's); a reference without them is left out."""
        if extracted is NOT_EXTRACTED:
            extracted = self.extract(part)
        elif self.fast_path is not None and extracted is not None and \
                self._generation.pop(part.part_id, self.fast_path.generation) != self.fast_path.generation:
            extracted = self._on_current_model(part, extracted)   # extracted ahead by the model before a switch
        if part.verdict is not None or extracted is None:
            return part, None
        if self.fast_path is not None:   # one feature space: the model that decides the part
            generation, current = self.fast_path.generation, []
            for p, x in look_ahead:
                if self._generation.get(p.part_id, generation) != generation:
                    x = self._carried(p.part_id, x)   # extracted before a switch: its shadow features, or left out
                    if x is None:
                        continue
                current.append((p, x))
            look_ahead = current
        return self.recipes[part.recipe].decide(part, extracted, [x for _, x in look_ahead])

    def _carried(self, part_id: str, extracted: object | None, take: bool = False) -> object | None:
        """A part extracted by the model before a switch, with the shadow features the trial computed for it
        (the fast model's; None when it has none)."""
        fast_sets = self.fast_path.carried(part_id, take) if extracted is not None else None
        return None if fast_sets is None else replace(extracted, sets=fast_sets)

    def _on_current_model(self, part: PartRecord, extracted: object) -> object | None:
        """What a part extracted before a switch is scored with: its shadow features, else extracted again."""
        carried = self._carried(part.part_id, extracted, take=True)
        return carried if carried is not None else self.recipes[part.recipe].extract(part)

    def admit(self, part: PartRecord, prepared: object | None, now: float | None = None) -> bool:
        """Pool admission after a verdict, by the part's recipe (:meth:`Recipe.admit`)."""
        recipe = self.recipes.get(part.recipe)
        if recipe is None:
            return False
        if alarm := recipe.guard.observe(part, prepared):
            self.on_alarm(f"recipe {recipe.name}: {alarm}")
        admitted = recipe.admit(part, prepared, now)
        if self.fast_path is not None and self.fast_path.shadowing():
            self.fast_path.observe(recipe.name, part, getattr(prepared, "sets", None), self._member_ids)
            if all(r.pool.size >= r.pool.min_size for r in self.recipes.values()):   # warm-up over: decide
                self._try_fast_path()
        return admitted

    def _member_ids(self) -> set[str]:
        return {pid for r in self.recipes.values() for pid in r.pool.part_ids[:r.pool.size]}

    def admit_late_warmup(self, part: PartRecord, extracted: object | None) -> None:
        """A part that missed its deadline before it was scored (its row says DEADLINE): while its recipe's pool
        warms up it would have had no verdict either way, and its features are there, so the pool still takes it
        as a warm-up member. An overloaded start (e.g. while the fast-path trial extracts every part twice) would
        otherwise warm up on a fraction of its parts. Never raises."""
        recipe = self.recipes.get(part.recipe)
        if extracted is None or recipe is None or recipe.pool.ready:
            return
        try:
            part, prepared = self.inspect(part, extracted)
            if part.reason == Reason.WARMUP:
                self.admit(part, prepared)
        except Exception as exc:   # the pool did not take this part; the line goes on
            log.exception("late warm-up admission failed for part %s", part.part_id)
            self.on_alarm(f"recipe {recipe.name}: pool admission failed for part {part.part_id}: {exc}")

    # -- the fast path (runtime/fast_path.py) -----------------------------------------------------------------
    def _fast_engine(self) -> FeatureEngine:
        fast = self.fast_path
        with fast.loading:   # two prefetch threads may ask at once: load it once
            if fast.engine is None:
                fast.engine = FeatureEngine(fast.plan.model, size=self.config.model.size,
                                            threads=self.config.model.threads)
            return fast.engine

    def _shadow(self, part: PartRecord, recipe: Recipe) -> None:
        """Shadow features of a part extracted during the trial through the fast model (prefetch threads; never
        fails a part). Every such part, whatever the pool's size when it is extracted: parts are extracted ahead
        of scoring, and warm-up curation can drop members after the pool first fills, so a part extracted while
        the pool looked ready may still become a warm-up member that the comparison needs."""
        if not self.fast_path.shadowing() or part.verdict is not None:
            return
        try:
            self.fast_path.keep_shadow(part.part_id, self.features([part.image], self._fast_engine())[0])
        except Exception as exc:   # the fast model must never take the line down: stay on fp32
            log.exception("fast path: shadow features failed")
            self._end_trial(False, f"the fast model failed on part {part.part_id}: {type(exc).__name__}: {exc}")

    def _try_fast_path(self) -> None:
        """Compare both paths on the shadowed warm-up parts; switch when they pass the verify gate."""
        fast = self.fast_path
        verdicts, shadows = [], []
        for name, recipe in self.recipes.items():
            shadow = shadow_pool(recipe.pool, fast.samples, fast.plan.scorer, self.grid, self.params)
            if shadow is None:
                verdicts.append((False, "the pool holds members from before the trial (restored or seeded)"))
                continue
            samples = [s for s in fast.samples.values() if s.recipe == name]
            verdicts.append(decide(compare_paths(samples, recipe.pool, shadow, recipe.threshold, self.grid,
                                                 self.params)))
            shadows.append((recipe.pool, shadow))
        switch = all(ok for ok, _ in verdicts)
        reason = "; ".join(f"recipe {name}: {why}" if len(self.recipes) > 1 else why
                           for name, (_, why) in zip(self.recipes, verdicts))
        if switch:
            for pool, shadow in shadows:
                adopt(pool, shadow)
        self._end_trial(switch, reason)

    def _end_trial(self, switch: bool, reason: str, record: bool = True) -> None:
        """Put the decision in force; the line records it (``record``: a trial's outcome or a resumed switch, not
        the every-start case of a restored fp32 pool, which is only logged)."""
        fast, old = self.fast_path, self.engine.manifest.model_sha256
        if switch:
            self.engine = self._fast_engine()
            self.layer_index = [self.engine.manifest.blocks.index(b) for b in self.config.model.blocks]
            fast.generation += 1
            self._rebind_identity()
        fast.finish(switch, reason)
        scorer = fast.plan.scorer if switch else self.config.scoring.backend
        event = FastPathEvent(switch, (f"switched to {fast.plan.model.name} + {scorer} scoring: " if switch else
                                       "stays on fp32: ") + reason, old, self.engine.manifest.model_sha256, scorer)
        (log.info if switch or not record else log.warning)("fast path: %s", event.reason)
        if record:
            self.on_fast_path(event)

    def _rebind_identity(self) -> None:
        """Pools are now built with the fast model: their stored identity says so."""
        for recipe in self.recipes.values():
            recipe.scoring = replace(recipe.scoring, model_identity=self.pool_identity())

    def _resume_fast_path(self) -> bool:
        """At start: pools stored by this line after it had switched put it on the fast path before they load."""
        fast = self.fast_path
        if fast is None or not fast.shadowing():
            return False
        fast_tokens = load_manifest(fast.plan.model, check_hash=False).tokens_identity(
            self.config.model.blocks, self._reads_image_token())
        for name in self.recipes:
            path = pool_path(self.config.storage.dir, name)
            try:
                if path.is_file() and stored_identity(path, self.upgrade_identity).get("tokens") != fast_tokens:
                    return False
            except DAMAGED_FILE_ERRORS:
                continue   # load_pool sets it aside and restores the previous one
        for recipe in self.recipes.values():
            pool = recipe.pool
            pool.scorer = make_scorer(fast.plan.scorer, pool.n_sets, pool.patches, pool.dim, pool.capacity)
            pool.scorer_name = fast.plan.scorer
        self._end_trial(True, "its stored pools were built on the fast path, verified when this line switched")
        return True


def _same_aspect(shape: tuple[int, ...], planned: tuple[int, int], tolerance: float = 0.15) -> bool:
    """Whether a frame's aspect is within ``tolerance`` of the planned frame's."""
    return abs((shape[0] / shape[1]) / (planned[0] / planned[1]) - 1) <= tolerance
