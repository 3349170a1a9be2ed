"""The training loop that runs in each Ray Train worker.

Builds the model, shards it (``ssl_train.distributed.fsdp``), resumes from the run's latest complete
checkpoint, consumes this worker's split of the data stage, and every ``checkpoint_every`` steps
writes a checkpoint (model, optimizer, scheduler, step, data cursor; loss weights are model
parameters) through ``ray.train.report``. Rank 0 logs every step to ``metrics.jsonl`` and
writes the progress lines the driver prints (``ssl_train.runtime.console``). Randomness is a
function of (seed, step, rank), so a resumed run continues the same random stream without saving
generator states.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from pipelines.storage.access import StorageOptions
from pipelines.stream.cursor import CursorTracker, DataCursor, merge_checkpoint_parts
from pipelines.stream.ledger import LEDGER_NAMESPACE
from ssl_train.config import PretrainConfig
from ssl_train.distributed.collectives import (
    average_over_ranks,
    broadcast_object,
    gather_objects,
    gather_rows_to_first,
    world_size,
)
from ssl_train.energy.carbon import JOULES_PER_KWH
from ssl_train.energy.node import EnergySettings, register_process, run_total_joules
from ssl_train.monitors.health import (
    alignment,
    effective_rank,
    embedding_std,
    healthy_embedding_std,
    knn_accuracy,
    uniformity,
)
from ssl_train.monitors.metrics_log import MetricsLog
from ssl_train.monitors.pictures import training_pictures
from ssl_train.monitors.telemetry import TrainingTelemetry
from ssl_train.monitors.tensorboard import TensorBoardLog
from ssl_train.train.checkpoint import (
    checkpoint_dir_name,
    latest_complete_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from ssl_train.train.loop import Trainer, progress_line
from ssl_train.train.step import normalize_views


def _quiet_report_dumps() -> None:
    """Ray Train logs each ``ray.train.report`` of every rank with its whole metrics dict, at
    INFO, on the driver's console, and "Checkpoint successfully created" from every rank at
    every checkpoint (512 lines a checkpoint at 512 ranks); the progress line already says what
    matters, and metrics.jsonl keeps everything, each checkpoint's event included. Their
    warnings and errors still show."""
    import logging

    from ray.train.v2._internal.execution import context, storage

    logging.getLogger(context.__file__).setLevel(logging.WARNING)  # Ray names it by its file
    logging.getLogger(storage.__name__).setLevel(logging.WARNING)


HEALTH_ROWS = 1024  # the held rows of all ranks together the signals are computed on, at most


@torch.no_grad()
def representation_health(model, held: dict[str, torch.Tensor]) -> dict[str, float]:
    """Collapse signals on the held batch (collective: every rank calls; all get the values).

    Each rank embeds its share of at most ``HEALTH_ROWS`` rows in all (the forward is sharded,
    so every rank takes part); the embeddings go to rank 0 only, which computes the signals
    (``uniformity``'s pairwise distances are quadratic in the rows) and broadcasts them. The
    embeddings are of the first declared view; alignment, between the first two views (two
    augmentations of the same images), when the objectives declare two.
    """
    names = [view.name for view in model.views() if view.name in held][:2]
    share = max(1, HEALTH_ROWS // world_size())
    model.eval()
    try:
        embedded = [gather_rows_to_first(model.embed(held[name][:share]).float())
                    for name in names]
    finally:
        model.train()
    health = None
    if embedded[0] is not None:  # rank 0
        z_a = embedded[0]
        health = {"embedding_std": embedding_std(z_a),
                  "embedding_std_healthy": healthy_embedding_std(z_a.shape[1]),
                  "effective_rank": effective_rank(z_a), "uniformity": uniformity(z_a)}
        if len(embedded) == 2:
            health["alignment"] = alignment(z_a, embedded[1])
    return broadcast_object(health)


class DigitsMonitor:
    """kNN accuracy of frozen encoder features on scikit-learn's digits (even rows: reference)."""

    def __init__(self, image_size: int, device: torch.device, rank: int, world: int):
        from pipelines.sample_images import digits_images

        images, labels = digits_images(image_size)
        per_rank = -(-len(images) // world)  # ceil: the last rank may get fewer
        self.count = len(images)
        self.mine = normalize_views({"view_a": images[rank * per_rank:(rank + 1) * per_rank]},
                                    device)["view_a"]
        self.per_rank = per_rank
        self.labels = torch.from_numpy(labels)

    @torch.no_grad()
    def accuracy(self, model) -> float:
        """Collective: every rank encodes its slice; rank 0 scores, all get the accuracy."""
        model.eval()
        try:
            features = model.encode(self.mine) if len(self.mine) else None
        finally:
            model.train()
        dim = model.model_config.encoder.embed_dim
        padded = torch.zeros(self.per_rank, dim)
        if features is not None:
            padded[:len(features)] = features.float().cpu()
        everything = gather_rows_to_first(padded)
        if everything is None:
            return broadcast_object(None)
        everything = everything[:self.count]
        train, test = slice(0, None, 2), slice(1, None, 2)
        return broadcast_object(knn_accuracy(everything[train], self.labels[train],
                                             everything[test], self.labels[test]))


class EnergyProjection:
    """The whole configured run's energy and CO2e, extrapolated from the second half of its first
    N steps here (the first steps include warm-up and would overstate the rate)."""

    def __init__(self, energy: EnergySettings, config: PretrainConfig, first_step: int):
        self.energy = energy
        self.config = config
        self.first_step = first_step
        self.window = config.energy.projection_after_steps
        self.baseline: tuple[int, float] | None = None
        self.observe(first_step)

    def observe(self, step: int) -> None:
        """Take the baseline reading when the measured window starts."""
        if step - self.first_step == self.window // 2:
            self.baseline = (step, run_total_joules(self.energy.run))

    def due(self, step: int) -> bool:
        return step - self.first_step == self.window and self.baseline is not None

    def estimate(self, step: int) -> dict[str, Any]:
        start, joules = self.baseline
        per_step = (run_total_joules(self.energy.run) - joules) / (step - start)
        projected = per_step * self.config.train.steps
        return {"step": step, "event": "energy_projection", "joules_per_step": per_step,
                "measured_from_step": start + 1, "steps": self.config.train.steps,
                "projected_joules": projected,
                "projected_co2e_grams": self.energy.co2e(projected)}

    def describe(self, estimate: dict[str, Any]) -> str:
        return (f"energy: {estimate['joules_per_step']:.1f} J per step over steps "
                f"{estimate['measured_from_step']}-{estimate['step']}; projected for "
                f"{estimate['steps']} steps: "
                f"{estimate['projected_joules'] / JOULES_PER_KWH * 1000:.2f} Wh, "
                f"{estimate['projected_co2e_grams']:.2f} gCO2e at "
                f"{self.energy.grid['g_per_kwh']:g} g/kWh and PUE {self.energy.pue['value']:g}")


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """Ray Train entry point: ``loop_config`` holds the config, storage options, run URI."""
    import ray
    import ray.train
    import ray.train.torch

    _quiet_report_dumps()
    say = loop_config["console"]  # rank 0's lines, printed by the driver (runtime.console)
    config = PretrainConfig.model_validate(loop_config["config"])
    options = StorageOptions(**loop_config["storage"])
    run_uri = loop_config["run_uri"]
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    is_chief = rank == 0

    trainer = Trainer(config, device, rank, world)
    model, optimizer, scheduler = trainer.model, trainer.optimizer, trainer.scheduler
    precision = trainer.precision

    step, cursor, samples_replayed = 0, DataCursor(seed=config.data.seed), 0
    restore: dict[str, Any] = {}
    resume_uri = broadcast_object(
        latest_complete_checkpoint(run_uri, options) if is_chief else None)
    if resume_uri:
        restored = load_checkpoint(resume_uri, model, optimizer, options)
        state = restored.state
        scheduler.load_state_dict(state["scheduler"])
        step = int(state["step"])
        cursor = DataCursor.from_dict(state["cursor"])
        replaying = int(state.get("samples_in_flight", 0))
        samples_replayed = int(state.get("samples_replayed", 0)) + replaying
        read = gather_objects(restored.bytes_read)
        restore = {"checkpoint_bytes": restored.bytes_total, "bytes_read_by_rank": read}
        if is_chief:
            say(f"resumed from {resume_uri} at step {step} (data cursor: epoch "
                f"{cursor.epoch}, {cursor.shards_consumed} shards consumed in order and "
                f"{len(cursor.done)} after them; "
                f"{replaying} samples of shards in flight are read again; checkpoint of "
                f"{restored.bytes_total / 1e6:.1f} MB: {max(read) / 1e6:.1f} MB read by the "
                f"busiest rank, {sum(read) / 1e6:.1f} MB by all {world}, verified)")
    log = MetricsLog(run_uri, options, resume_step=step) if is_chief else None
    board = TensorBoardLog(run_uri, options, resume_step=step) if is_chief else None
    telemetry = TrainingTelemetry(config.run.name, rank, ray.get_runtime_context().get_node_id())
    if resume_uri:
        telemetry.record_restart()
    nodes = gather_objects(ray.get_runtime_context().get_node_id())
    if log is not None:
        log.append({"step": step, "event": "resumed" if resume_uri else "started",
                    "checkpoint": resume_uri, "world_size": world, "nodes": nodes,
                    "samples_replayed": samples_replayed, "device": device.type,
                    "precision": precision.as_record(), **restore})

    energy = EnergySettings(**loop_config["energy"]) if loop_config.get("energy") else None
    if energy is not None:
        gpus = ([str(torch.cuda.get_device_properties(device).uuid)] if device.type == "cuda"
                else [])
        register_process(energy, "train", gpus)
    projection = EnergyProjection(energy, config, step) if energy and is_chief else None

    tracker = CursorTracker(cursor)
    data_cursor = [cursor]  # the cursor of the last checkpoint
    per_worker = config.train.global_batch_size // world
    shard = ray.train.get_dataset_shard("train")
    batches = iter(shard.iter_torch_batches(batch_size=per_worker, drop_last=True, device="cpu"))
    started = time.perf_counter()
    first_step = step
    exhausted = False
    said_precision = False
    record: dict[str, float] = {}
    health_seen: dict[str, float] = {}  # the last health signals: in every report (a search's)

    held: dict[str, torch.Tensor] | None = None
    digits = (DigitsMonitor(config.model.image_size, device, rank, world)
              if config.telemetry.knn_monitor == "digits" else None)

    def checkpoint() -> None:
        save_started = time.perf_counter()
        # Shards are consumed when what the ranks trained on and what the view stage dropped
        # add up to what was read (the stage's ledger); the samples of the others are read
        # again on resume: counted.
        parts = gather_objects(tracker.checkpoint_part(exhausted))
        merged = None
        if is_chief:
            ledger = ray.get_actor(loop_config["data_ledger"], namespace=LEDGER_NAMESPACE)
            merged = merge_checkpoint_parts(data_cursor[0], loop_config["num_shards"],
                                            config.data.epochs, parts,
                                            ray.get(ledger.finished_shards.remote()))
            ledger.forget.remote(merged[0].to_dict())  # not waited on
        global_cursor, in_flight, consumed = broadcast_object(merged)
        tracker.close(global_cursor)
        data_cursor[0] = global_cursor
        with tempfile.TemporaryDirectory(prefix="ssl-ckpt-") as tmp:
            save_checkpoint(Path(tmp), model, optimizer, {
                "step": step, "scheduler": scheduler.state_dict(),
                "cursor": global_cursor.to_dict(), "samples_in_flight": in_flight,
                "samples_replayed": samples_replayed, "config": config.model_dump(mode="json"),
            })
            if log is not None:
                log.append({"step": step, "event": "checkpoint",
                            "checkpoint": checkpoint_dir_name(step),
                            "cursor": global_cursor.to_dict(), "samples_by_shard": consumed,
                            "samples_in_flight": in_flight})
                log.sync()
                board.sync()
            state = json.loads((Path(tmp) / "train_state.json").read_text()) if is_chief else {}
            size = sum(f["bytes"] for f in state.get("files", {}).values())
            telemetry.record_checkpoint(time.perf_counter() - save_started, size)
            ray.train.report({"step": step, **record, **health_seen},
                             checkpoint=ray.train.Checkpoint.from_directory(tmp),
                             checkpoint_dir_name=checkpoint_dir_name(step))

    stop_step = loop_config.get("stop_step", config.train.steps)
    while step < stop_step:
        wait_started = time.perf_counter()
        batch = next(batches, None)
        if batch is None:
            exhausted = True
            break
        data_wait = time.perf_counter() - wait_started
        step_started = time.perf_counter()
        tracker.observe(batch["epoch"].numpy(), batch["position"].numpy())
        if held is None:  # the monitor's held batch: this worker's first batch, kept
            held = normalize_views({key: value[:64] for key, value in batch.items()}, device,
                                   config.data.augment.photometric.solarize_threshold)
        record = trainer.step(batch, step)
        step += 1
        step_seconds = time.perf_counter() - step_started + data_wait
        record = average_over_ranks({**record, "step_seconds": step_seconds,
                                     "data_wait_seconds": data_wait})
        record["images_per_second"] = config.train.global_batch_size / record["step_seconds"]
        if step % config.telemetry.health_every == 0:
            health = representation_health(model, held)
            if digits is not None:
                health["knn_accuracy"] = digits.accuracy(model)
            record.update({f"held_{key}": value for key, value in health.items()})
            health_seen.update({f"held_{key}": value for key, value in health.items()})
            telemetry.record_health(health)
        if step % config.telemetry.images_every == 0 or step == stop_step:
            pictures = training_pictures(model, held, seed=config.train.seed)  # every rank
            if board is not None:
                board.images(step, pictures)
        telemetry.record_step(step, record)
        if log is not None:
            log.append({"step": step, **record})
            board.scalars(step, record)
            if projection is not None:
                projection.observe(step)
            if projection is not None and projection.due(step):
                estimate = projection.estimate(step)
                log.append(estimate)
                telemetry.record_projection(estimate)
                say(projection.describe(estimate))
            if step % config.train.log_every == 0 or step == stop_step:
                if energy is not None:
                    board.scalars(step, {"energy_joules_so_far": run_total_joules(energy.run)})
                seconds_per_step = (time.perf_counter() - started) / (step - first_step)
                line = progress_line(step, config.train.steps, record, seconds_per_step)
                if not said_precision:  # the first line says what the numbers were computed in
                    line += f" | {world} x {device.type}: {precision.describe()}"
                    said_precision = True
                say(line)
        if step % config.train.checkpoint_every == 0 and step < stop_step:
            checkpoint()
    if is_chief and step < stop_step:
        say(f"the data ran out at step {step} of {config.train.steps}: raise data.epochs")
    checkpoint()
    if log is not None:
        log.close()
        board.close()
