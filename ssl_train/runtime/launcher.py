"""``ssl-pretrain train``: the data stage and a Ray Train TorchTrainer, from one config.

Checks everything a user can get wrong (config, data location, storage) before any cluster work,
starts or joins a Ray cluster, and runs ``ssl_train.runtime.worker.train_loop_per_worker`` on
``train.num_workers`` workers (gloo on CPUs, NCCL on GPUs). The data stage is handed to Ray Train
as a factory: each time the worker group (re)starts, it is rebuilt from the data cursor of the
run's latest complete checkpoint, so consumed shards are not read again after a restart either.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import math
import os
import uuid
from collections.abc import Callable
from contextlib import contextmanager
from typing import Any

from pipelines.cluster import ensure_ray
from pipelines.storage.access import (
    StorageError,
    StorageOptions,
    StorageUnavailable,
    causes,
    explain,
    is_remote,
    open_filesystem,
    storage_call,
    unavailable_reason,
)
from pipelines.stream.cursor import DataCursor
from pipelines.stream.sources import list_shards
from ssl_train.config import PretrainConfig
from ssl_train.runtime.console import DriverConsole
from ssl_train.runtime.lease import RunLease
from ssl_train.train.checkpoint import CheckpointError, latest_complete_checkpoint, read_train_state

SAMPLE_SHARDS = "sample-shards"


def local_cpus(config: PretrainConfig) -> int:
    """Logical CPUs for a local Ray instance: enough for the workers and the data stage."""
    wanted = math.ceil(config.train.num_workers * config.train.cpus_per_worker)
    return max(os.cpu_count() or 1, wanted + config.data.view_workers + 1)


def ensure_sample_shards(config: PretrainConfig, options: StorageOptions,
                         log: Callable[[str], None]) -> str:
    """Shards of scikit-image's photographs under OUTPUT_DIR, ingested on first use."""
    from pipelines.ingest import IngestConfig, ingest
    from pipelines.sample_images import sample_photograph_dir

    dest = f"{config.run.output_root()}/{SAMPLE_SHARDS}"
    fs, path = open_filesystem(dest, options)
    if not storage_call(dest, options, fs.exists, f"{path}/manifest.json"):
        log(f"ingesting scikit-image's sample photographs into {dest} (once)")
        quality = config.data.quality.model_dump()
        ingest(str(sample_photograph_dir()), dest,
               IngestConfig(samples_per_shard=4, quality=quality), options, log=log)
    return dest


def epochs_needed(config: PretrainConfig, source_url: str, options: StorageOptions) -> int:
    """Epochs that cover the configured steps, from the manifest's sample count when known."""
    import json

    fs, path = open_filesystem(source_url, options)
    manifest_path = f"{path.rstrip('/')}/manifest.json"
    if config.data.source.format != "webdataset" or not fs.exists(manifest_path):
        return config.data.epochs
    total = json.loads(fs.cat_file(manifest_path))["total_samples"]
    needed = math.ceil(config.train.steps * config.train.global_batch_size / max(1, total)) + 2
    return min(config.data.epochs, needed)


def _storage_filesystem(run_root: str, options: StorageOptions):
    """(storage_path, pyarrow filesystem) for Ray Train's RunConfig."""
    if not is_remote(run_root):
        return os.path.abspath(run_root), None
    import pyarrow.fs

    fs, path = open_filesystem(run_root, options)
    return path, pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fs))


def energy_settings(config: PretrainConfig, run_uri: str, options: StorageOptions):
    """What every node's energy meter needs, or None when metering is off."""
    from ssl_train.energy.node import EnergySettings

    energy = config.energy
    if not energy.enabled:
        return None
    return EnergySettings(
        run=config.run.name, run_uri=run_uri, storage=dataclasses.asdict(options),
        grid=energy.grid(), pue=energy.pue.model_dump(), interval_seconds=energy.interval_seconds,
        record_every_seconds=energy.record_every_seconds,
        upload_every_seconds=energy.upload_every_seconds, powercap_root=energy.powercap_root,
        cpu_tdp_watts=energy.cpu_tdp_watts, images_per_step=config.train.global_batch_size,
    )


def check_run_directory(run_uri: str, options: StorageOptions) -> None:
    """Fail before any cluster work if the run directory cannot be written (no such bucket,
    read-only credentials)."""
    fs, path = open_filesystem(run_uri, options)
    if not is_remote(run_uri):  # not for s3: s3fs's makedirs would create a missing bucket
        storage_call(run_uri, options, fs.makedirs, path, exist_ok=True)
    probe = f"{path.rstrip('/')}/.write-check"
    storage_call(run_uri, options, fs.pipe_file, probe, b"")
    storage_call(run_uri, options, fs.rm_file, probe)


@contextmanager
def _node_meters(energy, run: str, log: Callable[[str], None]):
    """Energy meters on every node for the block, stopped at its end (their last ledger part is
    saved then; a failure to save raises RayTaskError). When the block fails, a failure to save
    is only logged: the block's own failure is the one to report."""
    if energy is None:
        yield
        return
    from ray.exceptions import RayTaskError

    from ssl_train.energy.node import start_node_meters, stop_node_meters

    try:
        meters = start_node_meters(energy)  # noqa: F841 (the handles keep them alive)
        yield
    except BaseException:
        try:
            stop_node_meters(run)
        except RayTaskError as also:
            log(f"the energy ledger's last part was not saved: {also.cause}")
        raise
    stop_node_meters(run)


def storage_failure(err: BaseException, run_uri: str,
                    options: StorageOptions) -> StorageError | None:
    """The storage problem that ended a failed run, as a StorageError for the user, or None."""
    for link in causes(err):
        if isinstance(link, StorageError):
            found = link
            break
        if unavailable_reason(link):
            found = explain(link, run_uri, options)
            break
    else:
        return None
    kept = "" if isinstance(found, (StorageUnavailable, CheckpointError)) else (
        "; checkpoints already written are kept and the same command resumes from the last one")
    return type(found)(f"the run stopped: {found}{kept}")


def train(config: PretrainConfig, address: str | None = None,
          options: StorageOptions | None = None, log: Callable[[str], None] = print,
          slice_steps: int | None = None, callbacks: list | None = None) -> str:
    """Run (or resume) the configured pretraining; returns the run directory.

    ``slice_steps`` stops after that many more steps (a scheduled slice of a long run); the
    schedule still spans ``train.steps``. ``callbacks``: Ray Train callbacks of the run (a
    search's trial passes Tune's).
    """
    options = (options or StorageOptions()).with_environment_endpoint()
    run_uri = config.run.uri()
    resume = latest_complete_checkpoint(run_uri, options)  # storage problems surface here
    done = int(read_train_state(resume, options)["step"]) if resume else 0
    if done >= config.train.steps:
        log(f"run {config.run.name} is complete at step {done} ({resume}); raise "
            "train.steps to train further")
        return run_uri
    stop_step = min(config.train.steps, done + slice_steps) if slice_steps else config.train.steps
    # The data must be there (and readable with these credentials) before any cluster work.
    shards = list_shards(config.data.source, options) if config.data.source.url else None
    check_run_directory(run_uri, options)
    # One live run per run directory: a second one (an overlapping scheduled slice, a
    # colleague's run) would write the same checkpoints.
    with RunLease(run_uri, options, log):
        _train_holding_the_lease(config, address, options, log, run_uri, resume, done,
                                 stop_step, shards, callbacks or [])
    log(f"run directory: {run_uri} (checkpoints, metrics.jsonl, energy ledger and report)")
    return run_uri


def _train_holding_the_lease(config: PretrainConfig, address: str | None,
                             options: StorageOptions, log: Callable[[str], None], run_uri: str,
                             resume: str | None, done: int, stop_step: int,
                             shards: list | None, callbacks: list) -> None:
    """``train`` once its checks passed and it holds the run directory's lease."""
    ensure_ray(address, num_cpus=local_cpus(config), metrics_port=config.telemetry.metrics_port)
    if shards is None:
        url = ensure_sample_shards(config, options, log)
        config = config.model_copy(deep=True)
        config.data.source.url = url
        shards = list_shards(config.data.source, options)
    data = config.data.model_copy(update={"epochs": epochs_needed(
        config, config.data.source.url, options)})
    config = config.model_copy(update={"data": data})
    if resume:
        log(f"resuming run {config.run.name} from {resume}")
    if stop_step < config.train.steps:
        log(f"this slice trains steps {done + 1}-{stop_step} of {config.train.steps}")
    log(f"training {config.run.name}: {config.train.steps} steps, global batch "
        f"{config.train.global_batch_size}, {config.train.num_workers} workers, "
        f"{len(shards)} shards, {data.epochs} epochs at most; run directory {run_uri}")

    import ray.train
    from ray.train.torch import TorchTrainer

    from ssl_train.runtime.worker import train_loop_per_worker

    image_size = config.model.image_size

    energy = energy_settings(config, run_uri, options)
    hook = None
    if energy is not None:
        from ssl_train.energy.node import register_process

        hook = functools.partial(register_process, energy, "data")

    # The data stage's ledger, found by rank 0 at each checkpoint; one per call (a slice of the
    # same run gets its own). Held here until the run ends, so that it outlives the data stage
    # of a worker group that is restarted.
    from pipelines.stream.ledger import open_ledger

    ledger_name = (f"ledger-{hashlib.sha256(run_uri.encode()).hexdigest()[:16]}-"
                   f"{uuid.uuid4().hex[:8]}")
    data_ledger = open_ledger(ledger_name)

    def dataset_factory():
        from pipelines.stream.stage import DataStage

        latest = latest_complete_checkpoint(run_uri, options)
        cursor = (DataCursor.from_dict(read_train_state(latest, options)["cursor"]) if latest
                  else DataCursor(seed=config.data.seed))
        ds = DataStage(config.data, image_size, options, cursor=cursor,
                       run_name=config.run.name, process_hook=hook,
                       views=config.views(), ledger_name=ledger_name).dataset()
        # The training progress line is the run's one line a step: Ray Data's bars and
        # per-operator lines would interleave with it (the data stage has its own metrics).
        ds.context.enable_progress_bars = False
        ds.context.enable_operator_progress_bars = False
        ds.context.print_on_execution_start = False
        return ds

    storage_path, storage_fs = _storage_filesystem(config.run.output_dir, options)
    console = DriverConsole(log)  # rank 0's progress lines, printed here
    loop_config: dict[str, Any] = {
        "config": config.model_dump(mode="json"),
        "storage": dataclasses.asdict(options),
        "energy": dataclasses.asdict(energy) if energy else None,
        "run_uri": run_uri,
        "num_shards": len(shards),
        "data_ledger": ledger_name,
        "stop_step": stop_step,
        "console": console.writer(),
    }
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(
            num_workers=config.train.num_workers, use_gpu=config.train.use_gpu,
            resources_per_worker={"CPU": config.train.cpus_per_worker},
            placement_strategy=config.train.placement_strategy,
        ),
        run_config=ray.train.RunConfig(
            name=config.run.name, storage_path=storage_path, storage_filesystem=storage_fs,
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=config.train.keep_checkpoints),
            failure_config=ray.train.FailureConfig(max_failures=config.train.max_failures),
            callbacks=callbacks,
        ),
        datasets={"train": dataset_factory},
    )
    from ray.exceptions import RayTaskError

    try:
        with _node_meters(energy, config.run.name, log), console:
            trainer.fit()
    except (ray.train.TrainingFailedError, RayTaskError) as err:  # RayTaskError: the ledger
        storage = storage_failure(err, run_uri, options)
        if storage is None:
            raise
        raise storage from err
    finally:
        del data_ledger  # the ledger ends with the run (its last counts may still be arriving)
    if energy is not None:
        from ssl_train.energy.report import write_report

        write_report(run_uri, options, log=log)
