"""Typed run configuration: YAML files validated into pydantic models before anything starts.

This module owns the schema, the packaged configs (``ssl_train/configs/*.yaml``), command-line
overrides (``--set dotted.key=value``) and the one-sentence messages for bad input. It must not
build models, touch storage or start Ray: a config is checked completely before any of that.
"""

from __future__ import annotations

import json
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

    patch_size: PositiveInt = Field(
        16,
        description="Side of the square patches the image is cut into, in pixels.")
    embed_dim: PositiveInt = Field(
        384,
        description="Width of the encoder's tokens.")
    depth: PositiveInt = Field(
        12,
        description="Transformer blocks of the encoder.")
    num_heads: PositiveInt = Field(
        6,
        description="Attention heads of each block; must divide embed_dim.")
    mlp_ratio: PositiveFloat = Field(
        4.0,
        description="Hidden width of each block's MLP, as a multiple of embed_dim.")
    pos_embed: Literal["sincos", "learned"] = Field(
        "sincos",
        description="Position embeddings: fixed 2-D sine-cosine (as MAE) or learned.")
    pool: Literal["token", "avg"] = Field(
        "token",
        description="The image's embedding: the class token, or the average of the patch tokens.")
    drop_path_rate: Annotated[float, Field(ge=0, lt=1)] = Field(
        0.0,
        description=("Stochastic depth: the rate of dropping a block's residual branch, reached "
        "at the last block."))

    @model_validator(mode="after")
    def _heads_divide_width(self) -> "EncoderConfig":
        check_heads_divide_width(self.embed_dim, self.num_heads)
        return self


class ModelConfig(StrictSection):
    """The shared encoder and the image size it sees (heads and decoders are the objectives')."""

    image_size: PositiveInt = Field(
        224,
        description=("Side of the square images the encoder sees (global views), in pixels; a "
        "multiple of the patch size."))
    encoder: EncoderConfig = Field(
        EncoderConfig(),
        description="The shared timm VisionTransformer.")

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
    base_lr: PositiveFloat = Field(
        1.5e-4,
        description=("AdamW's learning rate at a global batch of 256; the run uses base_lr x "
        "global_batch_size / 256 (linear scaling)."))
    weight_decay: NonNegativeFloat = Field(
        0.05,
        description="AdamW's decoupled weight decay (not on biases, norms and loss weights).")
    beta1: Annotated[float, Field(ge=0, lt=1)] = Field(
        0.9,
        description="AdamW's first-moment decay.")
    beta2: Annotated[float, Field(ge=0, lt=1)] = Field(
        0.95,
        description="AdamW's second-moment decay.")
    warmup_steps: Annotated[int, Field(ge=0)] = Field(
        0,
        description="Steps of linear learning-rate warm-up from zero, before the cosine decay.")
    min_lr_ratio: Annotated[float, Field(ge=0, le=1)] = Field(
        0.0,
        description="The learning rate at the last step, as a fraction of the peak.")
    grad_clip_norm: PositiveFloat | None = Field(
        3.0,
        description="Clip the gradients' global norm to this; null: no clipping.")
    accumulation_steps: PositiveInt = Field(
        1,
        description=("Micro-batches a step's gradient is accumulated over (each worker's share of"
        " the global batch is split into these)."))


class TrainConfig(StrictSection):
    steps: PositiveInt = Field(
        1000,
        description=("Optimiser steps of the whole run (the learning-rate schedule spans them, "
        "whatever the slices)."))
    global_batch_size: PositiveInt = Field(
        256,
        description=("Images a step over all workers; must split evenly over num_workers x "
        "accumulation_steps."))
    seed: int = Field(
        0,
        description=("Seed of the model's initialisation and of each step's randomness (masking, "
        "drop path)."))
    log_every: PositiveInt = Field(
        10,
        description="Steps between progress lines on the console (metrics.jsonl has every step).")
    num_workers: PositiveInt = Field(
        2,
        description="Ray Train workers (one per GPU on a GPU cluster).")
    use_gpu: bool = Field(
        False,
        description="Train on GPUs (NCCL); false: CPUs (gloo).")
    cpus_per_worker: PositiveFloat = Field(
        1.0,
        description="CPUs Ray reserves for each training worker.")
    checkpoint_every: PositiveInt = Field(
        50,
        description="Steps between checkpoints (one is also written at the end).")
    keep_checkpoints: PositiveInt = Field(
        3,
        description="Newest checkpoints kept in the run directory; older ones are deleted.")
    # Restarts of the worker group from the last checkpoint before the run fails.
    max_failures: Annotated[int, Field(ge=-1)] = Field(
        3,
        description=("Restarts of the worker group from the last checkpoint before the run fails;"
        " -1: no limit."))
    # How workers are placed on nodes (Ray placement group strategy).
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_SPREAD", "STRICT_PACK"] = Field(
        "PACK",
        description="How Ray places the workers on nodes (a placement group strategy).")


class ParallelConfig(StrictSection):
    """How the model is spread over workers (applied outside the model code)."""

    # bf16: FSDP2's bf16 parameters and compute with fp32 gradient reduction, on any device
    # (losses, batch-norm statistics and loss weights stay fp32). auto: bf16 on GPUs, fp32 on CPUs.
    mixed_precision: Literal["auto", "bf16", "fp32"] = Field(
        "auto",
        description=("bf16: FSDP2's bf16 parameters and compute with fp32 gradient reduction, on "
        "any device (losses, batch-norm statistics and loss weights stay fp32); "
        "auto: bf16 on GPUs, fp32 on CPUs."))
    activation_checkpointing: bool = Field(
        False,
        description=("Recompute each transformer block's activations in the backward pass instead"
        " of keeping them (less memory, more compute)."))
    # false: each FSDP group stays gathered from its first forward to the end of backward (one
    # all-gather a step for the several encoder passes); true: ZeRO-3, less memory, more gathers.
    reshard_after_forward: bool = Field(
        False,
        description=("false: each FSDP group stays gathered from its first forward to the end of "
        "backward (one all-gather a step for the several encoder passes); true: "
        "ZeRO-3, less memory, more gathers."))
    # torch.compile of each transformer block (before sharding, as torchtitan does).
    compile: bool = Field(
        False,
        description="torch.compile each transformer block before sharding (as torchtitan does).")


class RunConfig(StrictSection):
    name: Annotated[str, Field(min_length=1, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")] = Field(
        "run",
        description=("The run's name: its run directory is OUTPUT_DIR/NAME, and the same name "
        "resumes it."))
    # Where run directories live: a local path or an fsspec URL such as s3://bucket/runs.
    output_dir: Annotated[StorageUrl, Field(min_length=1)] = Field(
        "runs",
        description=("Where run directories live: a local path or an fsspec URL such as "
        "s3://bucket/runs."))

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
    metrics_port: Annotated[int, Field(ge=1024, le=65535)] | None = Field(
        8090,
        description=("Ray's Prometheus metrics port on a local cluster (a cluster's nodes use "
        "theirs, e.g. KubeRay's metrics port); it exposes metric values and run "
        "names only. A taken port moves to a free one, said on the console. null: "
        "Ray picks one."))
    # Every this many steps, embeddings of a held batch feed std, rank, alignment, uniformity.
    health_every: PositiveInt = Field(
        10,
        description=("Steps between the collapse signals (embedding std, effective rank, "
        "alignment, uniformity) on a held batch."))
    # A labelled monitor set for a kNN accuracy of frozen features at the same cadence:
    # scikit-learn's digits (half as reference, half as queries), or none.
    images_every: PositiveInt = Field(
        100,
        description=("Steps between the pictures in TensorBoard: MAE's reconstructions of the "
                     "held batch (also reconstructions_step_N.png in the run directory) and the "
                     "views the objectives were given."))
    knn_monitor: Literal["none", "digits"] = Field(
        "none",
        description=("A labelled monitor set for a kNN accuracy of frozen features at the same "
        "cadence: scikit-learn's digits, or none."))


class GridIntensityConfig(StrictSection):
    """A grid carbon intensity stated by the user, with where it comes from."""

    g_per_kwh: NonNegativeFloat = Field(
        description="Grams of CO2e per kWh of the grid that powers the run.")
    source: Annotated[str, Field(min_length=1)] = Field(
        description=("Where the figure comes from (a supplier's statement, a grid operator's "
        "data)."))
    year: Annotated[int, Field(ge=1990, le=2100)] | None = Field(
        None,
        description="The year the figure is for.")


class PueConfig(StrictSection):
    """The facility's power usage effectiveness (total facility energy / IT energy)."""

    value: Annotated[float, Field(ge=1.0, le=5.0)] = Field(
        1.0,
        description=("Power usage effectiveness: the facility's total energy over its IT energy "
        "(1.0: no overhead counted)."))
    source: Annotated[str, Field(min_length=1)] = Field(
        ( "assumed: 1.0 counts no facility overhead; set energy.pue for your data centre"),
        description="Where the PUE figure comes from.")
    year: Annotated[int, Field(ge=1990, le=2100)] | None = Field(
        None,
        description="The year the PUE figure is for.")


class EnergyConfig(StrictSection):
    """Energy metering, attribution and carbon (see docs/energy.md)."""

    enabled: bool = Field(
        True,
        description="Meter every node's and GPU's energy, write the ledger and the report.")
    # A region of the default table (world, an ISO 3166 alpha-3 country such as FRA,
    # gcp:europe-west1, aws:eu-west-1, azure:westeurope), or grid_intensity with its source.
    region: str | None = Field(
        None,
        description=("A region of the default grid-intensity table: world, an ISO 3166 alpha-3 "
        "country such as FRA, gcp:europe-west1, aws:eu-west-1, azure:westeurope. "
        "Alternative to grid_intensity."))
    grid_intensity: GridIntensityConfig | None = Field(
        None,
        description=("The grid's carbon intensity with its source, when no region of the table "
        "fits."))
    pue: PueConfig = Field(
        PueConfig(),
        description="The data centre's power usage effectiveness and its source.")
    interval_seconds: Annotated[float, Field(ge=0.05, le=300)] = Field(
        1.0,
        description="Seconds between the meters' samples.")
    # The ledger holds one line per this many seconds of samples (their sums): a week on 64
    # nodes stays about a gigabyte (docs/energy.md).
    record_every_seconds: Annotated[float, Field(ge=0.05)] = Field(
        60.0,
        description="The ledger holds one line per this many seconds of samples (their sums).")
    # The ledger is written in parts of this many seconds, each made durable once when it
    # closes (uploaded to an object store; local ones are appended to as they go).
    upload_every_seconds: Annotated[float, Field(ge=1)] = Field(
        300.0,
        description=("The ledger is written in parts of this many seconds, each made durable once"
        " when it closes (uploaded to an object store)."))
    # After this many steps the run's total energy and CO2e are projected and printed.
    projection_after_steps: PositiveInt = Field(
        20,
        description=("After this many steps the whole run's energy and CO2e are projected and "
        "printed."))
    # Where RAPL counters are (a container may see the host's under another path).
    powercap_root: Annotated[str, Field(min_length=1)] = Field(
        "/sys/class/powercap",
        description=("Where the RAPL counters are (a container may see the host's under another "
        "path)."))
    # Per package, for the CPU estimate when RAPL is unreadable (default: CodeCarbon's table).
    cpu_tdp_watts: PositiveFloat | None = Field(
        None,
        description=("TDP of each CPU package, for the estimate where RAPL is unreadable; null: "
        "CodeCarbon's table."))

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

    run: RunConfig = Field(
        RunConfig(),
        description="The run's name and where its run directory is.")
    model: ModelConfig = Field(
        ModelConfig(),
        description="The shared encoder and its image size.")
    # What the shared encoder learns from; see ssl_train/objectives/.
    objectives: list[SerializeAsAny[ObjectiveConfig]] = Field(
         default_factory=lambda: _objective_configs(list(DEFAULT_OBJECTIVES)),
        description=("What the shared encoder learns from: a list of objective names or mappings "
        "{name: ..., field: value} (simclr, mae, mocov3, byol, simsiam, dino)."))
    # learned: uncertainty weighting (ssl_train/models/weighting.py); fixed: each objective's weight.
    weighting: Literal["learned", "fixed"] = Field(
        "learned",
        description=("How the objectives' losses combine: learned (uncertainty weighting, a "
        "learned log-variance per loss) or fixed (each objective's weight)."))
    optim: OptimConfig = Field(
        OptimConfig(),
        description="AdamW and its schedule.")
    train: TrainConfig = Field(
        TrainConfig(),
        description="Steps, batch, workers and checkpoints.")
    parallel: ParallelConfig = Field(
        ParallelConfig(),
        description="How the model is spread over workers (FSDP2, precision).")
    data: DataConfig = Field(
        DataConfig(),
        description="The streaming data stage.")
    telemetry: TelemetryConfig = Field(
        TelemetryConfig(),
        description="Metrics export and the representation-health monitor.")
    energy: EnergyConfig = Field(
        EnergyConfig(),
        description="Energy metering, attribution and carbon.")

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


def with_values(config: PretrainConfig, values: dict[str, Any],
                source: str = "config") -> PretrainConfig:
    """``config`` with each ``dotted.key: value`` set as ``--set`` would, validated again."""
    raw = config.model_dump(mode="json")
    for key, value in values.items():
        apply_override(raw, f"{key}={json.dumps(value)}")  # JSON is YAML
    return validate_config(raw, source=source)


def dump_config(config: PretrainConfig) -> str:
    """The resolved config as YAML that ``load_config`` reads back to the same values."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)


def _type_name(annotation: Any) -> str:
    """A config field's type as a reader says it: int, one of learned | fixed, float or null."""
    import types
    import typing

    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Annotated:
        return _type_name(args[0])
    if origin is Literal:
        return "one of " + " | ".join(str(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _type_name(a) for a in args)
    if origin in (list, tuple):
        inner = ", ".join(_type_name(a) for a in args if a is not Ellipsis)
        return f"({inner})" if origin is tuple else f"list of {inner}"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "section"
    return getattr(annotation, "__name__", str(annotation))


def _bounds(field) -> str:
    marks = {"gt": ">", "ge": ">=", "lt": "<", "le": "<=", "min_length": "length >="}
    found = []
    for item in field.metadata:
        for name, sign in marks.items():
            value = getattr(item, name, None)
            if value is not None:
                found.append(f"{sign} {value:g}" if isinstance(value, float) else
                             f"{sign} {value}")
    return f" ({', '.join(found)})" if found else ""


def _sections(model: type[BaseModel], prefix: str, defaults: BaseModel):
    """(dotted key, field, its default, section class or None) of every field under ``model``,
    whose default values ``defaults`` holds (a section's defaults are its parent's)."""
    import typing

    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        default = getattr(defaults, name, None)
        if model is PretrainConfig and name == "objectives":
            yield key, field, default, None
            for objective in objective_names():
                config_class = objective_class(objective).config_class
                yield from _sections(config_class, f"{key}.{objective}.",
                                     config_class.model_construct())
            continue
        candidates = [field.annotation, *typing.get_args(field.annotation)]
        nested = next((c for c in candidates
                       if isinstance(c, type) and issubclass(c, BaseModel)), None)
        yield key, field, default, nested
        if nested is not None:
            yield from _sections(nested, f"{key}.",
                                 default if default is not None else nested.model_construct())


def explain_fields(key: str | None = None) -> list[str]:
    """Every config field under ``key`` (all of them without): its dotted key, type, bounds,
    default and description. An unknown key is a ConfigError."""
    lines = []
    for dotted, field, default, nested in _sections(PretrainConfig, "",
                                                    PretrainConfig.model_construct()):
        if key and dotted != key and not dotted.startswith(f"{key}."):
            continue
        if nested is not None:
            head = f"{dotted}: section"
        else:
            if field.is_required():
                shown = "required"
            elif isinstance(default, list):
                shown = "default [" + ", ".join(getattr(d, "name", str(d)) for d in default) + "]"
            else:
                shown = f"default {yaml.safe_dump(default, default_flow_style=True).strip()}"
                shown = shown.removesuffix("\n...").removesuffix(" ...")
            head = f"{dotted}: {_type_name(field.annotation)}{_bounds(field)}, {shown}"
        lines += [head, f"    {field.description or '(no description)'}"]
    if not lines:
        sections = ", ".join(PretrainConfig.model_fields)
        raise ConfigError(f"no config field {key} (the sections: {sections}; objectives.NAME "
                          "for an objective's fields)")
    return lines
