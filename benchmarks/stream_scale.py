"""Costs of the run's bookkeeping at web scale, each measured at two sizes.

    .venv/bin/python benchmarks/stream_scale.py ledger --nodes 64 --days 1 7
    .venv/bin/python benchmarks/stream_scale.py counters --images 512 --epochs 4 --repeats 5
    .venv/bin/python benchmarks/stream_scale.py schedule --sizes 100000x100 1000000x100 1000000x1
    .venv/bin/python benchmarks/stream_scale.py restore --configs vit-s16 vit-b16 --ranks 2

``ledger``: a simulated energy ledger of NODES GPU nodes (2 CPU packages, 2 DRAM zones and 8 GPUs
each, the meters of an 8-GPU server) over DAYS days, written by the meter's own writer
(``LedgerParts``, one line a minute, a part every five minutes, as the defaults), then reported on
by ``ssl-pretrain energy-report`` in a fresh process. Prints, for each size, the ledger's lines,
parts and bytes, the time to write it, and the report's wall time and peak memory (the child's
maximum resident set size), then the growth between the sizes.

``counters``: the data stage's throughput (images/s at 224 px, the hybrid's three views, on
``benchmarks/data_stage.py``'s ImageNet-like JPEGs) with its counters on (per-process Prometheus
series, totals sent in batches) and off, in alternating runs; the medians and their difference.

``schedule``: the lazy schedule on the driver for SHARDS x EPOCHS (synthetic shard names, nothing
read): the time to build the dataset, to its first row and to its first ROWS rows (groups),
the driver's resident memory growth, and the size of the shard list (the one thing it holds
per shard). ``--per-item`` builds the earlier design instead (an item and a block per epoch
and shard) for comparison.

``restore``: a checkpoint of each CONFIG's model and AdamW state, sharded by FSDP2 over RANKS
CPU processes (gloo) and saved as the workers save it (each rank into its own directory, then
gathered into one, as Ray Train persists it), then restored by the same number of ranks from
that directory: the bytes each rank read (and the time), against the checkpoint's size, which is
what each rank read when every rank downloaded the whole checkpoint.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pipelines.storage.access import StorageOptions
from ssl_train.energy.node import LEDGER_DIR, LedgerParts, utc

GPUS, PACKAGES = 8, 2


def _meters(node: int) -> list[dict]:
    meters = [{"device": f"package-{p}", "component": "cpu", "source": "measured"}
              for p in range(PACKAGES)]
    meters += [{"device": f"dram-{p}", "component": "dram", "source": "measured"}
               for p in range(PACKAGES)]
    meters += [{"device": f"GPU-{node:08x}-{g:04x}-bbbb-cccc-dddddddddddd", "component": "gpu",
                "source": "measured"} for g in range(GPUS)]
    return meters


def write_ledger(run_dir: Path, nodes: int, days: float, record_seconds: float = 60.0,
                 part_seconds: float = 300.0) -> dict:
    """A ledger as the meters write it, at simulated times; returns its size."""
    rng = random.Random(0)
    start = 1.7e9
    end = start + days * 86400
    lines = parts = 0
    for node in range(nodes):
        name = f"node{node:04d}" + "0" * 52
        meters = _meters(node)
        ledger = LedgerParts(str(run_dir), f"{LEDGER_DIR}/ledger-{name[:12]}-20260101T000000-"
                             f"{node:06x}", StorageOptions(), part_seconds, start)
        ledger.append({
            "type": "meter", "run": "week", "node": name, "hostname": f"gpu-node-{node}",
            "started": utc(start), "interval_seconds": 1.0,
            "inventory": {"cpu_model": "simulated", "logical_cpus": 224,
                          "memory_bytes": 2 * 1024**4, "platform": "linux",
                          "gpus": [{"uuid": m["device"], "name": "H100"} for m in meters
                                   if m["component"] == "gpu"]},
            "meters": [{**m, "detail": "simulated"} for m in meters],
            "grid_intensity": {"g_per_kwh": 400.0, "source": "simulated"},
            "pue": {"value": 1.2, "source": "simulated"}, "images_per_step": 4096})
        ledger.roll(start)  # the header is its own part, as the meter writes it
        t0 = start
        while t0 < end:
            t1 = t0 + record_seconds
            entries = []
            for meter in meters:
                watts = 600.0 if meter["component"] == "gpu" else 150.0
                joules = watts * record_seconds * rng.uniform(0.9, 1.1)
                train = joules * (0.95 if meter["component"] == "gpu" else 0.6)
                data = 0.0 if meter["component"] == "gpu" else joules * 0.3
                entries.append({**meter, "joules": joules,
                                "stages": {"train": train, "data": data,
                                           "idle": joules - train - data}})
            ledger.append({"type": "interval", "node": name, "t0": t0, "t1": t1,
                           "cpu_seconds": {"train": 120.0 * record_seconds,
                                           "data": 60.0 * record_seconds},
                           "entries": entries, "samples": int(record_seconds)})
            lines += 1
            ledger.roll_if_due(t1)
            t0 = t1
        ledger.append({"type": "stopped", "node": name, "time": utc(end)})
        ledger.close()
        parts += ledger.index + 1
    size = sum(p.stat().st_size for p in (run_dir / LEDGER_DIR).rglob("*.jsonl"))
    return {"lines": lines, "parts": parts, "bytes": size}


def report_in_child(run_dir: Path) -> dict:
    """``energy-report`` in a fresh process: wall time and the child's peak resident memory."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    started = time.perf_counter()
    executable = Path(sys.executable).parent / "ssl-pretrain"
    result = subprocess.run([str(executable), "energy-report", str(run_dir)],
                            capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if result.returncode:
        raise SystemExit(result.stderr[-2000:])
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    report = json.loads((run_dir / "energy_report.json").read_text())
    return {"seconds": seconds, "peak_rss_mib": peak_kib / 1024,
            "peak_rss_note": "" if peak_kib > before else "(not above an earlier child's)",
            "kwh": report["sci"]["E_kwh"], "lines_reported": report["ledger_lines"]}


def ledger_benchmark(nodes: int, days_list: list[float]) -> None:
    rows = []
    for days in days_list:  # smallest first: RUSAGE_CHILDREN keeps the largest child's peak
        with tempfile.TemporaryDirectory(prefix="ledger-bench-") as work:
            run_dir = Path(work) / "run"
            started = time.perf_counter()
            size = write_ledger(run_dir, nodes, days)
            written = time.perf_counter() - started
            report = report_in_child(run_dir)
        assert report["lines_reported"] == size["lines"]
        rows.append((days, size, written, report))
        print(f"{nodes} nodes x {days:g} days: {size['lines']:,} lines in {size['parts']:,} parts, "
              f"{size['bytes'] / 1e9:.2f} GB (written in {written:.0f} s); report "
              f"{report['seconds']:.0f} s, peak RSS {report['peak_rss_mib']:.0f} MiB "
              f"{report['peak_rss_note']}".rstrip(), flush=True)
    if len(rows) > 1:
        (d0, s0, _, r0), (d1, s1, _, r1) = rows[0], rows[-1]
        print(f"growth {d0:g} -> {d1:g} days: ledger x{s1['bytes'] / s0['bytes']:.1f}, report "
              f"time x{r1['seconds'] / r0['seconds']:.1f}, peak RSS "
              f"x{r1['peak_rss_mib'] / r0['peak_rss_mib']:.2f}")


def counters_benchmark(images: int, epochs: int, repeats: int, workers: int) -> None:
    import statistics

    from data_stage import SIZE, make_jpegs

    from pipelines.cluster import ensure_ray
    from pipelines.ingest import IngestConfig, ingest
    from pipelines.stream.stage import DataConfig, DataStage

    ensure_ray(num_cpus=(os.cpu_count() or 1) + 1)  # as data_stage.py and the launcher
    with tempfile.TemporaryDirectory(prefix="counters-bench-") as work:
        make_jpegs(Path(work) / "jpegs", images)
        ingest(str(Path(work) / "jpegs"), str(Path(work) / "shards"),
               IngestConfig(samples_per_shard=32), log=lambda line: None)
        config = DataConfig.model_validate({"source": {"url": str(Path(work) / "shards")},
                                            "epochs": epochs, "view_workers": workers})
        rates: dict[bool, list[float]] = {True: [], False: []}
        for run in range(2 * repeats):
            counting = run % 2 == 0
            stage = DataStage(config, SIZE, counters=counting)
            iterator = iter(stage.iter_batches(64))
            first = len(next(iterator)["view_a"])  # start-up not timed
            started, count = time.perf_counter(), 0
            for batch in iterator:
                count += len(batch["view_a"])
            rates[counting].append(count / (time.perf_counter() - started))
            if counting:
                assert stage.counters()["images_emitted"] == first + count  # complete totals
    on, off = statistics.median(rates[True]), statistics.median(rates[False])
    print(json.dumps({"images": images, "epochs": epochs, "view_workers": workers,
                      "counters_on_images_per_s": round(on, 1),
                      "counters_off_images_per_s": round(off, 1),
                      "on_runs": [round(r, 1) for r in rates[True]],
                      "off_runs": [round(r, 1) for r in rates[False]],
                      "on_vs_off_percent": round(100 * (on / off - 1), 2)}, indent=2))


def _rss_mib() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def schedule_benchmark(sizes: list[tuple[int, int]], group_size: int, rows: int,
                       per_item: bool = False) -> None:
    """The driver's side of the lazy schedule: building the dataset (the shard list put in the
    object store once) and reaching the first ``rows`` groups, with the driver's memory."""
    import ray
    import ray.data

    from pipelines.stream.cursor import DataCursor, epoch_order
    from pipelines.stream.sources import ShardRef
    from pipelines.stream.stage import schedule_dataset

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    ray.get(ray.remote(lambda: None).remote())  # a worker up before timing
    results = []
    for shards, epochs in sizes:
        refs = [ShardRef(f"s3://bucket/shards/shard-{i:07d}.tar", "tar").to_json()
                for i in range(shards)]
        before = _rss_mib()
        started = time.perf_counter()
        if per_item:  # the earlier design: one item (and one block) per (epoch, shard)
            items = [{"shard": refs[i], "epoch": e, "position": p} for e in range(epochs)
                     for p, i in enumerate(epoch_order(shards, 0, e))]
            ds = ray.data.from_items(items, override_num_blocks=len(items))
        else:
            ds = schedule_dataset(refs, DataCursor(seed=0), epochs, group_size)
        built = time.perf_counter() - started
        seen, first_epoch, first = 0, None, None
        for batch in ds.iter_batches(batch_size=None):
            first = first or time.perf_counter() - started
            seen += len(batch["epoch"])
            first_epoch = int(batch["epoch"][0]) if first_epoch is None else first_epoch
            if seen >= rows:
                break
        reached = time.perf_counter() - started
        results.append({"design": "per-item" if per_item else "lazy", "shards": shards,
                        "epochs": epochs, "build_s": round(built, 2),
                        "first_row_s": round(first, 2), "first_rows_s": round(reached, 2),
                        "rows_read": seen, "epoch_of_first": first_epoch,
                        "driver_rss_growth_mib": round(_rss_mib() - before, 1),
                        "shard_list_mib": round(sum(map(len, refs)) / 2**20, 1)})
        del refs, ds
        print(json.dumps(results[-1]), flush=True)
    print(json.dumps({"schedule": results}, indent=2))


def _restore_rank(rank: int, world: int, port: int, config_name: str, root: str) -> None:
    import shutil

    import torch
    import torch.distributed as dist

    from ssl_train.config import load_config
    from ssl_train.train.checkpoint import load_checkpoint, save_checkpoint
    from ssl_train.train.loop import Trainer

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    torch.set_num_threads(1)
    try:
        config = load_config(config_name, [])
        trainer = Trainer(config, "cpu", rank, world)
        mine = Path(root, f"rank-{rank}")
        mine.mkdir(parents=True)
        started = time.perf_counter()
        save_checkpoint(mine, trainer.model, trainer.optimizer, {"step": 0})
        saved = time.perf_counter() - started
        dist.barrier()
        checkpoint = Path(root, "checkpoint")
        if rank == 0:  # what Ray Train's persistence does: every worker's files in one place
            checkpoint.mkdir()
            for part in range(world):
                for path in Path(root, f"rank-{part}").iterdir():
                    shutil.copy(path, checkpoint / path.name)
        dist.barrier()
        restored_into = Trainer(config, "cpu", rank, world)
        started = time.perf_counter()
        restored = load_checkpoint(str(checkpoint), restored_into.model, restored_into.optimizer)
        took = time.perf_counter() - started
        rows = [None] * world
        dist.all_gather_object(rows, {"rank": rank, "bytes_read": restored.bytes_read,
                                      "restore_s": round(took, 2), "save_s": round(saved, 2)})
        if rank == 0:
            Path(root, "result.json").write_text(json.dumps(
                {"config": config_name, "ranks": world, "checkpoint_bytes": restored.bytes_total,
                 "parameters": sum(p.numel() for p in trainer.model.parameters()),
                 "by_rank": rows}))
    finally:
        import gc

        gc.collect()
        dist.destroy_process_group()


def restore_benchmark(configs: list[str], world: int) -> None:
    """Bytes read per rank on a restore at the same world size, for each config's checkpoint."""
    import socket

    import torch.multiprocessing as mp

    results = []
    for config_name in configs:
        with tempfile.TemporaryDirectory(prefix="restore-") as root, socket.socket() as free:
            free.bind(("127.0.0.1", 0))
            port = free.getsockname()[1]
            free.close()
            mp.spawn(_restore_rank, args=(world, port, config_name, root), nprocs=world)
            result = json.loads(Path(root, "result.json").read_text())
        total = result["checkpoint_bytes"]
        read = [row["bytes_read"] for row in result["by_rank"]]
        result.update({"checkpoint_mb": round(total / 1e6, 1),
                       "read_mb_by_rank": [round(b / 1e6, 1) for b in read],
                       "busiest_rank_fraction": round(max(read) / total, 3),
                       "all_ranks_fraction": round(sum(read) / total, 3),
                       "whole_copy_per_rank_mb": round(total / 1e6, 1)})
        results.append(result)
        print(json.dumps(result), flush=True)
    if len(results) > 1:
        first, last = results[0], results[-1]
        print(json.dumps({"growth": {
            "checkpoint": round(last["checkpoint_bytes"] / first["checkpoint_bytes"], 2),
            "busiest_rank_read": round(max(last["read_mb_by_rank"])
                                       / max(first["read_mb_by_rank"]), 2)}}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    ledger = commands.add_parser("ledger", help="the energy report on a simulated long ledger")
    ledger.add_argument("--nodes", type=int, default=64)
    ledger.add_argument("--days", type=float, nargs="+", default=[1, 7])
    counting = commands.add_parser("counters", help="stage throughput, counters on and off")
    counting.add_argument("--images", type=int, default=512)
    counting.add_argument("--epochs", type=int, default=4)
    counting.add_argument("--repeats", type=int, default=5)
    counting.add_argument("--workers", type=int, default=2)
    schedule = commands.add_parser("schedule", help="the lazy schedule's start-up on the driver")
    schedule.add_argument("--sizes", nargs="+", default=["100000x100", "1000000x100",
                                                         "1000000x1"],
                          help="SHARDSxEPOCHS")
    schedule.add_argument("--group-size", type=int, default=16)
    schedule.add_argument("--rows", type=int, default=256)
    schedule.add_argument("--per-item", action="store_true",
                          help="the earlier design (an item per epoch and shard), to compare")
    restore = commands.add_parser("restore", help="checkpoint bytes read per rank on restore")
    restore.add_argument("--configs", nargs="+", default=["vit-s16", "vit-b16"])
    restore.add_argument("--ranks", type=int, default=2)
    args = parser.parse_args()
    if args.command == "ledger":
        ledger_benchmark(args.nodes, sorted(args.days))
    elif args.command == "schedule":
        schedule_benchmark([tuple(map(int, size.split("x"))) for size in args.sizes],
                           args.group_size, args.rows, args.per_item)
    elif args.command == "restore":
        restore_benchmark(args.configs, args.ranks)
    else:
        counters_benchmark(args.images, args.epochs, args.repeats, args.workers)


if __name__ == "__main__":
    main()
