"""Job configuration: one pydantic model per stage, composed into ``JobConfig``.

Every model forbids unknown keys, so a typo fails before any work starts with a message that
names the key path (torchtune ``_parse.py`` habit: YAML + ``a.b=c`` overrides, validated up
front). Stage builders take only their own sub-config; names several stages share (the feature
store, the model name) are job-level keys. Every field's description is one line: what, unit,
default (measurements live in bench/RESULTS.md). Checks across stages (model and target names,
converter keywords, the promotion metric, URLs of other sections) live in ``pipeline.checks``
and run when a ``JobConfig`` validates. ``mask_secrets`` hides credentials wherever a config
is printed or stored.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from pipeline.storage import mask_secrets

from .common import (
    MOVED_KEYS,
    REMOVED_KEYS,
    SPLITS,
    STAGES,
    VIDEO_EXTENSIONS,
    LeaseConfig,
    RayConfig,
    Rewrite,
    Split,
    StorageConfig,
    _plain_name,
    _Strict,
)
from .extract import DecodeConfig, ExtractConfig, ModelsConfig, ModelSpec, SourcesConfig
from .train import (
    DeficiencyConfig,
    EvaluateConfig,
    ExportConfig,
    HeadConfig,
    LossConfig,
    OptimConfig,
    TrainConfig,
)

__all__ = [
    "MOVED_KEYS", "REMOVED_KEYS", "SPLITS", "STAGES", "VIDEO_EXTENSIONS", "ConfigError",
    "DecodeConfig", "DeficiencyConfig", "EvaluateConfig", "ExportConfig", "ExtractConfig",
    "HeadConfig", "JobConfig", "LeaseConfig", "LossConfig", "ModelSpec", "ModelsConfig",
    "OptimConfig", "RayConfig", "Rewrite", "SourcesConfig", "Split", "StorageConfig", "TrainConfig",
    "apply_overrides", "format_config", "load_job", "validate",
]


class JobConfig(_Strict):
    name: str = Field(
        "job", description="job name: runs/<name>/ holds its checkpoints, metrics and reports")
    store: str = Field(
        "features", description="feature store name under <storage>/features/ (every stage)")
    model_name: str = Field(
        "tokconv", description="model name under <storage>/models/ (train, evaluate, export)")
    stages: list[Literal["extract", "train", "evaluate", "export"]] = Field(
        default_factory=lambda: list(STAGES), description="stages to run, in pipeline order")
    storage: StorageConfig = Field(StorageConfig(), description="where outputs go")
    ray: RayConfig = Field(RayConfig(), description="the Ray cluster")
    sources: SourcesConfig = Field(SourcesConfig(), description="which videos")
    decode: DecodeConfig = Field(DecodeConfig(), description="clip windows")
    models: ModelsConfig = Field(ModelsConfig(), description="the four backbones")
    extract: ExtractConfig = Field(ExtractConfig(), description="extract stage")
    train: TrainConfig = Field(TrainConfig(), description="train stage")
    evaluate: EvaluateConfig = Field(EvaluateConfig(), description="evaluate stage")
    export: ExportConfig = Field(ExportConfig(), description="export stage")
    lease: LeaseConfig = Field(LeaseConfig(), description="leases that keep runs from overlapping")

    @model_validator(mode="before")
    @classmethod
    def _moved_keys(cls, data: Any) -> Any:
        for old, new in MOVED_KEYS.items():
            section, key = old.split(".")
            sub = data.get(section) if isinstance(data, dict) else None
            if isinstance(sub, dict) and key in sub:
                raise ValueError(f"{old}: moved to {new} (a job-level key)")
        return data

    @field_validator("stages")
    @classmethod
    def _stages_in_order(cls, v: list[str]) -> list[str]:
        return [s for s in STAGES if s in v]

    _plain_names = field_validator("name", "store", "model_name")(_plain_name)

    @model_validator(mode="after")
    def _cross_checks(self) -> JobConfig:
        from pipeline.checks import check_job
        problems = check_job(self)
        if problems:
            raise ValueError("\n".join(problems))
        return self


def format_config(job: JobConfig) -> str:
    """The job as indented JSON with credentials masked (``--print-config``, logs)."""
    return json.dumps(mask_secrets(job.model_dump()), indent=2)


class ConfigError(ValueError):
    """A job file or override that does not validate; the message names the key path."""


def _parse_scalar(text: str) -> Any:
    return yaml.safe_load(text) if text != "" else ""


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``a.b.c=value`` overrides (value parsed as YAML) to a nested dict in place."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key.path=value")
        key, _, raw = item.partition("=")
        parts = key.strip().split(".")
        if not all(parts):
            raise ConfigError(f"override {item!r}: empty key segment")
        node = data
        for p in parts[:-1]:
            nxt = node.setdefault(p, {})
            if not isinstance(nxt, dict):
                raise ConfigError(f"override {key}: {p!r} is not a mapping")
            node = nxt
        node[parts[-1]] = _parse_scalar(raw)
    return data


def _format_validation_error(err: ValidationError, source: str) -> str:
    """One line per problem, each naming its key path: ``  key.path: why (got value)``."""
    lines = [f"invalid job config ({source}):"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        if e["type"] == "value_error":
            text = str(e["ctx"]["error"])
            if not loc or text.startswith(loc + "."):  # a check whose messages name their keys
                lines += [f"  {t}" for t in text.splitlines()]
                continue
            msg = text
        else:
            msg = "unknown key" if e["type"] == "extra_forbidden" else e["msg"]
        shown = e["type"] != "extra_forbidden" and not isinstance(e.get("input"), dict)
        got = f" (got {mask_secrets(e['input'])!r})" if shown else ""
        lines.append(f"  {loc or '<root>'}: {msg}{got}")
    return "\n".join(lines)


def validate(data: dict, source: str = "<dict>") -> JobConfig:
    try:
        return JobConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err, source)) from None


def load_job(path: str | Path | None, overrides: list[str] = ()) -> JobConfig:
    """Read a job YAML (its shebang line is a YAML comment), apply overrides, validate."""
    data: dict = {}
    source = "<defaults>"
    if path is not None:
        source = str(path)
        try:
            data = yaml.safe_load(Path(path).read_text()) or {}
        except FileNotFoundError:
            raise ConfigError(f"job file not found: {path}") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"job file {path} is not valid YAML: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"job file {path}: top level must be a mapping, "
                              f"got {type(data).__name__}")
    apply_overrides(data, list(overrides))
    return validate(data, source)
