"""Data-stage throughput on this machine: decode bound, a DataLoader peer, and our pipeline.

    .venv/bin/python benchmarks/data_stage.py --images 512 --workers 2 --epochs 24 --repeats 3 --profile
    .venv/bin/python benchmarks/data_stage.py --images 512 --workers 2 --epochs 8 --repeats 3 --stage-only --cpu-split

Makes ImageNet-like JPEGs (about 500x375, quality 90) from scikit-image's photographs, ingests
them into local WebDataset shards, then measures, at 224 px with two SimCLR views and one MAE
view per image:
  1. decode alone (PIL, full size), in ``--workers`` processes: the bound;
  2. torch.utils.data.DataLoader with torchvision v2 transforms of the same augmentation, on
     uint8 tensors, with ``--workers`` worker processes: the peer;
  3. our Ray Data stage with photometric augmentation in the data stage;
  4. our Ray Data stage with photometric augmentation left to the device, and the cost of that
     augmentation per batch on the device (this machine's CPU unless --device says otherwise).
Our stage runs --repeats times per mode and the median is kept (run-to-run spread on this
2-core machine is large: the consumer shares the cores with the stage's actors). Each run gives
its images/s after its first batch (start-up not timed) and from the stage's start (start-up
and first batch included) with its seconds to the first batch. Compare designs by the rate from
the start, over enough epochs that start-up is a small part of it: the rate after the first
batch also counts the images cut before the timer started, so a stream that holds its first
batch back while its workers cut ahead reads faster by it (docs/benchmarks.md, 2026-12-06).
Prints one JSON object with every figure and the ratios 3/2, 3/1 and 4/1 (of either rate of
ours), and, with --profile, where the time of one image goes in each mode of our stage. With
--cpu-split, each timed run's CPU seconds by kind of process (which of them took the cores)
beside the whole machine's busy CPU seconds and the seconds to the first batch, and the view
worker's CPU an image in this process without Ray: the two together say whether a change in
throughput is the stage's own work or how it runs under Ray.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import multiprocessing
import os
import pstats
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pipelines.cluster import ensure_ray
from pipelines.ingest import IngestConfig, ingest
from pipelines.sample_images import sample_photographs
from pipelines.stream.stage import DataConfig, DataStage
from pipelines.views.augment import AugmentConfig, make_views
from pipelines.views.photometric import PhotometricConfig, apply_photometric_torch
from pipelines.views.quality import QualityConfig

SIZE = 224


def make_jpegs(folder: Path, count: int, seed: int = 0) -> list[Path]:
    """``count`` JPEGs of about 500x375, each a different random crop of a sample photograph."""
    rng = np.random.default_rng(seed)
    photos = [p for p in sample_photographs(min_side=256)]
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        photo = photos[i % len(photos)]
        w, h = photo.size
        cw, ch = int(w * rng.uniform(0.6, 1.0)), int(h * rng.uniform(0.6, 1.0))
        left, top = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        landscape = rng.random() < 0.75
        out = photo.crop((left, top, left + cw, top + ch)).resize(
            (500, 375) if landscape else (375, 500), Image.BICUBIC)
        path = folder / f"img{i:05d}.jpg"
        out.save(path, format="JPEG", quality=90)
        paths.append(path)
    return paths


def _decode_all(datas: list[bytes]) -> int:
    for data in datas:
        Image.open(io.BytesIO(data)).convert("RGB")
    return len(datas)


def bench_decode(datas: list[bytes], workers: int, repeat: int = 3) -> float:
    chunks = [datas[i::workers] * repeat for i in range(workers)]
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        pool.map(_decode_all, [c[:8] for c in chunks])  # warm the workers
        started = time.perf_counter()
        done = sum(pool.map(_decode_all, chunks))
    return done / (time.perf_counter() - started)


class _TorchvisionDataset(torch.utils.data.Dataset):
    """The same augmentation with torchvision v2 on uint8 tensors: the common way to write it."""

    def __init__(self, paths: list[Path], photometric: PhotometricConfig):
        from torchvision.transforms import v2

        self.paths = paths
        p = photometric
        photometric_ops = [
            v2.RandomApply([v2.ColorJitter(p.brightness, p.contrast, p.saturation, p.hue)],
                           p=p.jitter_p),
            v2.RandomGrayscale(p=p.grayscale_p),
            v2.RandomApply([v2.GaussianBlur(23, sigma=p.blur_sigma)], p=p.blur_p),
        ]
        self.contrastive = v2.Compose([
            v2.ToImage(), v2.RandomResizedCrop(SIZE, scale=(0.08, 1.0), antialias=True),
            v2.RandomHorizontalFlip(), *photometric_ops,
        ])
        self.mae = v2.Compose([
            v2.ToImage(), v2.RandomResizedCrop(SIZE, scale=(0.2, 1.0), antialias=True),
            v2.RandomHorizontalFlip(),
        ])

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        image = Image.open(self.paths[index]).convert("RGB")
        return {"view_a": self.contrastive(image), "view_b": self.contrastive(image),
                "view_mae": self.mae(image)}


def bench_dataloader(paths: list[Path], workers: int, batch_size: int, epochs: int) -> float:
    torch.set_num_threads(1)
    loader = torch.utils.data.DataLoader(
        _TorchvisionDataset(paths, PhotometricConfig()), batch_size=batch_size,
        num_workers=workers, persistent_workers=True, prefetch_factor=2,
    )
    iterator = iter(loader)
    next(iterator)  # start-up and the first batch are not timed
    started, count = time.perf_counter(), 0
    for epoch in range(epochs):
        for batch in iterator:
            count += len(batch["view_a"])
        iterator = iter(loader)
    return count / (time.perf_counter() - started)


def bench_stage(shards: str, photometric_on: str, workers: int, batch_size: int,
                epochs: int, repeats: int, settings: dict | None = None,
                split: list | None = None) -> tuple[dict[str, list[float]], dict]:
    """``repeats`` full runs of our stage: each run's images/s after its first batch, its
    images/s from the stage's start (start-up and first batch included) and its seconds to the
    first batch; with ``split``, each run's CPU seconds by kind of process are appended to it."""
    config = DataConfig.model_validate({
        "source": {"url": shards}, "epochs": epochs, "view_workers": workers,
        "augment": {"photometric_on": photometric_on}, **(settings or {}),
    })
    runs: dict[str, list[float]] = {"after_first_batch": [], "from_start": [],
                                    "first_batch_seconds": []}
    for _ in range(repeats):
        built = time.perf_counter()
        stage = DataStage(config, SIZE)
        iterator = iter(stage.iter_batches(batch_size))
        first = len(next(iterator)["view_a"])
        first_batch = time.perf_counter() - built
        if split is not None:
            cpu, machine_busy = cpu_seconds(), machine_busy_seconds()
        started, count = time.perf_counter(), 0
        for batch in iterator:
            count += len(batch["view_a"])
        ended = time.perf_counter()
        wall = ended - started
        runs["after_first_batch"].append(count / wall)
        runs["from_start"].append((first + count) / (ended - built))
        runs["first_batch_seconds"].append(first_batch)
        if split is not None:
            split.append({**cpu_split(cpu, cpu_seconds(), wall),
                          # the machine's too: it shows the CPU of processes the split misses
                          # (ones that ended inside the window)
                          "machine_busy_cpu_seconds":
                              round(machine_busy_seconds() - machine_busy, 2),
                          "first_batch_seconds": round(first_batch, 2)})
    return runs, stage.counters()


def machine_busy_seconds() -> float:
    """The whole machine's busy CPU seconds so far (read here with psutil, not through the
    tree's own energy meters, so that ``--cpu-split`` runs against an older tree too)."""
    import psutil

    times = psutil.cpu_times()
    idle = times.idle + getattr(times, "iowait", 0.0)
    return sum(times) - getattr(times, "guest", 0.0) - getattr(times, "guest_nice", 0.0) - idle


def in_process_cpu_ms(shards: str, photometric_on: str, settings: dict, repeats: int = 3
                      ) -> float:
    """CPU milliseconds an image of one view worker cutting one epoch's groups in this process,
    on one thread as a Ray worker of one CPU runs, best of ``repeats``: the stage's own cost
    an image, without Ray around it."""
    from pipelines.stream import stage as stage_module

    config = DataConfig.model_validate({
        "source": {"url": shards}, "epochs": 1,
        "augment": {"photometric_on": photometric_on}, **settings,
    })
    stage = DataStage(config, SIZE, counters=False)
    groups = list(stage.schedule().iter_batches(batch_size=1, batch_format="numpy"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # process_time counts every thread's time
    best = float("inf")
    try:
        for _ in range(repeats):
            worker = stage_module._ViewMaker(**stage.view_worker_kwargs())
            started, images = time.process_time(), 0
            for group in groups:
                images += sum(len(out["position"]) for out in worker(group))
            best = min(best, (time.process_time() - started) / images)
    finally:
        torch.set_num_threads(threads)
    return 1000 * best


def _process_kind(process) -> str | None:
    """What a process of this machine is to the benchmark: a Ray worker by its task or actor,
    this driver, Ray's daemons; None for the rest."""
    try:
        cmdline = process.cmdline()
    except Exception:
        return None
    if process.pid == os.getpid():
        return "driver (the consumer)"
    if cmdline and cmdline[0].startswith("ray::"):
        return cmdline[0]
    joined = " ".join(cmdline)
    for daemon in ("raylet", "gcs_server", "dashboard", "log_monitor", "monitor.py"):
        if daemon in joined:
            return f"ray daemon: {daemon}"
    return None


def cpu_seconds() -> dict[int, tuple[str, float]]:
    """pid -> (kind, user + system CPU seconds so far) of every process that matters here."""
    import psutil

    seen = {}
    for process in psutil.process_iter():
        kind = _process_kind(process)
        if kind is not None:
            try:
                times = process.cpu_times()
            except Exception:
                continue
            seen[process.pid] = (kind, times.user + times.system)
    return seen


def cpu_split(before: dict, after: dict, wall: float) -> dict[str, float]:
    """CPU seconds by kind of process between two readings, and the window's wall seconds: the
    share of the machine's cores each kind took. (A process that started and ended between the
    readings is missed; one that started after the first is counted from its start.)"""
    totals: dict[str, float] = {"wall_seconds": round(wall, 2)}
    for pid, (kind, seconds) in after.items():
        used = seconds - before.get(pid, (kind, 0.0))[1]
        totals[kind] = round(totals.get(kind, 0.0) + used, 2)
    return dict(sorted(totals.items(), key=lambda item: -item[1]))


def bench_device_photometric(batch_size: int, device: str, repeat: int = 5) -> float:
    """Seconds to apply photometric augmentation to both contrastive views of one batch."""
    from pipelines.views.photometric import sample_photometric

    rng = np.random.default_rng(0)
    config = PhotometricConfig()
    views = torch.randint(0, 256, (2 * batch_size, 3, SIZE, SIZE), dtype=torch.uint8)
    params = torch.from_numpy(np.stack([sample_photometric(rng, config, SIZE)
                                        for _ in range(2 * batch_size)]))
    x = views.to(device).float() / 255
    apply_photometric_torch(x, params)  # warm-up
    times = []
    for _ in range(repeat):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        started = time.perf_counter()
        apply_photometric_torch(views.to(device).float() / 255, params)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    return float(np.median(times))


def profile_views(datas: list[bytes], photometric_on: str, top: int = 12) -> list[str]:
    augment = AugmentConfig(photometric_on=photometric_on)
    rng = np.random.default_rng(0)
    profiler = cProfile.Profile()
    profiler.enable()
    for data in datas:
        make_views(data, rng, SIZE, augment, QualityConfig())
    profiler.disable()
    stream = io.StringIO()
    pstats.Stats(profiler, stream=stream).sort_stats("tottime").print_stats(top)
    per_image_ms = 1000 * pstats.Stats(profiler).total_tt / len(datas)
    lines = [f"{photometric_on}: {per_image_ms:.2f} ms per image in one process"]
    lines += [line for line in stream.getvalue().splitlines() if "{" in line or "(" in line][:top]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=8, help="passes over the data")
    parser.add_argument("--repeats", type=int, default=3, help="runs of our stage; median kept")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=JSON",
                        help="a data-stage setting for stages 3 and 4, e.g. read_tasks=1")
    parser.add_argument("--samples-per-shard", type=int, default=32,
                        help="images a shard (a group is data.read_shards_at_once shards)")
    parser.add_argument("--cpu-split", action="store_true",
                        help="also give each run's CPU seconds by kind of process, and the "
                             "view worker's CPU an image in this process, without Ray")
    parser.add_argument("--stage-only", action="store_true",
                        help="measure stages 3 and 4 only (not the bound and the peer)")
    args = parser.parse_args()
    settings = {field: json.loads(value)
                for field, value in (item.split("=", 1) for item in args.set)}

    # One logical CPU beyond the cores, as the launcher's local cluster has (the figures in
    # docs/benchmarks.md since the reads became their own tasks were measured so).
    ensure_ray(num_cpus=(os.cpu_count() or 1) + 1)
    work = Path(tempfile.mkdtemp(prefix="ssl-data-bench-"))
    paths = make_jpegs(work / "jpegs", args.images)
    datas = [p.read_bytes() for p in paths]
    ingest(str(work / "jpegs"), str(work / "shards"),
           IngestConfig(samples_per_shard=args.samples_per_shard),
           log=lambda line: None)
    results: dict = {"images": args.images, "samples_per_shard": args.samples_per_shard,
                     "workers": args.workers,
                     "batch_size": args.batch_size, "image_size": SIZE, "settings": settings}
    if not args.stage_only:
        results["1_decode_images_per_s"] = bench_decode(datas, args.workers)
        results["2_dataloader_torchvision_v2_images_per_s"] = bench_dataloader(
            paths, args.workers, args.batch_size, args.epochs)
    split3, split4 = ([], []) if args.cpu_split else (None, None)
    runs3, counters3 = bench_stage(str(work / "shards"), "data", args.workers,
                                   args.batch_size, args.epochs, args.repeats, settings, split3)
    runs4, counters4 = bench_stage(str(work / "shards"), "device", args.workers,
                                   args.batch_size, args.epochs, args.repeats, settings, split4)
    for name, runs in (("3_ray_stage_photometric_on_data", runs3),
                       ("4_ray_stage_photometric_on_device", runs4)):
        stage = name[0]
        results[f"{name}_images_per_s"] = float(np.median(runs["after_first_batch"]))
        results[f"{stage}_runs"] = [round(r, 1) for r in runs["after_first_batch"]]
        results[f"{name}_from_start_images_per_s"] = float(np.median(runs["from_start"]))
        results[f"{stage}_from_start_runs"] = [round(r, 1) for r in runs["from_start"]]
        results[f"{stage}_first_batch_seconds"] = [round(s, 2)
                                                   for s in runs["first_batch_seconds"]]
    seconds = bench_device_photometric(args.batch_size, args.device)
    results["4_device_photometric_seconds_per_batch"] = seconds
    results["4_device_photometric_device"] = args.device
    results["4_device_photometric_images_per_s"] = args.batch_size / seconds
    if not args.stage_only:
        r1, r2, r3, r4 = (results[k] for k in (
            "1_decode_images_per_s", "2_dataloader_torchvision_v2_images_per_s",
            "3_ray_stage_photometric_on_data_images_per_s",
            "4_ray_stage_photometric_on_device_images_per_s"))
        results["ratio_3_over_2"] = r3 / r2
        results["ratio_3_over_1"] = r3 / r1
        results["ratio_4_over_1"] = r4 / r1
        s3, s4 = (results[k] for k in ("3_ray_stage_photometric_on_data_from_start_images_per_s",
                                       "4_ray_stage_photometric_on_device_from_start_images_per_s"))
        results["ratio_3_over_2_from_start"] = s3 / r2
        results["ratio_3_over_1_from_start"] = s3 / r1
        results["ratio_4_over_1_from_start"] = s4 / r1
    if args.cpu_split:
        results["3_cpu_seconds_by_process"] = split3
        results["4_cpu_seconds_by_process"] = split4
        for name, mode in (("3", "data"), ("4", "device")):
            try:
                results[f"{name}_in_process_cpu_ms_per_image"] = in_process_cpu_ms(
                    str(work / "shards"), mode, settings)
            except (AttributeError, TypeError):  # an older stage (run against an old tree)
                results[f"{name}_in_process_cpu_ms_per_image"] = None
    results["counters_stage_3"] = counters3
    results["counters_stage_4"] = counters4
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in results.items()},
                     indent=2))
    if args.profile:
        for mode in ("data", "device"):
            print("\n".join(profile_views(datas[:100], mode)))


if __name__ == "__main__":
    main()
