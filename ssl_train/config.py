"""Typed run configuration: YAML files validated into pydantic models before anything starts.

This module owns the schema, the packaged configs (``ssl_train/configs/*.yaml``), command-line
overrides (``--set dotted.key=value``) and the one-sentence messages for bad input. It must not
build models, touch storage or start Ray: a config is checked completely before any of that.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, Field, ValidationError, model_validator

from pipelines.settings import StrictSection
from pipelines.storage import CREDENTIALS_IN_URL, StorageUrl
from pipelines.stream import DataConfig

PACKAGED_CONFIG_DIR = Path(__file__).parent / "configs"

PositiveInt = Annotated[int, Field(gt=0)]
PositiveFloat = Annotated[float, Field(gt=0)]
NonNegativeFloat = Annotated[float, Field(ge=0)]


class ConfigError(ValueError):
    """A configuration a user wrote cannot be used; the message says which key and why."""


def _check_heads_divide_width(embed_dim: int, num_heads: int) -> None:
    """Attention splits the width evenly over the heads."""
    if embed_dim % num_heads:
        raise ValueError(f"embed_dim ({embed_dim}) must be a multiple of num_heads ({num_heads})")


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
        _check_heads_divide_width(self.embed_dim, self.num_heads)
        return self


class ProjectorConfig(StrictSection):
    """The contrastive branch's MLP head: Linear-BN-ReLU-Linear."""

    hidden_dim: PositiveInt = 2048
    out_dim: PositiveInt = 128


class DecoderConfig(StrictSection):
    """The masked branch's lightweight transformer decoder."""

    embed_dim: PositiveInt = 256
    depth: PositiveInt = 4
    num_heads: PositiveInt = 8
    mlp_ratio: PositiveFloat = 4.0

    @model_validator(mode="after")
    def _heads_divide_width(self) -> "DecoderConfig":
        _check_heads_divide_width(self.embed_dim, self.num_heads)
        return self


class ModelConfig(StrictSection):
    image_size: PositiveInt = 224
    encoder: EncoderConfig = EncoderConfig()
    projector: ProjectorConfig = ProjectorConfig()
    decoder: DecoderConfig = DecoderConfig()

    @model_validator(mode="after")
    def _consistent_shapes(self) -> "ModelConfig":
        if self.image_size % self.encoder.patch_size:
            raise ValueError(
                f"model.image_size ({self.image_size}) must be a multiple of "
                f"model.encoder.patch_size ({self.encoder.patch_size})"
            )
        # The decoder exists to be thrown away; a decoder as large as the encoder would take over
        # the reconstruction work that the encoder is supposed to learn.
        if self.decoder.embed_dim > self.encoder.embed_dim:
            raise ValueError(
                f"model.decoder.embed_dim ({self.decoder.embed_dim}) must not exceed "
                f"model.encoder.embed_dim ({self.encoder.embed_dim}): the decoder is the "
                "lightweight part"
            )
        if self.decoder.depth > self.encoder.depth:
            raise ValueError(
                f"model.decoder.depth ({self.decoder.depth}) must not exceed "
                f"model.encoder.depth ({self.encoder.depth}): the decoder is the lightweight part"
            )
        return self

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.encoder.patch_size) ** 2


class FixedWeights(StrictSection):
    contrastive: NonNegativeFloat = 1.0
    masked: NonNegativeFloat = 1.0


class LossConfig(StrictSection):
    objective: Literal["hybrid", "contrastive", "masked"] = "hybrid"
    weighting: Literal["learned", "fixed"] = "learned"
    fixed_weights: FixedWeights = FixedWeights()
    temperature: PositiveFloat = 0.2
    mask_ratio: Annotated[float, Field(gt=0, lt=1)] = 0.75
    norm_pix_loss: bool = True


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
    # Ledgers in object storage are uploaded whole this often (local ones are appended to).
    upload_every_seconds: Annotated[float, Field(ge=1)] = 60.0
    # After this many steps the run's total energy and CO2e are projected and printed.
    projection_after_steps: PositiveInt = 20
    # Where RAPL counters are (a container may see the host's under another path).
    powercap_root: Annotated[str, Field(min_length=1)] = "/sys/class/powercap"
    # Per package, for the CPU estimate when RAPL is unreadable (default: CodeCarbon's table).
    cpu_tdp_watts: PositiveFloat | None = None

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


class PretrainConfig(StrictSection):
    """The whole job: one section per concern."""

    run: RunConfig = RunConfig()
    model: ModelConfig = ModelConfig()
    loss: LossConfig = LossConfig()
    optim: OptimConfig = OptimConfig()
    train: TrainConfig = TrainConfig()
    parallel: ParallelConfig = ParallelConfig()
    data: DataConfig = DataConfig()
    telemetry: TelemetryConfig = TelemetryConfig()
    energy: EnergyConfig = EnergyConfig()

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
        if self.loss.objective != "masked" and (
            self.train.global_batch_size // self.optim.accumulation_steps < 2
        ):
            raise ValueError(
                "the contrastive loss needs at least 2 images per micro-batch "
                "(train.global_batch_size / optim.accumulation_steps)"
            )
        return self

    @property
    def learning_rate(self) -> float:
        return self.optim.base_lr * self.train.global_batch_size / 256


def packaged_config_names() -> list[str]:
    """Names accepted by ``--config NAME``."""
    return sorted(p.stem for p in PACKAGED_CONFIG_DIR.glob("*.yaml"))


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
    for depth, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(
                f"--set {key}: {'.'.join(parts[: depth + 1])} is a value, not a section"
            )
        node = child
    try:
        node[parts[-1]] = yaml.safe_load(value_text) if value_text.strip() else ""
    except yaml.YAMLError as err:
        raise ConfigError(f"--set {key}: value {value_text!r} is not valid YAML "
                          f"({yaml_problem(err)})") from None


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
    if message.startswith(f"{key}.") or message.startswith(("train.", "optim.", "energy.", "the ")):
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
