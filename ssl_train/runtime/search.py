"""``ssl-pretrain tune``: a hyperparameter search over real training runs (Ray Tune).

Each trial is a ``train`` of its own, in its own run directory (SEARCH_DIR/trials/TRIAL_ID), with
the trial's values set on the base config as ``--set`` would. Ray Tune runs each trial as a
function trainable that builds the TorchTrainer and calls ``fit()`` (Ray 2.60's way to run Train
V2 under Tune); ``TuneReportCallback`` passes each checkpoint's report to Tune. Optuna (TPE)
proposes the values; ASHA stops the trials whose monitor metric trails at the same step. The
default metric needs no labels: RankMe, the effective rank of the held batch's embeddings.

The search ends with a results table (SEARCH_DIR/search_results.md and .json), the best trial's
config as YAML that ``train --config`` takes (SEARCH_DIR/best_config.yaml), and a line naming it.
A trial that fails is reported in the table; the search goes on with the others.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from pipelines.settings import ConfigError
from pipelines.storage.access import StorageOptions, is_remote, open_filesystem, storage_call
from ssl_train.config import PretrainConfig, dump_config, with_values, yaml_problem

# The monitor metrics a search can rank trials by (all higher-is-better), as the worker reports
# them at each checkpoint.
METRICS = {
    "rankme": "held_effective_rank",  # no labels needed
    "knn": "held_knn_accuracy",  # kNN on scikit-learn's digits (telemetry.knn_monitor: digits)
}
DISTRIBUTIONS = ("uniform", "loguniform", "randint", "choice")


class SearchFailed(RuntimeError):
    """No trial of the search reported its metric."""


@dataclasses.dataclass(frozen=True)
class Dimension:
    """One searched config field: ``kind`` of DISTRIBUTIONS over ``values`` (the bounds, or the
    choices)."""

    key: str
    kind: str
    values: tuple

    def tune_domain(self):
        from ray import tune

        if self.kind == "choice":
            return tune.choice(list(self.values))
        return getattr(tune, self.kind)(*self.values)

    def probes(self) -> tuple:
        """The values to check against the config before any trial: bounds or every choice."""
        if self.kind == "randint":  # Tune's randint excludes its upper bound
            return (self.values[0], self.values[1] - 1)
        return self.values

    def describe(self) -> str:
        if self.kind == "choice":
            return f"{self.key}: one of {', '.join(map(str, self.values))}"
        return f"{self.key}: {self.kind} [{self.values[0]:g}, {self.values[1]:g}]"


def parse_space(raw: Any, source: str = "space") -> list[Dimension]:
    """A space mapping (``dotted.key: {uniform|loguniform|randint: [low, high]}`` or
    ``{choice: [a, b, ...]}``) as dimensions; every problem named by its key."""
    if not isinstance(raw, dict) or not raw:
        raise ConfigError(f"{source} must be a YAML mapping of config keys to distributions, "
                          "e.g. optim.base_lr: {loguniform: [1.0e-4, 1.0e-2]}")
    dimensions = []
    for key, spec in raw.items():
        if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in DISTRIBUTIONS:
            raise ConfigError(f"{source}: {key} must be one of {{{': ..., '.join(DISTRIBUTIONS)}"
                              f": ...}} (got {spec!r})")
        kind, values = next(iter(spec.items()))
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{source}: {key}: {kind} takes a list (got {values!r})")
        if kind != "choice":
            if len(values) != 2 or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                           for v in values) or not values[0] < values[1]:
                raise ConfigError(f"{source}: {key}: {kind} takes [low, high] with low < high "
                                  f"(got {values!r})")
            if kind == "loguniform" and values[0] <= 0:
                raise ConfigError(f"{source}: {key}: loguniform needs low > 0 (got {values[0]})")
            if kind == "randint" and not all(isinstance(v, int) for v in values):
                raise ConfigError(f"{source}: {key}: randint takes integers (got {values!r})")
        dimensions.append(Dimension(str(key), kind, tuple(values)))
    return dimensions


def load_space(path: str) -> list[Dimension]:
    """The space of a YAML file."""
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"space file {path} does not exist")
    try:
        raw = yaml.safe_load(file.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"space {path} is not valid YAML: {yaml_problem(err)}") from None
    return parse_space(raw, source=f"space {file.name}")


def default_space(config: PretrainConfig) -> tuple[list[Dimension], list[str]]:
    """The space searched without ``--space``, from the config's objectives, and what it leaves
    out (said on the console): each objective's temperature, MAE's mask ratio, the learning rate
    (a factor of 5 either side of the config's), and the objectives' weights when the weighting
    is fixed."""
    dimensions, notes = [], []
    for objective in config.objectives:
        if "temperature" in type(objective).model_fields:
            dimensions.append(Dimension(f"objectives.{objective.name}.temperature", "loguniform",
                                        (0.05, 0.5)))
        if objective.name == "mae":
            dimensions.append(Dimension("objectives.mae.mask_ratio", "uniform", (0.5, 0.9)))
    lr = config.optim.base_lr
    dimensions.append(Dimension("optim.base_lr", "loguniform", (lr / 5, lr * 5)))
    if len(config.objectives) > 1:
        if config.weighting == "fixed":  # the first objective's weight fixes the scale
            dimensions.extend(Dimension(f"objectives.{o.name}.weight", "loguniform", (0.1, 10.0))
                              for o in config.objectives[1:])
        else:
            notes.append(f"the objectives' weights are not searched: weighting is "
                         f"{config.weighting} (set weighting=fixed to search them)")
    return dimensions, notes


def check_space(config: PretrainConfig, dimensions: list[Dimension]) -> None:
    """Fail before any trial if a key is not a config field or a value of the space is not valid
    for it (each bound, each choice)."""
    for dimension in dimensions:
        for value in dimension.probes():
            try:
                with_values(config, {dimension.key: value}, source="trial config")
            except ConfigError as err:
                raise ConfigError(f"space {dimension.describe()}: {err}") from None


def trial_config(base: PretrainConfig, values: dict[str, Any], search_uri: str,
                 trial_id: str) -> PretrainConfig:
    """The config of one trial: the base with the trial's values, in SEARCH_DIR/trials/ID."""
    config = with_values(base, values, source=f"trial {trial_id}'s config")
    return with_values(config, {"run.output_dir": f"{search_uri}/trials", "run.name": trial_id})


def trial_name(trial) -> str:
    """trial-NNN, numbered in the order the trials start (Tune's experiment tag starts with it);
    also the trial's run directory."""
    return f"trial-{int(trial.experiment_tag.split('_', 1)[0]):03d}"


def _run_trial(params: dict[str, Any], base: dict[str, Any], search_uri: str,
               storage: dict[str, Any]) -> None:
    """The function trainable: one training run reporting to Tune at each checkpoint."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from ssl_train.runtime.launcher import train

    trial_id = tune.get_context().get_trial_name()
    config = trial_config(PretrainConfig.model_validate(base), params, search_uri, trial_id)
    print(f"trial {trial_id}: {', '.join(f'{k}={_short(v)}' for k, v in params.items())}",
          flush=True)
    train(config, options=StorageOptions(**storage), callbacks=[TuneReportCallback()])


def trial_cpus(config: PretrainConfig) -> float:
    """The CPUs one trial holds: its driver (Tune's one-CPU reservation), the training workers
    and the view workers."""
    return (config.train.num_workers * config.train.cpus_per_worker
            + config.data.view_workers + 1)


def concurrent_trials(config: PretrainConfig, cluster: dict[str, float]) -> int:
    """How many trials fit on the cluster at once (at least one)."""
    fits = int(cluster.get("CPU", 0) // trial_cpus(config))
    if config.train.use_gpu:
        fits = min(fits, int(cluster.get("GPU", 0) // config.train.num_workers))
    return max(1, fits)


def _prepare(config: PretrainConfig, metric: str, address: str | None,
             options: StorageOptions, log: Callable[[str], None]):
    """(ray, the config every trial starts from): what the trials share, settled once."""
    from pipelines.cluster import ensure_ray
    from pipelines.stream.sources import list_shards
    from ssl_train.runtime.launcher import check_run_directory, ensure_sample_shards, local_cpus

    # What every trial shares is settled here, once: the knn monitor when it is the metric, a
    # health check at every checkpoint (the metric Tune sees), the data (ingested once), and
    # absolute paths (Tune runs each trial in a directory of its own).
    base = config
    if metric == "knn":
        base = with_values(base, {"telemetry.knn_monitor": "digits"})
    health_every = math.gcd(base.telemetry.health_every, base.train.checkpoint_every)
    if health_every != base.telemetry.health_every:
        log(f"trials check the held batch every {health_every} steps (telemetry.health_every), "
            f"so that each checkpoint reports the metric")
        base = with_values(base, {"telemetry.health_every": health_every})
    base = with_values(base, {"run.output_dir": config.run.output_root()})
    if base.data.source.url:
        list_shards(base.data.source, options)  # the data must be readable before any trial
    check_run_directory(config.run.uri(), options)
    # A local cluster has room for one trial and its driver.
    ray = ensure_ray(address, num_cpus=local_cpus(base) + 1,
                     metrics_port=base.telemetry.metrics_port)
    cpus = ray.cluster_resources().get("CPU", 0)
    if cpus < trial_cpus(base):
        raise ConfigError(
            f"a trial needs {trial_cpus(base):g} CPUs (its driver, {base.train.num_workers} "
            f"training workers at {base.train.cpus_per_worker:g}, {base.data.view_workers} view "
            f"workers) and this Ray cluster has {cpus:g}: lower "
            "train.num_workers or data.view_workers, or give the cluster more CPUs")
    if not base.data.source.url:
        base = with_values(base, {"data.source.url": ensure_sample_shards(base, options, log)})
    return ray, base


def search(config: PretrainConfig, dimensions: list[Dimension], trials: int,
           metric: str = "rankme", address: str | None = None,
           options: StorageOptions | None = None, log: Callable[[str], None] = print,
           first_points: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """Run the search; returns its summary (also written to SEARCH_DIR/search_results.json).

    ``config.run`` names the search directory (OUTPUT_DIR/NAME). ``first_points``: values the
    first trials take, before Optuna proposes any.
    """
    from ssl_train.runtime.launcher import _storage_filesystem

    if metric not in METRICS:
        raise ConfigError(f"unknown metric {metric!r}: one of {', '.join(METRICS)}")
    if trials < 1:
        raise ConfigError("a search needs at least one trial")
    options = (options or StorageOptions()).with_environment_endpoint()
    check_space(config, dimensions)
    ray, base = _prepare(config, metric, address, options, log)

    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.optuna import OptunaSearch

    target = METRICS[metric]
    search_uri = config.run.uri()
    steps = base.train.steps
    grace = min(steps, max(base.train.checkpoint_every, steps // 4))
    parallel = min(trials, concurrent_trials(base, ray.cluster_resources()))
    log(f"search {config.run.name}: {trials} trials of {steps} steps, {parallel} at a time, "
        f"ranked by {target} (higher is better); ASHA stops trials that trail from step "
        f"{grace}; search directory {search_uri}")
    for dimension in dimensions:
        log(f"  {dimension.describe()}")
    storage_path, storage_fs = _storage_filesystem(search_uri, options)
    trainable = tune.with_parameters(_run_trial, base=base.model_dump(mode="json"),
                                     search_uri=search_uri, storage=dataclasses.asdict(options))
    tuner = tune.Tuner(
        trainable,
        param_space={d.key: d.tune_domain() for d in dimensions},
        tune_config=tune.TuneConfig(
            metric=target, mode="max", num_samples=trials, max_concurrent_trials=parallel,
            search_alg=OptunaSearch(points_to_evaluate=first_points, seed=base.train.seed),
            scheduler=ASHAScheduler(time_attr="step", max_t=steps, grace_period=grace,
                                    reduction_factor=2),
            trial_dirname_creator=trial_name, trial_name_creator=trial_name,
        ),
        run_config=tune.RunConfig(name="tune", storage_path=storage_path,
                                  storage_filesystem=storage_fs, verbose=0),
    )
    grid = tuner.fit()
    rows = [_row(result, dimensions, target, steps, search_uri) for result in grid]
    rows.sort(key=lambda row: int(row["trial"].rsplit("-", 1)[1]))  # trial-NNN, started order
    summary = _summary(rows, target, steps)
    best = summary["best"]
    if best is not None:
        best_row = next(row for row in rows if row["trial"] == best)
        # The config as given (what the search set for its trials undone), the best values on it.
        best_config = with_values(base, {"run.output_dir": config.run.output_dir,
                                         "run.name": f"{config.run.name}-best",
                                         "data.source.url": config.data.source.url,
                                         "telemetry": config.telemetry.model_dump(mode="json"),
                                         **best_row["params"]})
        _write(f"{search_uri}/best_config.yaml", dump_config(best_config), options)
    table = results_table(rows, dimensions, target)
    _write(f"{search_uri}/search_results.md", table + "\n", options)
    _write(f"{search_uri}/search_results.json", json.dumps(summary, indent=2) + "\n", options)
    log(table)
    if best is None:
        raise SearchFailed(f"no trial of search {config.run.name} reported {target}: see the "
                           f"table in {search_uri}/search_results.md")
    log(f"best trial: {best} ({target} {best_row['metric']:.4g} at step {best_row['steps']}; "
        f"{', '.join(f'{k}={_short(v)}' for k, v in best_row['params'].items())}); its config: "
        f"{search_uri}/best_config.yaml (train --config takes it); its run directory: "
        f"{best_row['run_dir']}")
    return summary


def _row(result, dimensions: list[Dimension], target: str, steps: int,
         search_uri: str) -> dict[str, Any]:
    """One trial of Tune's result grid as a row of the table."""
    trial = Path(result.path).name
    metrics = result.metrics or {}
    reached = metrics.get("step")
    if result.error is not None:
        status = f"failed: {_reason(result.error)}"
    elif reached is not None and reached < steps:
        status = "stopped early (ASHA)"
    else:
        status = "completed"
    value = metrics.get(target)
    return {"trial": trial, "params": {d.key: (result.config or {}).get(d.key)
                                       for d in dimensions},
            "metric": value if isinstance(value, (int, float)) and math.isfinite(value) else None,
            "steps": reached, "status": status, "run_dir": f"{search_uri}/trials/{trial}"}


def _reason(error: BaseException) -> str:
    """A failed trial's cause on one line (Tune wraps it in Ray's task errors)."""
    while getattr(error, "cause", None) is not None and error.cause is not error:
        error = error.cause
    text = str(error).strip().splitlines()
    return text[-1] if text else type(error).__name__


def _summary(rows: list[dict[str, Any]], target: str, steps: int) -> dict[str, Any]:
    """The search's outcome: the best trial is the one with the highest metric among those that
    trained every step (among all that reported, if none did)."""
    scored = [row for row in rows if row["metric"] is not None]
    finished = [row for row in scored if row["steps"] == steps] or scored
    best = max(finished, key=lambda row: row["metric"])["trial"] if finished else None
    return {"metric": target, "mode": "max", "steps": steps, "best": best, "trials": rows}


def results_table(rows: list[dict[str, Any]], dimensions: list[Dimension], target: str) -> str:
    """The trials as a Markdown table: parameters, metric, steps, status."""
    header = ["trial", *(d.key for d in dimensions), target, "steps", "status"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [row["trial"], *(_short(row["params"].get(d.key)) for d in dimensions),
                 "-" if row["metric"] is None else f"{row['metric']:.4g}",
                 "-" if row["steps"] is None else str(row["steps"]), row["status"]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _write(uri: str, text: str, options: StorageOptions) -> None:
    fs, path = open_filesystem(uri, options)
    if not is_remote(uri):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    storage_call(uri, options, fs.pipe_file, path, text.encode())
