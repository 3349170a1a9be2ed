"""Typed run configuration: YAML files validated into pydantic models before anything starts.

This module owns the schema, the packaged configs (``ssl_train/configs/*.yaml``), command-line
overrides (``--set dotted.key=value``) and the one-sentence messages for bad input. It must not
build models, touch storage or start Ray: a config is checked completely before any of that.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    Field,
    SerializeAsAny,
    ValidationError,
    field_validator,
    model_validator,
)

from pipelines.settings import ConfigError, StrictSection
from pipelines.storage.access import CREDENTIALS_IN_URL, StorageUrl, is_remote
from pipelines.stream.stage import DataConfig
from pipelines.views.augment import ViewSpec, merge_views
from ssl_train import PACKAGED_CONFIG_DIR, packaged_config_names  # noqa: F401 (re-exported)
from ssl_train.models.decoder import check_heads_divide_width
from ssl_train.objectives import ObjectiveConfig, objective_class, objective_names

PositiveInt = Annotated[int, Field(gt=0)]
PositiveFloat = Annotated[float, Field(gt=0)]
NonNegativeFloat = Annotated[float, Field(ge=0)]


class EncoderConfig(StrictSection):
    """The shared timm VisionTransformer."""

    patch_size: PositiveInt = 16
    embed_dim: PositiveInt = 384
    depth: PositiveInt = 12
    num_heads: PositiveInt = 6
    mlp_ratio: PositiveFloat = 4.0
    pos_embed: Literal["sincos", "learned"] = "sincos"
    pool: Literal["token", "avg"] = "token"
    drop_path_rate: Annotated[float, Field(ge=0, lt=1)] = 0.0

    @model_validator(mode="after")
    def _heads_divide_width(self) -> "EncoderConfig":
        check_heads_divide_width(self.embed_dim, self.num_heads)
        return self


class ModelConfig(StrictSection):
    """The shared encoder and the image size it sees (heads and decoders are the objectives')."""

    image_size: PositiveInt = 224
    encoder: EncoderConfig = EncoderConfig()

    @model_validator(mode="after")
    def _consistent_shapes(self) -> "ModelConfig":
        if self.image_size % self.encoder.patch_size:
            raise ValueError(
                f"model.image_size ({self.image_size}) must be a multiple of "
                f"model.encoder.patch_size ({self.encoder.patch_size})"
            )
        return self

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.encoder.patch_size) ** 2


class OptimConfig(StrictSection):
    # The learning rate actually used is base_lr * global_batch_size / 256 (linear scaling rule).
    base_lr: PositiveFloat = 1.5e-4
    weight_decay: NonNegativeFloat = 0.05
    beta1: Annotated[float, Field(ge=0, lt=1)] = 0.9
    beta2: Annotated[float, Field(ge=0, lt=1)] = 0.95
    warmup_steps: Annotated[int, Field(ge=0)] = 0
    min_lr_ratio: Annotated[float, Field(ge=0, le=1)] = 0.0
    grad_clip_norm: PositiveFloat | None = 3.0
    accumulation_steps: PositiveInt = 1


class TrainConfig(StrictSection):
    steps: PositiveInt = 1000
    global_batch_size: PositiveInt = 256
    seed: int = 0
    log_every: PositiveInt = 10
    num_workers: PositiveInt = 2
    use_gpu: bool = False
    cpus_per_worker: PositiveFloat = 1.0
    checkpoint_every: PositiveInt = 50
    keep_checkpoints: PositiveInt = 3
    # Restarts of the worker group from the last checkpoint before the run fails.
    max_failures: Annotated[int, Field(ge=-1)] = 3
    # How workers are placed on nodes (Ray placement group strategy).
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_SPREAD", "STRICT_PACK"] = "PACK"


class ParallelConfig(StrictSection):
    """How the model is spread over workers (applied outside the model code)."""

    # bf16: FSDP2's bf16 parameters and compute with fp32 gradient reduction, on any device
    # (losses, batch-norm statistics and loss weights stay fp32). auto: bf16 on GPUs, fp32 on CPUs.
    mixed_precision: Literal["auto", "bf16", "fp32"] = "auto"
    activation_checkpointing: bool = False
    # false: each FSDP group stays gathered from its first forward to the end of backward (one
    # all-gather a step for the several encoder passes); true: ZeRO-3, less memory, more gathers.
    reshard_after_forward: bool = False
    # torch.compile of each transformer block (before sharding, as torchtitan does).
    compile: bool = False


class RunConfig(StrictSection):
    name: Annotated[str, Field(min_length=1, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")] = "run"
    # Where run directories live: a local path or an fsspec URL such as s3://bucket/runs.
    output_dir: Annotated[StorageUrl, Field(min_length=1)] = "runs"

    def output_root(self) -> str:
        """``output_dir`` without a trailing slash, made absolute when it is a local path."""
        root = self.output_dir if is_remote(self.output_dir) else os.path.abspath(self.output_dir)
        return root.rstrip("/")

    def uri(self) -> str:
        """The run directory: OUTPUT_DIR/NAME."""
        return f"{self.output_root()}/{self.name}"


class TelemetryConfig(StrictSection):
    """Metrics export and the representation-health monitor."""

    # Ray's metrics port on a local cluster (a cluster's nodes use theirs, e.g. KubeRay's
    # `metrics` port). The endpoint exposes metric values and run names, nothing else. Ray binds
    # it to every interface (to loopback only when the node's own address is loopback).
    metrics_port: Annotated[int, Field(ge=1024, le=65535)] | None = 8090
    # Every this many steps, embeddings of a held batch feed std, rank, alignment, uniformity.
    health_every: PositiveInt = 10
    # A labelled monitor set for a kNN accuracy of frozen features at the same cadence:
    # scikit-learn's digits (half as reference, half as queries), or none.
    knn_monitor: Literal["none", "digits"] = "none"


class GridIntensityConfig(StrictSection):
    """A grid carbon intensity stated by the user, with where it comes from."""

    g_per_kwh: NonNegativeFloat
    source: Annotated[str, Field(min_length=1)]
    year: Annotated[int, Field(ge=1990, le=2100)] | None = None


class PueConfig(StrictSection):
    """The facility's power usage effectiveness (total facility energy / IT energy)."""

    value: Annotated[float, Field(ge=1.0, le=5.0)] = 1.0
    source: Annotated[str, Field(min_length=1)] = (
        "assumed: 1.0 counts no facility overhead; set energy.pue for your data centre")
    year: Annotated[int, Field(ge=1990, le=2100)] | None = None


class EnergyConfig(StrictSection):
    """Energy metering, attribution and carbon (see docs/energy.md)."""

    enabled: bool = True
    # A region of the default table (world, an ISO 3166 alpha-3 country such as FRA,
    # gcp:europe-west1, aws:eu-west-1, azure:westeurope), or grid_intensity with its source.
    region: str | None = None
    grid_intensity: GridIntensityConfig | None = None
    pue: PueConfig = PueConfig()
    interval_seconds: Annotated[float, Field(ge=0.05, le=300)] = 1.0
    # The ledger holds one line per this many seconds of samples (their sums): a week on 64
    # nodes stays about a gigabyte (docs/energy.md).
    record_every_seconds: Annotated[float, Field(ge=0.05)] = 60.0
    # The ledger is written in parts of this many seconds, each made durable once when it
    # closes (uploaded to an object store; local ones are appended to as they go).
    upload_every_seconds: Annotated[float, Field(ge=1)] = 300.0
    # After this many steps the run's total energy and CO2e are projected and printed.
    projection_after_steps: PositiveInt = 20
    # Where RAPL counters are (a container may see the host's under another path).
    powercap_root: Annotated[str, Field(min_length=1)] = "/sys/class/powercap"
    # Per package, for the CPU estimate when RAPL is unreadable (default: CodeCarbon's table).
    cpu_tdp_watts: PositiveFloat | None = None

    @model_validator(mode="after")
    def _ledger_cadence(self) -> "EnergyConfig":
        if not self.interval_seconds <= self.record_every_seconds <= self.upload_every_seconds:
            raise ValueError(
                f"energy.interval_seconds ({self.interval_seconds:g}) <= "
                f"energy.record_every_seconds ({self.record_every_seconds:g}) <= "
                f"energy.upload_every_seconds ({self.upload_every_seconds:g}) must hold: each "
                f"ledger line sums samples, each part holds lines")
        return self

    @model_validator(mode="after")
    def _known_region(self) -> "EnergyConfig":
        if self.region is not None:
            from ssl_train.energy.carbon import grid_intensity_of

            try:
                grid_intensity_of(self.region)
            except KeyError:
                raise ValueError(
                    f"energy.region {self.region!r} is not in the default table (world, an ISO "
                    "3166 alpha-3 country such as FRA, gcp:europe-west1, aws:eu-west-1, "
                    "azure:westeurope): give energy.grid_intensity {g_per_kwh, source, year} "
                    "instead"
                ) from None
        if self.region is not None and self.grid_intensity is not None:
            raise ValueError("energy.region and energy.grid_intensity are alternatives: set one")
        return self

    def grid(self) -> dict:
        """{g_per_kwh, source, year, region} of the configured intensity."""
        from ssl_train.energy.carbon import grid_intensity_of

        if self.grid_intensity is not None:
            return {**self.grid_intensity.model_dump(), "region": None}
        return grid_intensity_of(self.region)


DEFAULT_OBJECTIVES = ("simclr", "mae")


def _objective_configs(value: Any) -> list[ObjectiveConfig]:
    """``objectives:`` as validated configs: a bare name takes that objective's defaults, a
    mapping ``{name: mae, mask_ratio: 0.6}`` sets its fields. Problems are named by key
    (``objectives.mae.mask_ratio``) in one message."""
    if not isinstance(value, (list, tuple)) or not value:
        raise ValueError("objectives must be a non-empty list of objective names or mappings "
                         f"{{name: ..., field: value}} (known: {', '.join(objective_names())})")
    configs, problems = [], []
    for index, entry in enumerate(value):
        if isinstance(entry, ObjectiveConfig):
            configs.append(entry)
            continue
        raw = {"name": entry} if isinstance(entry, str) else entry
        if not isinstance(raw, dict) or not isinstance(raw.get("name"), str):
            problems.append(f"objectives.{index} must be an objective name or a mapping with a "
                            f"name (got {entry!r})")
            continue
        try:
            config_class = objective_class(raw["name"]).config_class
        except KeyError as err:
            problems.append(f"objectives.{index}: {err.args[0]}")
            continue
        try:
            configs.append(config_class.model_validate(raw))
        except ValidationError as err:
            problems += [_describe({**e, "loc": ("objectives", raw["name"], *e["loc"])})
                         for e in err.errors()]
    names = [c.name for c in configs]
    problems += [f"objectives.{name} is listed twice" for name in sorted(set(names))
                 if names.count(name) > 1]
    if problems:
        raise ValueError("; ".join(problems))
    return configs


class PretrainConfig(StrictSection):
    """The whole job: one section per concern."""

    run: RunConfig = RunConfig()
    model: ModelConfig = ModelConfig()
    # What the shared encoder learns from; see ssl_train/objectives/.
    objectives: list[SerializeAsAny[ObjectiveConfig]] = Field(
        default_factory=lambda: _objective_configs(list(DEFAULT_OBJECTIVES)))
    # learned: uncertainty weighting (ssl_train/models/weighting.py); fixed: each objective's weight.
    weighting: Literal["learned", "fixed"] = "learned"
    optim: OptimConfig = OptimConfig()
    train: TrainConfig = TrainConfig()
    parallel: ParallelConfig = ParallelConfig()
    data: DataConfig = DataConfig()
    telemetry: TelemetryConfig = TelemetryConfig()
    energy: EnergyConfig = EnergyConfig()

    @field_validator("objectives", mode="before")
    @classmethod
    def _known_objectives(cls, value: Any) -> list[ObjectiveConfig]:
        return _objective_configs(value)

    @model_validator(mode="after")
    def _batch_splits_into_micro_batches(self) -> "PretrainConfig":
        if self.energy.enabled and self.energy.region is None and self.energy.grid_intensity is None:
            raise ValueError(
                "energy.grid_intensity is missing: set energy.region (e.g. world, FRA, "
                "gcp:europe-west1, aws:eu-west-1) or energy.grid_intensity {g_per_kwh, source, "
                "year}, or energy.enabled=false"
            )
        if self.train.global_batch_size % self.optim.accumulation_steps:
            raise ValueError(
                f"train.global_batch_size ({self.train.global_batch_size}) must be a multiple of "
                f"optim.accumulation_steps ({self.optim.accumulation_steps})"
            )
        if self.train.global_batch_size % (self.train.num_workers * self.optim.accumulation_steps):
            raise ValueError(
                f"train.global_batch_size ({self.train.global_batch_size}) must split evenly "
                f"over train.num_workers ({self.train.num_workers}) x "
                f"optim.accumulation_steps ({self.optim.accumulation_steps})"
            )
        for objective in self.objectives:
            objective.check(self)
        merge_views([view for objective in self.objectives for view in objective.views()])
        return self

    def objective(self, name: str) -> ObjectiveConfig:
        """The config of objective ``name`` (KeyError when the run does not train it)."""
        for objective in self.objectives:
            if objective.name == name:
                return objective
        raise KeyError(f"this run's objectives are {', '.join(self.objective_names)}, not {name}")

    @property
    def objective_names(self) -> list[str]:
        return [objective.name for objective in self.objectives]

    def views(self) -> list[ViewSpec]:
        """The views the objectives read, each once: what the data stage cuts."""
        return merge_views([view for objective in self.objectives
                            for view in objective.views()])

    @property
    def learning_rate(self) -> float:
        return self.optim.base_lr * self.train.global_batch_size / 256


def resolve_config_path(name_or_path: str) -> Path:
    """A packaged config's name or a path to a YAML file, as a path that exists."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise ConfigError(f"config file {name_or_path} does not exist")
        return path
    packaged = PACKAGED_CONFIG_DIR / f"{name_or_path}.yaml"
    if packaged.is_file():
        return packaged
    raise ConfigError(
        f"no config named {name_or_path!r}: give a YAML path or one of "
        f"{', '.join(packaged_config_names())}"
    )


def apply_override(raw: dict[str, Any], assignment: str) -> None:
    """Apply one ``dotted.key=value`` to the raw mapping; the value is parsed as YAML."""
    key, sep, value_text = assignment.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {assignment!r} must look like dotted.key=value")
    parts = key.strip().split(".")
    node = raw
    if parts[0] == "objectives" and len(parts) > 1 and "objectives" not in raw:
        raw["objectives"] = list(DEFAULT_OBJECTIVES)
    for depth, part in enumerate(parts[:-1]):
        if isinstance(node, list):  # objectives.NAME.field: the entry of that objective
            node = _entry_named(node, part, key)
            continue
        child = node.setdefault(part, {})
        if not isinstance(child, dict) and not (part == "objectives" and isinstance(child, list)):
            raise ConfigError(
                f"--set {key}: {'.'.join(parts[: depth + 1])} is a value, not a section"
            )
        node = child
    if isinstance(node, list):
        raise ConfigError(f"--set {key}: set a field of the objective (objectives.NAME.field=...) "
                          "or the whole list (objectives=[...])")
    try:
        value = yaml.safe_load(value_text) if value_text.strip() else ""
    except yaml.YAMLError as err:
        raise ConfigError(f"--set {key}: value {value_text!r} is not valid YAML "
                          f"({yaml_problem(err)})") from None
    if node is raw and parts == ["objectives"] and isinstance(value, list):
        value = _keep_configured(raw.get("objectives"), value)
    node[parts[-1]] = value


def _keep_configured(before: Any, after: list) -> list:
    """``--set objectives=[mae]`` on a config that sets mae's fields keeps them: a bare name
    that the config already lists takes that entry (a new name takes the objective's defaults)."""
    configured = {e["name"]: e for e in before or [] if isinstance(e, dict) and "name" in e}
    return [configured.get(e, e) if isinstance(e, str) else e for e in after]


def _entry_named(entries: list, name: str, key: str) -> dict:
    """The mapping of the list entry called ``name`` (a bare name becomes a mapping)."""
    for index, entry in enumerate(entries):
        if entry == name:
            entries[index] = {"name": name}
            return entries[index]
        if isinstance(entry, dict) and entry.get("name") == name:
            return entry
    names = [e if isinstance(e, str) else e.get("name") for e in entries
             if isinstance(e, (str, dict))]
    raise ConfigError(f"--set {key}: the run has no objective {name} (its objectives: "
                      f"{', '.join(map(str, names))})")


def yaml_problem(err: yaml.YAMLError) -> str:
    """A YAML error on one line, e.g. "expected ',' or '}' at line 2, column 1"."""
    mark = getattr(err, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
    return f"{getattr(err, 'problem', None) or err}{where}"


def _describe(error: dict[str, Any]) -> str:
    key = ".".join(str(part) for part in error["loc"])
    if error["type"] == "extra_forbidden":
        return f"unknown key {key}"
    message = error["msg"].removeprefix("Value error, ")
    if key == "objectives" and error["type"] == "value_error":
        return message  # _objective_configs names each key itself
    if message.startswith(f"{key}.") or message.startswith(
            ("train.", "optim.", "energy.", "objectives.", "model.", "the ", "two ")):
        return message  # a cross-field check that names its keys itself
    if "input" in error and error["type"] not in ("missing",) and not isinstance(
        error["input"], dict
    ) and CREDENTIALS_IN_URL not in message:  # never echo a secret back
        message = f"{message} (got {error['input']!r})"
    return f"{key}: {message}" if key else message


def validate_config(raw: Any, source: str = "config") -> PretrainConfig:
    """Validate a raw mapping; every problem is named by its dotted key in one message."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source} must be a YAML mapping of sections, got {type(raw).__name__}")
    return validate_section(PretrainConfig, raw, source)


def validate_section(model: type[BaseModel], raw: dict[str, Any], source: str):
    """Validate one section (e.g. the ingest options) with the same messages as a whole config."""
    try:
        return model.model_validate(raw)
    except ValidationError as err:
        problems = "; ".join(_describe(e) for e in err.errors())
        raise ConfigError(f"invalid {source}: {problems}") from None


def load_config(name_or_path: str, overrides: list[str] | tuple[str, ...] = ()) -> PretrainConfig:
    """Read a packaged or user config, apply ``--set`` overrides, and validate the result."""
    path = resolve_config_path(name_or_path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"config {path} is not valid YAML: {yaml_problem(err)}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config {path} must be a YAML mapping of sections")
    for assignment in overrides:
        apply_override(raw, assignment)
    return validate_config(raw, source=f"config {path.name}")


def dump_config(config: PretrainConfig) -> str:
    """The resolved config as YAML that ``load_config`` reads back to the same values."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
