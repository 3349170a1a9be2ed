"""The GPU check: the hybrid's training step on one accelerator, bf16 under FSDP2, without Ray.

    python3 benchmarks/gpu_check.py --out gpu_check.json            # on a GPU machine
    .venv/bin/python benchmarks/gpu_check.py --device cpu           # the smoke run of make test

For each model (ViT-B/16 and ViT-L/16 hybrids at 224 px by default) and each of eager and
``torch.compile`` (per block): FSDP2 on a one-rank NCCL group with the bf16 policy of a real run
(``ssl_train.distributed.fsdp``), the real step (``ssl_train.train.step``: device photometric augmentation,
forward, backward, clip, AdamW), on views cut from scikit-image's photographs before timing.
Reports images/s, step time, peak memory, MFU (``ssl_train.train.flops`` against the device's dense bf16
peak and against a matrix product measured here), the augmentation's share of the step, and
joules per image from NVML's total-energy counter. One JSON document on stdout (and ``--out``).

It needs torch, timm, numpy, Pillow, scikit-image, PyYAML and pydantic; not Ray, s3fs or
imagehash (docs/benchmarks.md says which wheels to carry to a machine that lacks some). A model
that does not fit is recorded as such and the next one runs; ``--budget-seconds`` skips what
would not finish in time, so the JSON always comes back.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import socket
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a bare checkout

from pipelines.sample_images import random_view_batches, sample_photographs  # noqa: E402
from pipelines.views.augment import AugmentConfig  # noqa: E402
from ssl_train.config import PretrainConfig, load_config  # noqa: E402
from ssl_train.distributed.fsdp import apply_parallelism, resolve_precision  # noqa: E402
from ssl_train.models.ssl_model import SSLModel  # noqa: E402
from ssl_train.objectives import StepContext  # noqa: E402
from ssl_train.train.flops import step_flops  # noqa: E402
from ssl_train.train.optim import build_optimizer, build_scheduler  # noqa: E402
from ssl_train.train.step import normalize_views, train_step  # noqa: E402

# Dense bf16 peaks from the vendors' datasheets (without sparsity), by device name.
PEAK_BF16_TFLOPS = {"H200": 989.4, "H100 SXM": 989.4, "H100 80GB HBM3": 989.4,
                    "H100 NVL": 835.0, "H100 PCIe": 756.0, "H100": 989.4, "A100": 312.0,
                    "L40S": 362.1, "L4": 121.0}
GPU_MODELS = {"vit-b16": 128, "vit-l16": 64}  # config: images per step
# The smoke run: the tiny config made smaller still, two steps, on the CPU.
CPU_OVERRIDES = ["model.image_size=32", "model.encoder.depth=2", "model.encoder.embed_dim=96",
                 "model.encoder.num_heads=2", "objectives.mae.decoder.depth=1",
                 "objectives.mae.decoder.embed_dim=64", "objectives.mae.decoder.num_heads=2",
                 "objectives.simclr.projector.hidden_dim=128",
                 "objectives.simclr.projector.out_dim=64"]


def peak_tflops(device: torch.device, given: float | None) -> tuple[float | None, str]:
    """The device's dense bf16 peak and where the figure comes from."""
    if given:
        return given, "--peak-tflops"
    if device.type != "cuda":
        return None, "no datasheet peak for a CPU"
    name = torch.cuda.get_device_name(device)
    for key, value in PEAK_BF16_TFLOPS.items():
        if key in name:
            return value, f"datasheet, dense bf16 ({key})"
    return None, f"no datasheet peak known for {name!r}: pass --peak-tflops"


def measured_matmul_tflops(device: torch.device) -> float:
    """bf16 matrix-product rate measured here: mean of 10 products after 3 warm-ups."""
    n = 8192 if device.type == "cuda" else 256
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    _sync(device)
    started = time.perf_counter()
    for _ in range(10):
        a @ b
    _sync(device)
    return 10 * 2 * n**3 / (time.perf_counter() - started) / 1e12


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class EnergyCounter:
    """NVML's total-energy counter of the device (millijoules since the driver loaded)."""

    def __init__(self, device: torch.device):
        self.handle, self.reason = None, None
        if device.type != "cuda":
            self.reason = "no NVML on a CPU"
            return
        try:
            import pynvml

            pynvml.nvmlInit()
            index = device.index or 0
            self.handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            self.read()
        except Exception as err:  # no pynvml, or a GPU without the counter
            self.handle, self.reason = None, f"NVML total energy unavailable: {err}"

    def read(self) -> float | None:
        """Joules so far, or None."""
        if self.handle is None:
            return None
        import pynvml

        return pynvml.nvmlDeviceGetTotalEnergyConsumption(self.handle) / 1000.0


def _device_batches(config: PretrainConfig, device: torch.device, count: int) -> list[dict]:
    """``count`` batches of uint8 views with photometric parameters, already on the device."""
    augment = AugmentConfig(photometric_on="device")
    batches = random_view_batches(sample_photographs(min_side=64), config.model.image_size,
                                  config.train.global_batch_size, seed=0, augment=augment)
    return [{key: torch.as_tensor(value).to(device) for key, value in next(batches).items()}
            for _ in range(count)]


def run_one(name: str, device: torch.device, images: int, compile_blocks: bool,
            args: argparse.Namespace, peak: float | None, matmul: float,
            energy: EnergyCounter) -> dict:
    """Time one (model, compile) case; returns its figures."""
    # Energy is read from NVML here; the run's metering (and its region table) is not needed.
    overrides = [f"train.global_batch_size={images}", "train.num_workers=1",
                 "parallel.mixed_precision=bf16", "optim.accumulation_steps=1",
                 "energy.enabled=false", "energy.region=null"]
    if device.type == "cpu":
        overrides += CPU_OVERRIDES
    config = load_config(name, overrides)
    result = {"model": name, "compile": compile_blocks, "batch_size": images,
              "image_size": config.model.image_size,
              "activation_checkpointing": config.parallel.activation_checkpointing}
    torch.manual_seed(0)
    model = apply_parallelism(SSLModel(config), device, "bf16",
                              config.parallel.activation_checkpointing,
                              compile_blocks=compile_blocks)
    result["precision"] = resolve_precision(device, "bf16").as_record()
    optimizer = build_optimizer(model, config)
    scheduler = build_scheduler(optimizer, config)
    batches = _device_batches(config, device, min(4, args.warmup + args.steps))
    threshold = config.data.augment.photometric.solarize_threshold
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def step(index: int) -> tuple[float, float]:
        batch = batches[index % len(batches)]
        inputs = {key: value.to(device) for key, value in model.step_inputs(
            StepContext(config.train.seed, index, 0, 1, images)).items()}
        _sync(device)
        started = time.perf_counter()
        views = normalize_views(batch, device, threshold)
        _sync(device)
        augmented = time.perf_counter()
        train_step(model, optimizer, scheduler, views, config, inputs)
        _sync(device)
        return augmented - started, time.perf_counter() - started

    warmup_started = time.perf_counter()
    for index in range(args.warmup):
        step(index)
    result["warmup_seconds"] = round(time.perf_counter() - warmup_started, 2)
    joules_before = energy.read()
    augment_seconds, step_seconds = [], []
    for index in range(args.warmup, args.warmup + args.steps):
        augment, total = step(index)
        augment_seconds.append(augment)
        step_seconds.append(total)
    joules_after = energy.read()
    median = statistics.median(step_seconds)
    flops = step_flops(config, images)["total"]
    result.update({
        "timed_steps": len(step_seconds),
        "step_seconds_median": round(median, 5),
        "step_seconds_mean": round(statistics.mean(step_seconds), 5),
        "images_per_second": round(images / median, 1),
        "model_tflop_per_step": float(f"{flops / 1e12:.4g}"),
        "achieved_tflops": float(f"{flops / median / 1e12:.4g}"),
        "mfu": round(flops / median / 1e12 / peak, 4) if peak else None,
        "mfu_vs_measured_matmul": round(flops / median / 1e12 / matmul, 4),
        "augment_seconds_median": round(statistics.median(augment_seconds), 5),
        "augment_share_of_step": round(sum(augment_seconds) / sum(step_seconds), 4),
    })
    if device.type == "cuda":
        result["peak_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    if joules_before is not None and joules_after is not None:
        joules = joules_after - joules_before
        result["joules_per_image"] = round(joules / (images * len(step_seconds)), 4)
        result["average_watts"] = round(joules / sum(step_seconds), 1)
    else:
        result["joules_per_image"] = None
    return result


def _process_group(device: torch.device) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    backend = "nccl" if device.type == "cuda" else "gloo"
    kwargs = {"device_id": device} if device.type == "cuda" else {}
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=0,
                            world_size=1, **kwargs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--models", help="comma-separated config names (default: vit-b16,vit-l16 "
                        "on cuda, tiny-cpu on cpu)")
    parser.add_argument("--batch-size", type=int, help="images per step for every model")
    parser.add_argument("--warmup", type=int, help="untimed steps first (default 5; cpu 1)")
    parser.add_argument("--steps", type=int, help="timed steps (default 20; cpu 2)")
    parser.add_argument("--compile", choices=("both", "off", "on"), default="both")
    parser.add_argument("--peak-tflops", type=float, help="the device's dense bf16 peak")
    parser.add_argument("--budget-seconds", type=float, default=420,
                        help="skip cases that would start after this many seconds")
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    args = parser.parse_args()
    cpu = args.device == "cpu"
    if not cpu and not torch.cuda.is_available():
        parser.error("no CUDA device here: run with --device cpu for the smoke run")
    args.warmup = args.warmup if args.warmup is not None else (1 if cpu else 5)
    args.steps = args.steps if args.steps is not None else (2 if cpu else 20)
    names = args.models.split(",") if args.models else (["tiny-cpu"] if cpu else list(GPU_MODELS))
    variants = {"both": [False, True], "off": [False], "on": [True]}[args.compile]

    started = time.perf_counter()
    device = torch.device("cpu") if cpu else torch.device("cuda", 0)
    if not cpu:
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
    _process_group(device)
    import timm

    peak, peak_source = peak_tflops(device, args.peak_tflops)
    matmul = measured_matmul_tflops(device)  # unrounded for MFU: a busy CPU gives < 0.05
    report = {
        "device": torch.cuda.get_device_name(device) if not cpu else platform.processor() or "cpu",
        "torch": torch.__version__, "timm": timm.__version__, "python": platform.python_version(),
        "peak_bf16_tflops": peak, "peak_source": peak_source,
        "matmul_bf16_tflops_measured": float(f"{matmul:.4g}"),
        "results": [], "skipped": [],
    }
    energy = EnergyCounter(device)
    report["energy_source"] = "NVML total energy" if energy.handle is not None else energy.reason
    for name in names:
        for compile_blocks in variants:
            case = {"model": name, "compile": compile_blocks}
            elapsed = time.perf_counter() - started
            if elapsed > args.budget_seconds:
                report["skipped"].append({**case, "reason": f"budget: {elapsed:.0f} s spent"})
                continue
            images = args.batch_size or (8 if cpu else GPU_MODELS.get(name, 64))
            try:
                outcome = run_one(name, device, images, compile_blocks, args, peak, matmul,
                                  energy)
                report["results"].append(outcome)
            except torch.cuda.OutOfMemoryError:
                outcome = {**case, "reason": f"out of memory at {images} images"}
                report["skipped"].append(outcome)
            finally:
                with contextlib.suppress(Exception):
                    torch._dynamo.reset()
                if not cpu:
                    torch.cuda.empty_cache()
            print(json.dumps(outcome), file=sys.stderr, flush=True)  # progress, case by case
    report["seconds"] = round(time.perf_counter() - started, 1)
    dist.destroy_process_group()
    text = json.dumps(report, indent=2)
    if args.out:
        args.out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
