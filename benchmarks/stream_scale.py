"""Costs of the run's bookkeeping at web scale, each measured at two sizes.

    .venv/bin/python benchmarks/stream_scale.py ledger --nodes 64 --days 1 7
    .venv/bin/python benchmarks/stream_scale.py counters --images 512 --epochs 4 --repeats 5
    .venv/bin/python benchmarks/stream_scale.py schedule --sizes 100000x100 1000000x100 1000000x1
    .venv/bin/python benchmarks/stream_scale.py restore --configs vit-s16 vit-b16 --ranks 2
    .venv/bin/python benchmarks/stream_scale.py straggler --shards 64 --delays 10 30

``ledger``: a simulated energy ledger of NODES GPU nodes (2 CPU packages, 2 DRAM zones and 8 GPUs
each, the meters of an 8-GPU server) over DAYS days, written by the meter's own writer
(``LedgerParts``, one line a minute, a part every five minutes, as the defaults), then reported on
by ``ssl-pretrain energy-report`` in a fresh process. Prints, for each size, the ledger's lines,
parts and bytes, the time to write it, and the report's wall time and peak memory (the child's
maximum resident set size), then the growth between the sizes.

``counters``: the data stage's throughput (images/s at 224 px, the hybrid's three views, on
``benchmarks/data_stage.py``'s ImageNet-like JPEGs) with its counters on (per-process Prometheus
series, totals sent in batches) and off, in alternating runs; the medians and their difference.
Then, on this process's clock, the share of a view worker's time spent counting: the same groups
cut by one view worker in this process, with every call of its tally timed (a throughput figure
that does not depend on the machine's run-to-run spread).

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

``straggler``: a stream of SHARDS one-image shards on S3 (a moto server behind the reliability
suite's fault proxy), groups of ``--group-size``, run once as it is and once for each DELAY with
the first GET of one shard of epoch 0's second group held back until DELAY seconds after the
stream's first batch (its start-up does not count). For each: the longest gap between two
batches of the other groups while the straggler was held, against the longest gap of the
undisturbed stream (the stall is the difference), the samples that arrived meanwhile and when
the straggler's own arrived; nothing may be lost.
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
        share = counting_share(config)
    result = {"images": images, "epochs": epochs, "view_workers": workers}
    if repeats:  # --repeats 0: the share alone
        on, off = statistics.median(rates[True]), statistics.median(rates[False])
        result.update({"counters_on_images_per_s": round(on, 1),
                       "counters_off_images_per_s": round(off, 1),
                       "on_runs": [round(r, 1) for r in rates[True]],
                       "off_runs": [round(r, 1) for r in rates[False]],
                       "on_vs_off_percent": round(100 * (on / off - 1), 2)})
    print(json.dumps({**result, "view_worker_time_counting": share}, indent=2))


def counting_share(config) -> dict:
    """One view worker, in this process, cutting every group of ``config``'s stream with its
    counters on: the time its tally's calls took (the outermost, each timed) against the time
    the groups took in all."""
    from data_stage import SIZE

    from pipelines.stream import stage as stage_module
    from pipelines.stream.stage import DataStage

    stage = DataStage(config, SIZE, run_name="counting-share")  # its ledger a real actor
    worker = stage_module._ViewMaker(**stage.view_worker_kwargs())
    spent, depth = [0.0, 0], [0]
    originals = {name: getattr(stage_module._Tally, name)
                 for name in ("add", "shard_read", "sample_dropped", "flush")}

    def timed(original):
        def call(self, *args, **kwargs):
            depth[0] += 1
            started = time.perf_counter()
            try:
                return original(self, *args, **kwargs)
            finally:
                depth[0] -= 1
                if depth[0] == 0:  # a flush inside add is add's time
                    spent[0] += time.perf_counter() - started
                    spent[1] += 1
        return call

    groups = list(stage.schedule().iter_batches(batch_size=1, batch_format="numpy"))
    try:
        for name, original in originals.items():
            setattr(stage_module._Tally, name, timed(original))
        started, emitted = time.perf_counter(), 0
        for group in groups:
            emitted += sum(len(out["position"]) for out in worker(group))
        total = time.perf_counter() - started
    finally:
        for name, original in originals.items():
            setattr(stage_module._Tally, name, original)
    return {"groups": len(groups), "images": emitted, "seconds": round(total, 2),
            "tally_calls": spent[1], "tally_seconds": round(spent[0], 4),
            "percent": round(100 * spent[0] / total, 3)}


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


def straggler_benchmark(shards: int, group_size: int, delays: list[float], epochs: int,
                        workers: int) -> None:
    """The stall a straggling shard causes: the stream's longest gap while it is held, less
    the undisturbed stream's longest gap (after its first batch)."""
    import io
    import uuid

    import s3fs
    from moto.server import ThreadedMotoServer

    from pipelines.cluster import ensure_ray
    from pipelines.sample_images import sample_photographs
    from pipelines.storage.shards import shard_name, write_shard
    from pipelines.stream.cursor import DataCursor, epoch_groups, epoch_order
    from pipelines.stream.stage import DataConfig, DataStage

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.reliability: proxy, timing
    from tests.reliability.arrivals import arrivals, arrivals_with_a_straggler, longest_gap
    from tests.reliability.faultproxy import FaultProxy

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    credentials = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
                   "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
    direct = s3fs.S3FileSystem(endpoint_url=f"http://{host}:{port}", key="bench", secret="bench")
    bucket = f"straggler-{uuid.uuid4().hex[:8]}"
    direct.mkdir(bucket)
    photos = sample_photographs(min_side=64)
    for index in range(shards):
        photo = photos[index % len(photos)]
        encoded = io.BytesIO()
        photo.save(encoded, format="JPEG", quality=90)
        sink = io.BytesIO()
        write_shard(sink, [(f"img{index:06d}", "jpg", encoded.getvalue(), {})])
        direct.pipe(f"{bucket}/shards/{shard_name(index)}", sink.getvalue())
    with FaultProxy(f"http://{host}:{port}") as proxy:
        os.environ.update({**credentials, "AWS_ENDPOINT_URL": proxy.url})  # before Ray starts
        ensure_ray(num_cpus=(os.cpu_count() or 1) + 1)  # as the launcher
        config = DataConfig.model_validate({
            "source": {"url": f"s3://{bucket}/shards"}, "epochs": epochs,
            "read_shards_at_once": group_size, "view_batch_size": 2, "view_workers": workers})
        group = epoch_groups(shards, DataCursor(seed=0), 0, group_size)[1]
        slow = {(0, position) for position, _ in group}
        slow_shard = shard_name(epoch_order(shards, 0, 0)[group[0][0]])
        baseline = arrivals(DataStage(config, 32))
        baseline_gap = longest_gap([t for t, _ in baseline][1:])  # after the start-up
        rows = []
        for delay in delays:
            slowed, fault = arrivals_with_a_straggler(DataStage(config, 32), proxy, slow_shard,
                                                      delay)
            proxy.clear()
            assert fault.fired == 1, "the straggler's read was never held"
            assert sum(len(s) for _, s in slowed) == shards * epochs, "samples were lost"
            arrives = min(t for t, samples in slowed if samples & slow)
            assert arrives >= slowed[0][0] + delay, "the straggler's read was held too briefly"
            held = [t for t, samples in slowed[1:] if not samples & slow and t <= arrives]
            if held[-1] - held[0] < delay / 2:
                raise SystemExit(f"the stream ended before the {delay:g} s straggler: "
                                 f"raise --epochs")
            gap_held = longest_gap(held)
            rows.append({
                "delay_s": delay, "first_batch_s": round(slowed[0][0], 2),
                "straggler_arrives_s": round(arrives, 2),
                "samples_while_held": sum(len(s) for t, s in slowed if t < arrives),
                "longest_gap_while_held_s": round(gap_held, 2),
                "longest_gap_without_straggler_s": round(baseline_gap, 2),
                "stall_s": round(max(0.0, gap_held - baseline_gap), 2),
                "stream_s": round(slowed[-1][0], 2),
                "stream_without_straggler_s": round(baseline[-1][0], 2)})
            print(json.dumps(rows[-1]), flush=True)
    server.stop()
    print(json.dumps({"shards": shards, "group_size": group_size, "epochs": epochs,
                      "view_workers": workers, "straggler": rows}, indent=2))


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
    straggling = commands.add_parser("straggler", help="the stall a straggling shard causes")
    straggling.add_argument("--shards", type=int, default=64)
    straggling.add_argument("--group-size", type=int, default=4)
    straggling.add_argument("--delays", type=float, nargs="+", default=[10.0, 30.0])
    straggling.add_argument("--epochs", type=int, default=8)
    straggling.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    if args.command == "ledger":
        ledger_benchmark(args.nodes, sorted(args.days))
    elif args.command == "schedule":
        schedule_benchmark([tuple(map(int, size.split("x"))) for size in args.sizes],
                           args.group_size, args.rows, args.per_item)
    elif args.command == "restore":
        restore_benchmark(args.configs, args.ranks)
    elif args.command == "straggler":
        straggler_benchmark(args.shards, args.group_size, args.delays, args.epochs,
                            args.workers)
    else:
        counters_benchmark(args.images, args.epochs, args.repeats, args.workers)


if __name__ == "__main__":
    main()
