"""The training loop's one step, shared by the Ray worker, the tests, the benchmarks and the
ablation: build the model as configured, then per step normalise the views, draw the step's
randomness from (seed, step, rank) and run ``train_step``.

``Trainer`` holds the model, optimiser and scheduler; the Ray worker wraps it with the data
stage, checkpoints and logs (``ssl_train.runtime.worker``), ``train_in_process`` with an iterable of
batches and a local run directory. Because every random draw is a function of (seed, step,
rank), both give the same losses on the same batches, and a resumed run continues the same
random stream.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import numpy as np
import torch

from ssl_train.config import PretrainConfig, dump_config
from ssl_train.distributed.collectives import is_distributed
from ssl_train.distributed.fsdp import apply_parallelism, resolve_precision
from ssl_train.models.ssl_model import SSLModel
from ssl_train.objectives import StepContext, step_seed
from ssl_train.train.optim import build_optimizer, build_scheduler
from ssl_train.train.step import normalize_views, train_step


class Trainer:
    """The model (sharded over the default process group, if any), its optimiser and schedule."""

    def __init__(self, config: PretrainConfig, device: torch.device | str = "cpu",
                 rank: int = 0, world: int = 1):
        self.config = config
        self.device = torch.device(device)
        self.rank, self.world = rank, world
        parallel = config.parallel
        torch.manual_seed(config.train.seed)  # identical initial weights on every rank
        self.model = apply_parallelism(SSLModel(config), self.device, parallel.mixed_precision,
                                       parallel.activation_checkpointing,
                                       parallel.reshard_after_forward, parallel.compile)
        self.precision = resolve_precision(self.device, parallel.mixed_precision,
                                           sharded=is_distributed())
        self.model.train()
        self.optimizer = build_optimizer(self.model, config)
        self.scheduler = build_scheduler(self.optimizer, config)

    def step(self, batch: Mapping[str, np.ndarray | torch.Tensor], step: int) -> dict[str, float]:
        """Train on this rank's rows of the global batch of ``step`` (0-based); returns this
        rank's figures (``average_over_ranks`` makes them global)."""
        config = self.config
        views = normalize_views(batch, self.device,
                                config.data.augment.photometric.solarize_threshold)
        torch.manual_seed(step_seed(config.train.seed, step, 2 + self.rank))  # drop path
        self.model.start_step(step)  # the objectives' schedules (teacher temperature)
        inputs = self.model.step_inputs(StepContext(config.train.seed, step, self.rank,
                                                    self.world, config.train.global_batch_size))
        return train_step(self.model, self.optimizer, self.scheduler, views, config, inputs)


def format_duration(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours:d}:{minutes:02d}:{secs:02d}"


def progress_line(step: int, total: int, record: Mapping[str, float], seconds_per_step: float) -> str:
    """One human-readable line: step, throughput, losses, weights and time left."""
    parts = [f"step {step}/{total}", f"{record['images_per_second']:.1f} img/s"]
    parts += [f"{key} {value:.4f}" for key, value in record.items() if key.startswith("loss")]
    parts += [f"{key} {value:.3f}" for key, value in record.items() if key.startswith("weight_")]
    parts.append(f"ETA {format_duration(seconds_per_step * (total - step))}")
    return " | ".join(parts)


def train_in_process(
    config: PretrainConfig,
    batches: Iterable[Mapping[str, np.ndarray]],
    run_dir: Path,
    log: Callable[[str], None] = print,
) -> SSLModel:
    """Train ``config.train.steps`` steps on ``batches`` (global batches) in this process, on
    the CPU, without Ray; writes run_dir/config.yaml and run_dir/metrics.jsonl."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(dump_config(config))
    trainer = Trainer(config)
    total = config.train.steps
    started = time.perf_counter()
    with open(run_dir / "metrics.jsonl", "w") as metrics_file:
        for step, batch in enumerate(batches):
            step_started = time.perf_counter()
            record = trainer.step(batch, step)
            step_seconds = time.perf_counter() - step_started
            images = next(v for k, v in batch.items() if k.startswith("view_")).shape[0]
            record = {"step": step + 1, "step_seconds": step_seconds,
                      "images_per_second": images / step_seconds, **record}
            metrics_file.write(json.dumps(record) + "\n")
            metrics_file.flush()
            if (step + 1) % config.train.log_every == 0 or step + 1 == total:
                elapsed = time.perf_counter() - started
                log(progress_line(step + 1, total, record, elapsed / (step + 1)))
            if step + 1 >= total:
                break
    return trainer.model
