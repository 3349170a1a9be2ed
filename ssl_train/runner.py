"""Run a pretraining loop in this process: model, optimiser, steps, progress and metrics.jsonl.

The loop the distributed launcher runs inside each worker is the same; this module owns the
run directory layout for metrics and the progress line on the terminal. It does not read storage
or start Ray.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import numpy as np
import torch

from ssl_train.config import PretrainConfig, dump_config
from ssl_train.masking import mask_order
from ssl_train.model import HybridSSL
from ssl_train.optim import build_optimizer, build_scheduler
from ssl_train.step import normalize_views, train_step


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


def run_in_process(
    config: PretrainConfig,
    batches: Iterable[Mapping[str, np.ndarray]],
    run_dir: Path,
    log: Callable[[str], None] = print,
) -> HybridSSL:
    """Train ``config.train.steps`` steps on ``batches``; writes run_dir/metrics.jsonl."""
    torch.manual_seed(config.train.seed)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(dump_config(config))
    model = HybridSSL(config.model, config.loss)
    model.train()
    optimizer = build_optimizer(model, config)
    scheduler = build_scheduler(optimizer, config)
    noise = torch.Generator().manual_seed(config.train.seed)
    num_patches = config.model.num_patches
    total = config.train.steps
    started = time.perf_counter()
    with open(run_dir / "metrics.jsonl", "w") as metrics_file:
        for step, batch in enumerate(batches, start=1):
            step_started = time.perf_counter()
            views = normalize_views(batch)
            order = mask_order(torch.rand(len(views["view_a"]), num_patches, generator=noise))
            record = train_step(model, optimizer, scheduler, views, config, order)
            step_seconds = time.perf_counter() - step_started
            images = next(iter(views.values())).shape[0]
            record = {"step": step, "step_seconds": step_seconds,
                      "images_per_second": images / step_seconds, **record}
            metrics_file.write(json.dumps(record) + "\n")
            metrics_file.flush()
            if step % config.train.log_every == 0 or step == total:
                elapsed = time.perf_counter() - started
                log(progress_line(step, total, record, elapsed / step))
            if step >= total:
                break
    return model
