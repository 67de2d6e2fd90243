"""Validated configuration: params.yaml is read once at the edge, then passed down as objects."""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from components.errors import AceError

PARAMS_FILE = Path("params.yaml")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PathsConfig(_Section):
    data_dir: Path = Path("data")
    artifacts_dir: Path = Path("artifacts")


class ScaleConfig(_Section):
    n_products: int = Field(gt=0)
    n_queries: int = Field(gt=0)
    searches_per_day: int = Field(gt=0)
    days: int = Field(ge=2)
    test_days: int = Field(ge=1)

    @model_validator(mode="after")
    def _some_training_days(self) -> ScaleConfig:
        if self.test_days >= self.days:
            raise ValueError(f"test_days ({self.test_days}) must be fewer than days ({self.days})")
        return self


Share = float


class SynthConfig(_Section):
    scale: str = "demo"
    seed: int = 13
    scales: dict[str, ScaleConfig]
    n_categories: int = Field(default=24, ge=2)
    impressions_per_search: int = Field(default=10, ge=1)
    canvas_min: int = Field(default=160, ge=32)
    canvas_max: int = Field(default=320, ge=32)
    object_fill_min: Share = Field(default=0.25, gt=0, le=1)
    object_fill_max: Share = Field(default=0.6, gt=0, le=1)
    clutter_shapes: int = Field(default=6, ge=0)
    distractor_share: Share = Field(default=0.8, ge=0, le=1)
    title_omit_share: Share = Field(default=0.3, ge=0, le=1)
    title_misstate_share: Share = Field(default=0.1, ge=0, le=1)
    query_synonym_share: Share = Field(default=0.25, ge=0, le=1)
    query_typo_share: Share = Field(default=0.08, ge=0, le=1)
    query_shuffle_share: Share = Field(default=0.2, ge=0, le=1)
    zipf_exponent: float = Field(default=1.1, gt=0)
    position_bias_power: float = Field(default=1.0, ge=0)
    click_noise: Share = Field(default=0.03, ge=0, le=1)
    workers: int = Field(default=2, ge=1)

    @model_validator(mode="after")
    def _consistent(self) -> SynthConfig:
        if self.scale not in self.scales:
            raise ValueError(f"scale {self.scale!r} is not one of {sorted(self.scales)}")
        if self.canvas_min > self.canvas_max:
            raise ValueError("canvas_min must not exceed canvas_max")
        if self.object_fill_min > self.object_fill_max:
            raise ValueError("object_fill_min must not exceed object_fill_max")
        if self.title_omit_share + self.title_misstate_share > 1:
            raise ValueError("title_omit_share + title_misstate_share must not exceed 1")
        return self

    @property
    def size(self) -> ScaleConfig:
        return self.scales[self.scale]


class ValidateConfig(_Section):
    min_image_side: int = Field(default=64, ge=1)
    max_title_chars: int = Field(default=512, ge=1)
    max_query_chars: int = Field(default=128, ge=1)
    max_position: int = Field(default=100, ge=1)
    max_quarantine_share: Share = Field(default=0.05, ge=0, le=1)


class TrackingConfig(_Section):
    experiment: str = "ace"
    registered_model: str = "ace"


class Params(_Section):
    paths: PathsConfig = PathsConfig()
    synth: SynthConfig
    validate_: ValidateConfig = Field(default=ValidateConfig(), alias="validate")
    tracking: TrackingConfig = TrackingConfig()

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    def section(self, name: str) -> _Section:
        """The config object of one params.yaml section, by its YAML name."""
        return self.validate_ if name == "validate" else getattr(self, name)


def load_params(path: Path | str = PARAMS_FILE, overrides: dict | None = None) -> Params:
    """Read and validate params.yaml; `overrides` maps dotted keys (``synth.scale``) to values."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except FileNotFoundError as err:
        raise ConfigError(f"{path}: file not found") from err
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({err})") from err
    for dotted, value in (overrides or {}).items():
        node = raw
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    try:
        return Params.model_validate(raw)
    except ValidationError as err:
        problems = "; ".join(
            f"{'.'.join(str(part) for part in e['loc']) or 'params'}: {e['msg']}"
            for e in err.errors()
        )
        raise ConfigError(f"{path}: {problems}") from err


class ConfigError(AceError):
    """params.yaml is missing or invalid; the message names the file and the field."""
