"""A job's working prefix in object storage: Parquet parts, bucketed passes, resume by outputs.

Web-scale jobs (ingest) run as passes of Ray Data tasks whose inputs and outputs are Parquet
parts under one prefix (``DEST/_ingest/``), never rows held by the driver:
- a **map** pass turns each input part into another part (1:1);
- a **bucket** pass reads groups of parts, gives every row a bucket, and writes one file per
  (bucket, map task): ``NAME/b=00012/m=00003.parquet``; a **reduce** pass then reads one bucket's
  files and writes one output part. Buckets are sized by rows, so no task's memory grows with the
  job; this is a shuffle through object storage, which (unlike Ray Data's ``groupby``) never
  holds more than one bucket in a worker and never gathers to the driver.
Every task writes its outputs first and a small ``.done`` JSON (its counters) last, atomically; a
rerun skips tasks whose ``.done`` exists and reuses their counters. Tasks are enumerated by index
(``ray.data.range``), so the driver holds one stage's counters, not a list of its work.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import time
import uuid
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.storage.access import (
    StorageError,
    StorageOptions,
    StorageUnavailable,
    is_remote,
    open_filesystem,
    storage_call,
)

DONE = ".done"


def run_starts(values: np.ndarray) -> np.ndarray:
    """A boolean mask of the first row of each run of equal values (``values`` sorted)."""
    if not len(values):
        return np.array([], bool)
    return np.r_[True, values[1:] != values[:-1]]


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """A well-mixed 64-bit hash of 64-bit integers (SplitMix64's finaliser)."""
    with np.errstate(over="ignore"):
        z = x.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def hash_strings(values, seed: int = 0) -> np.ndarray:
    """64-bit hashes of strings, the same on every machine and every run."""
    import hashlib

    array = values.to_pylist() if hasattr(values, "to_pylist") else list(values)
    salt = seed.to_bytes(8, "little", signed=False)
    return np.array([int.from_bytes(hashlib.blake2b(v.encode(), digest_size=8, salt=salt[:8])
                                    .digest(), "little") for v in array], dtype=np.uint64)


def hash_integers(values: np.ndarray, seed: int = 0) -> np.ndarray:
    return _splitmix64(np.asarray(values, dtype=np.uint64) ^ _splitmix64(np.array([seed]))[0])


def bucket_of(hashes: np.ndarray, buckets: int) -> np.ndarray:
    return (hashes % np.uint64(buckets)).astype(np.int64)


class WorkArea:
    """Parquet parts and done markers under one prefix (local or any fsspec URL)."""

    def __init__(self, uri: str, options: StorageOptions):
        self.uri = uri.rstrip("/")
        self.options = options
        self.fs, self.root = open_filesystem(self.uri, options)
        self.root = self.root.rstrip("/")
        self.local = not is_remote(self.uri)

    def __reduce__(self):  # shipped to tasks as its URI and options, not an open filesystem
        return WorkArea, (self.uri, self.options)

    def path(self, relative: str) -> str:
        return f"{self.root}/{relative}"

    def _call(self, fn, *args, **kwargs):
        return storage_call(self.uri, self.options, fn, *args, **kwargs)

    def put(self, relative: str, data: bytes) -> None:
        """Write one object whole: a reader sees all of it or nothing."""
        path = self.path(relative)
        if self.local:  # a local write is not atomic: write beside, then rename
            os.makedirs(os.path.dirname(path), exist_ok=True)
            temporary = f"{path}.{uuid.uuid4().hex}.tmp"
            with open(temporary, "wb") as f:
                f.write(data)
            os.replace(temporary, path)
        else:
            self._call(self.fs.pipe_file, path, data)

    def get(self, relative: str) -> bytes:
        return self._call(self.fs.cat_file, self.path(relative))

    def get_if_exists(self, relative: str) -> bytes | None:
        """The object, or None if there is none: one request either way."""
        try:
            return self.fs.cat_file(self.path(relative))
        except FileNotFoundError:
            return None
        except Exception:  # noqa: BLE001 - anything else is told apart by storage_call
            return self.get(relative)

    def exists(self, relative: str) -> bool:
        return self._call(self.fs.exists, self.path(relative))

    def listdir(self, relative: str) -> list[str]:
        """Names of the objects directly under ``relative`` (empty if there is none)."""
        path = self.path(relative)
        try:
            found = self.fs.ls(path, detail=False)
        except FileNotFoundError:
            return []
        except Exception:  # noqa: BLE001 - anything else is told apart by storage_call
            found = self._call(self.fs.ls, path, detail=False)
        return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in found)

    def remove(self, relative: str = "") -> None:
        path = self.path(relative) if relative else self.root
        if self._call(self.fs.exists, path):
            self._call(self.fs.rm, path, recursive=True)

    def write_table(self, relative: str, table: pa.Table) -> None:
        sink = io.BytesIO()
        pq.write_table(table, sink, compression="zstd")
        self.put(relative, sink.getvalue())

    def read_table(self, relative: str, columns: list[str] | None = None) -> pa.Table:
        return pq.read_table(io.BytesIO(self.get(relative)), columns=columns)

    def read_tables(self, relatives: Iterable[str], schema: pa.Schema | None = None) -> pa.Table:
        tables = [self.read_table(r) for r in relatives]
        if not tables:
            return schema.empty_table() if schema is not None else pa.table({})
        return pa.concat_tables(tables, promote_options="default")

    def done(self, relative: str) -> dict | None:
        """The counters a finished task left, or None if it did not finish."""
        data = self.get_if_exists(f"{relative}{DONE}")
        return None if data is None else json.loads(data)

    def mark_done(self, relative: str, counters: dict) -> None:
        self.put(f"{relative}{DONE}", json.dumps(counters, sort_keys=True).encode())


def part_name(index: int) -> str:
    return f"part-{index:06d}.parquet"


def bucket_file(stage: str, bucket: int, mapper: int) -> str:
    return f"{stage}/b={bucket:06d}/m={mapper:06d}.parquet"


def write_buckets(area: WorkArea, stage: str, mapper: int, table: pa.Table,
                  buckets: np.ndarray) -> int:
    """Write ``table``'s rows to their buckets' files for this mapper; returns rows written."""
    if not len(table):
        return 0
    order = np.argsort(buckets, kind="stable")
    sorted_buckets = buckets[order]
    table = table.take(pa.array(order))
    starts = np.flatnonzero(np.r_[True, sorted_buckets[1:] != sorted_buckets[:-1]])
    ends = np.r_[starts[1:], len(order)]
    for start, end in zip(starts, ends):
        area.write_table(bucket_file(stage, int(sorted_buckets[start]), mapper),
                         table.slice(int(start), int(end - start)))
    return len(table)


def read_bucket(area: WorkArea, stage: str, bucket: int, schema: pa.Schema) -> pa.Table:
    """Every mapper's rows of one bucket."""
    folder = f"{stage}/b={bucket:06d}"
    names = [n for n in area.listdir(folder) if n.endswith(".parquet")]
    return area.read_tables((f"{folder}/{n}" for n in names), schema)


def buckets_for(rows: int, rows_per_bucket: int) -> int:
    return max(1, math.ceil(rows / rows_per_bucket))


class Progress:
    """One line every few seconds: done of total, rate, ETA."""

    def __init__(self, what: str, total: int, unit: str, log: Callable[[str], None],
                 every_seconds: float = 10.0):
        self.what, self.total, self.unit, self.log = what, total, unit, log
        self.every = every_seconds
        self.started = time.perf_counter()
        self.last = self.started
        self.done = 0
        self.reused = 0

    def add(self, count: int, reused: bool = False) -> None:
        self.done += count
        if reused:
            self.reused += count
        now = time.perf_counter()
        if now - self.last >= self.every:
            self.last = now
            self.log(self.line())

    def line(self) -> str:
        elapsed = time.perf_counter() - self.started
        fresh = self.done - self.reused
        rate = fresh / elapsed if elapsed > 0 else 0.0
        left = self.total - self.done
        eta = f", ETA {left / rate:.0f} s" if rate > 0 and left > 0 else ""
        return (f"ingest: {self.what}: {self.done} of {self.total} {self.unit} "
                f"({rate:.0f} {self.unit}/s{eta})")


def run_tasks(count: int, task: Callable[[int], dict], *,
              num_cpus: float = 1.0) -> Iterable[dict]:
    """Run ``task(index)`` for index in range(count) as Ray Data tasks; yields their counters.

    The indices come from ``ray.data.range``: the driver holds no list of the work. A task that
    dies is retried by Ray; tasks themselves skip work whose outputs are already done. A pass of
    one task runs in this process.
    """
    import ray.data

    if count == 0:
        return
    if count == 1:  # one task: run it here, without a Ray Data execution's start-up (a bucket
        yield task(0)  # is bounded by rows, so this holds no more than a worker would)
        return
    # A job of many short passes: one progress line of our own, not Ray Data's per pass.
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)  # "bars disabled"
    dataset = ray.data.range(count, override_num_blocks=min(count, 4096))

    def run(batch: dict[str, np.ndarray]) -> dict[str, Any]:
        results = [task(int(index)) for index in batch["id"]]
        return {"result": [json.dumps(r, sort_keys=True) for r in results]}

    for row in dataset.map_batches(run, batch_size=1, num_cpus=num_cpus).iter_rows():
        yield json.loads(row["result"])


def once(area: WorkArea, marker: str, work: Callable[[], dict]) -> dict:
    """``work()``'s counters, or those it left when it ran before (with ``reused``).

    A storage failure comes back as data (``storage_error``): exceptions lose their type
    crossing Ray Data, and the driver must tell an outage from a refusal.
    """
    done = area.done(marker)
    if done is not None:
        return {**done, "reused": True}
    try:
        counters = work()
    except StorageError as err:
        return {"storage_error": str(err), "unavailable": isinstance(err, StorageUnavailable)}
    area.mark_done(marker, counters)
    return counters


def run_stage(count: int, task: Callable[[int], dict], progress: Progress | None = None,
              amount: Callable[[dict], int] = lambda result: 1) -> list[dict]:
    """Run a pass of ``count`` tasks; raises the first storage failure a task reports.
    Returns the tasks' counters."""
    results = []
    for result in run_tasks(count, task):
        if result.get("storage_error"):
            kind = StorageUnavailable if result["unavailable"] else StorageError
            raise kind(result["storage_error"])
        if progress is not None:
            progress.add(amount(result), reused=result.get("reused", False))
        results.append(result)
    return results


def total(results: list[dict], key: str) -> int:
    return sum(int(r.get(key, 0)) for r in results)
