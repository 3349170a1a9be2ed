"""Training step time of a config on this machine: forward + backward + AdamW step, data in memory.

    .venv/bin/python benchmarks/step_time.py --config tiny-cpu
    .venv/bin/python benchmarks/step_time.py --config vit-s16 --batch-size 8

Views are random resized crops of scikit-image's photographs, made before timing starts, so the
figure is the model's alone. Prints the median and mean over the timed steps.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

from pipelines.sample_images import random_view_batches, sample_photographs
from ssl_train.config import load_config
from ssl_train.models.ssl_model import SSLModel
from ssl_train.train.optim import build_optimizer, build_scheduler
from ssl_train.train.step import normalize_views, train_step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="tiny-cpu")
    parser.add_argument("--batch-size", type=int, help="override train.global_batch_size")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()

    overrides = list(args.overrides)
    if args.batch_size:
        overrides.append(f"train.global_batch_size={args.batch_size}")
    config = load_config(args.config, overrides)
    torch.manual_seed(0)
    model = SSLModel(config).train()
    optimizer = build_optimizer(model, config)
    scheduler = build_scheduler(optimizer, config)
    batch_size, size = config.train.global_batch_size, config.model.image_size
    photos = sample_photographs(min_side=64)
    batches = random_view_batches(photos, size, batch_size, seed=0)
    views = [normalize_views(next(batches)) for _ in range(args.warmup + args.steps)]

    times = []
    for i, batch in enumerate(views):
        started = time.perf_counter()
        train_step(model, optimizer, scheduler, batch, config)
        if i >= args.warmup:
            times.append(time.perf_counter() - started)
    median = statistics.median(times)
    print(json.dumps({
        "config": args.config,
        "objectives": config.objective_names,
        "image_size": size,
        "batch_size": batch_size,
        "parameters_millions": round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
        "median_step_seconds": round(median, 4),
        "mean_step_seconds": round(statistics.mean(times), 4),
        "images_per_second": round(batch_size / median, 1),
        "timed_steps": len(times),
        "torch_threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "torch": torch.__version__,
    }))


if __name__ == "__main__":
    main()
