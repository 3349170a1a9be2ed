"""What the framework costs, and what masking saves, on this machine.

    .venv/bin/python benchmarks/train_overhead.py --config tiny-cpu
    .venv/bin/python benchmarks/train_overhead.py --config vit-s16 --batch-size 8

1. Overhead: median step time of the same training loop (model, AdamW, the same views held in
   memory) in a plain process and in one Ray Train worker (TorchTrainer, gloo process group,
   FSDP2 applied by ``ssl_train.distributed.fsdp`` as in a real run). Target: ratio <= 1.10.
2. MAE saving: forward + backward time of the encoder on the visible 25% of the patches (the
   masked branch as built) against the same encoder on every patch.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

import torch

from pipelines.sample_images import random_view_batches, sample_photographs
from ssl_train.config import PretrainConfig, load_config
from ssl_train.models.encoder import encode_visible
from ssl_train.models.ssl_model import SSLModel
from ssl_train.objectives import StepContext
from ssl_train.train.loop import Trainer
from ssl_train.train.step import normalize_views, train_step


def timed_steps(config: PretrainConfig, warmup: int, steps: int, distributed: bool) -> list[float]:
    """Step times of the training loop on in-memory views (inside Ray Train if distributed)."""
    trainer = Trainer(config)  # sharded when inside Ray Train (a process group exists)
    model, optimizer, scheduler = trainer.model, trainer.optimizer, trainer.scheduler
    photos = sample_photographs(min_side=64)
    batches = random_view_batches(photos, config.model.image_size,
                                  config.train.global_batch_size, seed=0)
    views = [normalize_views(next(batches)) for _ in range(warmup + steps)]
    times = []
    for step, batch in enumerate(views):
        started = time.perf_counter()
        train_step(model, optimizer, scheduler, batch, config,
                   model.step_inputs(StepContext(config.train.seed, step, 0, 1,
                                                 config.train.global_batch_size)))
        if step >= warmup:
            times.append(time.perf_counter() - started)
    return times


def _ray_worker(loop_config: dict) -> None:
    import ray.train

    config = PretrainConfig.model_validate(loop_config["config"])
    times = timed_steps(config, loop_config["warmup"], loop_config["steps"], distributed=True)
    with open(loop_config["out"], "w") as f:
        json.dump(times, f)
    ray.train.report({})


def ray_train_steps(config: PretrainConfig, warmup: int, steps: int) -> list[float]:
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
    with tempfile.TemporaryDirectory() as tmp:
        out = f"{tmp}/times.json"
        TorchTrainer(
            _ray_worker,
            train_loop_config={"config": config.model_dump(mode="json"), "warmup": warmup,
                               "steps": steps, "out": out},
            scaling_config=ray.train.ScalingConfig(num_workers=1,
                                                   resources_per_worker={"CPU": 2}),
            run_config=ray.train.RunConfig(name="overhead", storage_path=tmp),
        ).fit()
        with open(out) as f:
            times = json.load(f)
    ray.shutdown()
    return times


def encoder_seconds(config: PretrainConfig, mask_ratio: float, repeat: int) -> float:
    """Median forward + backward time of the encoder at ``mask_ratio`` (0: every patch)."""
    torch.manual_seed(0)
    model = SSLModel(config)
    size = config.model.image_size
    images = torch.randn(config.train.global_batch_size, 3, size, size)
    times = []
    for i in range(repeat + 2):
        model.zero_grad(set_to_none=True)
        started = time.perf_counter()
        if mask_ratio:
            latent, _, _ = encode_visible(model.encoder, images, mask_ratio)
        else:
            latent = model.encoder.forward_features(images)
        latent.float().pow(2).mean().backward()
        if i >= 2:
            times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="tiny-cpu")
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=15)
    args = parser.parse_args()
    overrides = ["train.num_workers=1"]
    if args.batch_size:
        overrides.append(f"train.global_batch_size={args.batch_size}")
    config = load_config(args.config, overrides)

    plain = statistics.median(timed_steps(config, args.warmup, args.steps, distributed=False))
    in_ray = statistics.median(ray_train_steps(config, args.warmup, args.steps))
    visible = encoder_seconds(config, config.objective("mae").mask_ratio, repeat=args.steps)
    everything = encoder_seconds(config, 0.0, repeat=args.steps)
    print(json.dumps({
        "config": args.config, "batch_size": config.train.global_batch_size,
        "image_size": config.model.image_size, "torch_threads": torch.get_num_threads(),
        "plain_process_step_seconds": round(plain, 4),
        "ray_train_1_worker_step_seconds": round(in_ray, 4),
        "overhead_ratio": round(in_ray / plain, 3),
        "encoder_visible_tokens_seconds": round(visible, 4),
        "encoder_all_tokens_seconds": round(everything, 4),
        "mae_saving_ratio": round(everything / visible, 2),
    }, indent=2))


if __name__ == "__main__":
    main()
