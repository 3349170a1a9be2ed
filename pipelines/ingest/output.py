"""Ingest's last passes: kept images in a seeded random order, cut into shards, written.

Each record part, less its drops, goes to write buckets by a hash of the seed and the key (a
range partition of that random order); each bucket is sorted and cut into shards by bytes or
count (``plan/``); the driver numbers the shards from the buckets' counts, and each shard is
written by its own task. A shard's samples come from across the whole source.
"""

from __future__ import annotations

import bisect
import heapq
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from pipelines.ingest.config import IngestConfig, Job
from pipelines.ingest.duplicates import DECISION_SCHEMA
from pipelines.ingest.records import encode_for_shard
from pipelines.ingest.workarea import (
    Progress,
    buckets_for,
    hash_strings,
    once,
    part_name,
    read_bucket,
    run_stage,
    total,
    write_buckets,
)
from pipelines.storage.access import open_filesystem, storage_call
from pipelines.storage.shards import shard_name, write_shard
from pipelines.views.decode import decode_image

SHARDS_PER_WRITE_BUCKET = 64
EXAMPLES_OF_DUPLICATES = 100


# ------------------------------------------------------------------------------ 6. shuffle

SHUFFLE_SCHEMA = pa.schema([("order", pa.uint64()), ("key", pa.string()), ("path", pa.string()),
                            ("width", pa.int64()), ("height", pa.int64()),
                            ("sha256", pa.string()), ("phash", pa.uint64()),
                            ("ext", pa.string()), ("shard_bytes", pa.int64())])


def _smallest(items: Iterable, count: int) -> list:
    return heapq.nsmallest(count, items)


def _kept_task(job: Job, write_buckets_count: int) -> Callable[[int], dict]:
    """One records part minus its drops, in a seeded random order, to the write buckets; also
    this part's counts and smallest example keys for the quality report."""
    def task(index: int) -> dict:
        area = job.area()

        def work() -> dict:
            records = area.read_table(f"records/{part_name(index)}")
            decisions = read_bucket(area, "decisions", index, DECISION_SCHEMA)
            reason = records["drop_reason"].to_pylist()
            decided = dict(zip(decisions["key"].to_pylist(), decisions["reason"].to_pylist()))
            keys = records["key"].to_pylist()
            kept = np.array([not r and k not in decided for k, r in zip(keys, reason)], bool)
            table = records.filter(pa.array(kept))
            order = hash_strings(table["key"], seed=job.config.seed)
            rows = pa.table({"order": order, **{n: table[n] for n in SHUFFLE_SCHEMA.names[1:]}},
                            schema=SHUFFLE_SCHEMA)
            # Range-partitioned by the random order: bucket w holds the w-th slice of it.
            bucket = (((order >> np.uint64(32)) * np.uint64(write_buckets_count))
                      >> np.uint64(32)).astype(np.int64)
            write_buckets(area, "shuffle", index, rows, bucket)
            by_reason: dict[str, list[str]] = {}
            for key, r in zip(keys, reason):
                if r:
                    by_reason.setdefault(r, []).append(key)
            for key, r in decided.items():
                by_reason.setdefault(r, []).append(key)
            examples = {r: _smallest(v, job.config.examples_per_reason)
                        for r, v in by_reason.items()}
            duplicate_of = _smallest(zip(decisions["key"].to_pylist(),
                                         decisions["of"].to_pylist()), EXAMPLES_OF_DUPLICATES)
            return {"kept": int(kept.sum()),
                    "kept_bytes": int(np.asarray(rows["shard_bytes"]).sum()),
                    "dropped": {r: len(v) for r, v in by_reason.items()},
                    "examples": examples, "duplicate_of": duplicate_of}

        return once(area, f"shuffle/m={index:06d}", work)
    return task


def plan_shards(sizes: list[int], config: IngestConfig) -> list[list[int]]:
    """Consecutive groups of sample indices, each up to the configured count or byte size."""
    shards: list[list[int]] = []
    current: list[int] = []
    current_bytes = 0
    for index, size in enumerate(sizes):
        full = (
            len(current) >= config.samples_per_shard
            if config.samples_per_shard
            else current and current_bytes + size > config.shard_bytes
        )
        if full:
            shards.append(current)
            current, current_bytes = [], 0
        current.append(index)
        current_bytes += size
    if current:
        shards.append(current)
    return shards


def _plan_task(job: Job) -> Callable[[int], dict]:
    def task(index: int) -> dict:
        area = job.area()

        def work() -> dict:
            rows = read_bucket(area, "shuffle", index, SHUFFLE_SCHEMA).sort_by(
                [("order", "ascending"), ("key", "ascending")])
            plans = plan_shards(np.asarray(rows["shard_bytes"]).tolist(), job.config)
            local = np.zeros(len(rows), dtype=np.int64)
            for number, members in enumerate(plans):
                local[members] = number
            area.write_table(f"plan/{part_name(index)}",
                             rows.append_column("shard", pa.array(local)))
            return {"shards": len(plans), "samples": len(rows)}

        return once(area, f"plan/{part_name(index)}", work)
    return task


# ------------------------------------------------------------------------------ 7. write

def _write_task(job: Job, offsets: list[int]) -> Callable[[int], dict]:
    def task(index: int) -> dict:
        area = job.area()
        name = shard_name(index)

        def work() -> dict:
            bucket = bisect.bisect_right(offsets, index) - 1
            plan = area.read_table(f"plan/{part_name(bucket)}")
            rows = plan.filter(pa.array(np.asarray(plan["shard"]) == index - offsets[bucket]))
            src_fs, _ = open_filesystem(job.src, job.options)
            dest_fs, dest_root = open_filesystem(job.dest, job.options)

            def samples():
                for row in rows.to_pylist():
                    data = storage_call(job.src, job.options, src_fs.cat_file, row["path"])
                    image, _ = decode_image(data, job.config.quality.max_pixels)
                    ext, payload = encode_for_shard(data, image, job.config)
                    yield row["key"], ext, payload, {
                        "key": row["key"], "width": row["width"], "height": row["height"],
                        "sha256": row["sha256"], "phash": f"{row['phash']:016x}",
                        "source": row["path"]}

            path = f"{dest_root.rstrip('/')}/{name}"
            with storage_call(job.dest, job.options, dest_fs.open, path, "wb") as sink:
                written = write_shard(sink, samples())
            return {"name": name, **written}

        return once(area, f"shards/{name}", work)
    return task


@dataclass
class ShufflePlan:
    """What the shuffle decided: kept images, the drops' counts and examples, and where each
    write bucket's shards start in the global numbering."""

    kept: int
    dropped: Counter
    examples: dict[str, list[str]]
    duplicate_of: list[tuple[str, str]]
    offsets: list[int]


def shuffle_and_plan(job: Job, parts: int, candidates: int, candidate_bytes: int) -> ShufflePlan:
    """Kept images to write buckets in a seeded random order, each cut into shards."""
    config = job.config
    if config.samples_per_shard:
        buckets = buckets_for(candidates, config.samples_per_shard * SHARDS_PER_WRITE_BUCKET)
    else:
        buckets = buckets_for(candidate_bytes, config.shard_bytes * SHARDS_PER_WRITE_BUCKET)
    kept = run_stage(parts, _kept_task(job, buckets))
    dropped: Counter = Counter()
    examples: dict[str, list[str]] = {}
    duplicate_of: list = []
    for result in kept:  # merged as they come: bounded by the examples kept, not the images
        dropped.update(result["dropped"])
        for reason, keys in result["examples"].items():
            examples[reason] = _smallest(examples.get(reason, []) + keys,
                                         config.examples_per_reason)
        duplicate_of = _smallest(duplicate_of + [tuple(p) for p in result["duplicate_of"]],
                                 EXAMPLES_OF_DUPLICATES)
    plans = run_stage(buckets, _plan_task(job))
    offsets = np.r_[0, np.cumsum([p["shards"] for p in plans])].astype(int).tolist()
    return ShufflePlan(total(kept, "kept"), dropped, examples, duplicate_of, offsets)


def write_shards(job: Job, plan: ShufflePlan, log: Callable[[str], None],
                 resumed: bool) -> list[dict]:
    """Every planned shard, written in parallel; the manifest's entries, by name."""
    count = plan.offsets[-1]
    progress = Progress("written", plan.kept, "images", log)
    written = run_stage(count, _write_task(job, plan.offsets[:-1]), progress,
                        lambda result: result["samples"])
    log(progress.line())
    if resumed and progress.reused:
        log(f"ingest: resumed: {sum(1 for r in written if r.get('reused'))} of {count} "
            "shards already written")
    return sorted(({k: r[k] for k in ("name", "samples", "bytes", "sha256")} for r in written),
                  key=lambda shard: shard["name"])
