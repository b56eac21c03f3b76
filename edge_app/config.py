"""One typed, validated config file per line (YAML). Errors name the key and what was expected."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .record import FailSafe
from .scoring import MuscParams


class ConfigError(ValueError):
    """The line config is invalid; the message names every offending key."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class LineSettings(_Strict):
    name: str = "line"
    fail_safe: FailSafe = FailSafe.REJECT
    deadline_ms: float = Field(1500.0, gt=0, description="capture -> signal budget per part")
    queue_size: int = Field(4, ge=1, description="parts waiting for the engine before overload")
    dry_run: bool = Field(False, description="log verdicts in the ledger but do not signal the PLC")


class ModelSettings(_Strict):
    path: Path = Path("models/dinov2_vits14_musc.onnx")
    size: int = Field(224, ge=14)
    blocks: tuple[int, ...] = (6, 9)
    threads: Optional[int] = Field(None, ge=1)


class ScoringSettings(_Strict):
    aggregation: Literal["snamd", "lnamd", "none"] = "snamd"
    fraction: float = Field(0.3, gt=0, le=1)
    windows: tuple[int, ...] = (1, 7)
    salient_layer: int = Field(1, ge=0)

    def params(self) -> MuscParams:
        return MuscParams(aggregation=self.aggregation, fraction=self.fraction, windows=self.windows,
                          salient_layer=self.salient_layer)


class PoolSettings(_Strict):
    capacity: int = Field(40, ge=2)
    min_size: int = Field(10, ge=2)
    admit: Literal["accepted", "all"] = "accepted"
    near_duplicate_cosine: float = Field(0.995, gt=0, le=1)
    eviction: Literal["fifo", "reservoir"] = "fifo"
    horizon: Optional[int] = Field(None, ge=2, description="reservoir horizon in parts (default 5 x capacity)")
    persist_every_s: float = Field(30.0, gt=0)

    @model_validator(mode="after")
    def _min_fits(self):
        if self.min_size > self.capacity:
            raise ValueError(f"min_size ({self.min_size}) must not exceed capacity ({self.capacity})")
        return self


class RecipeSettings(_Strict):
    threshold: float = Field(0.5, description="re-scored score at or above which a part is rejected")
    pool: PoolSettings = PoolSettings()


class ReplaySource(_Strict):
    type: Literal["replay"]
    path: Optional[Path] = None
    paths: Optional[list[Path]] = None
    pattern: str = "**/*.png"
    rate: float = Field(4.0, gt=0, description="parts per second")
    shuffle: bool = False
    seed: int = 0
    limit: Optional[int] = Field(None, ge=1)
    loop: bool = False
    recipe: str = "default"
    part_prefix: str = "part"
    encoder_counts_per_part: Optional[int] = None


class OpenCVSource(_Strict):
    type: Literal["opencv"]
    device: Union[int, str] = 0
    width: Optional[int] = None
    height: Optional[int] = None
    fps: Optional[float] = None
    recipe: str = "default"
    part_prefix: str = "part"


class ZmqSource(_Strict):
    type: Literal["zmq"]
    endpoint: str = "tcp://127.0.0.1:5556"
    bind: bool = True
    recipe: str = "default"


SourceSettings = Union[ReplaySource, OpenCVSource, ZmqSource]


class SerialLink(_Strict):
    type: Literal["serial"]
    url: str = Field(..., description="/dev/ttyTHS1, a pty path, loop:// or socket://host:port")
    baudrate: int = 115200
    heartbeat_s: float = Field(1.0, gt=0)
    ack_timeout_s: float = Field(0.2, gt=0)
    max_retries: int = Field(3, ge=0)


class ZmqLink(_Strict):
    type: Literal["zmq"]
    endpoint: str = "tcp://127.0.0.1:5557"
    heartbeat_s: float = Field(1.0, gt=0)
    ack_timeout_s: float = Field(0.2, gt=0)
    max_retries: int = Field(3, ge=0)


LinkSettings = Union[SerialLink, ZmqLink]


class ArchiveSettings(_Strict):
    enabled: bool = True
    quota_mb: float = Field(500.0, gt=0)
    sample_accepted: float = Field(0.0, ge=0, le=1, description="fraction of accepted parts archived too")


class StorageSettings(_Strict):
    dir: Path = Path("runs/line")
    archive: ArchiveSettings = ArchiveSettings()


class ControlSettings(_Strict):
    socket: Optional[Path] = Field(None, description="local control socket (default: <storage.dir>/control.sock)")


class LineConfig(_Strict):
    line: LineSettings = LineSettings()
    model: ModelSettings = ModelSettings()
    scoring: ScoringSettings = ScoringSettings()
    recipes: dict[str, RecipeSettings] = Field(default_factory=lambda: {"default": RecipeSettings()})
    source: SourceSettings = Field(..., discriminator="type")
    link: LinkSettings = Field(..., discriminator="type")
    storage: StorageSettings = StorageSettings()
    control: ControlSettings = ControlSettings()

    @field_validator("recipes")
    @classmethod
    def _at_least_one(cls, value):
        if not value:
            raise ValueError("at least one recipe is needed")
        return value

    @model_validator(mode="after")
    def _source_recipe_known(self):
        if self.source.recipe not in self.recipes:
            raise ValueError(f"source.recipe {self.source.recipe!r} is not one of recipes {sorted(self.recipes)}")
        return self

    def config_hash(self) -> str:
        """Stable hash of the effective config, stamped into every ledger row."""
        return hashlib.sha256(json.dumps(self.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()[:16]


def _describe(error: dict) -> str:
    key = ".".join(str(p) for p in error["loc"] if not (isinstance(p, str) and p in ("replay", "opencv", "zmq", "serial")))
    message = error["msg"]
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
        lines = "\n".join(_describe(e) for e in exc.errors())
        raise ConfigError(f"{origin}: invalid line config:\n{lines}") from None


def load_config(path: str | Path) -> LineConfig:
    """Read and validate a YAML line config."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    return parse_config(raw or {}, str(path))
