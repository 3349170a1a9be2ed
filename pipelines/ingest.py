"""``ssl-pretrain ingest SRC DEST``: raw images to shuffled, quality-filtered WebDataset shards.

A Ray Data job end to end, in passes over Parquet parts under ``DEST/_ingest/``
(``pipelines.workarea``); the driver holds counters, the shard plan's summary and the manifest,
never a per-image record:
1. **list**: prefixes of SRC listed in parallel tasks, or the objects of ``--list FILE``;
2. **keys**: a WebDataset key per image, unique across the input (bucketed by key);
3. **inspect**: every image read, checked and hashed (content and perceptual hash, shard size);
4. **exact**: images grouped by content hash (bucketed by hash); the best of each group stays;
5. **near**: the survivors' perceptual hashes grouped by blocks (``pipelines.dedup``), pairs
   within ``near_duplicate_distance`` found in each group, then the greedy keep rule (largest
   first, ties by key) resolved in rounds over those pairs;
6. **shuffle**: kept images in a seeded random order, cut into shards by bytes or count;
7. **write**: the shards in parallel, then ``quality_report.json`` and, last, ``manifest.json``
   (its presence marks a complete ingest), and the work prefix is removed.
Every task writes its outputs, then a done marker: a killed ingest, rerun with the same command,
reuses what was finished. Images are read twice (inspect, write) rather than held anywhere.
Nothing is written to DEST until SRC and DEST have both been checked.
"""

from __future__ import annotations

import bisect
import heapq
import io
import json
import math
import posixpath
import re
import time
from collections import Counter
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Annotated, Any, Literal

import numpy as np
import pyarrow as pa
from PIL import Image
from pydantic import Field, model_validator

from pipelines import dedup
from pipelines.cluster import ensure_ray
from pipelines.decode import Rejected, decode_image
from pipelines.quality import (
    BLANK,
    DROP_REASONS,
    EXACT_DUPLICATE,
    NEAR_DUPLICATE,
    READ_FAILED,
    QualityConfig,
    content_hash,
    is_blank,
    perceptual_hash,
    size_reason,
)
from pipelines.settings import StrictSection
from pipelines.shards import shard_name, write_shard
from pipelines.sources import RAW_IMAGE_SUFFIXES
from pipelines.storage import (
    StorageError,
    StorageOptions,
    StorageUnavailable,
    open_filesystem,
    storage_call,
)
from pipelines.workarea import (
    Progress,
    WorkArea,
    bucket_of,
    buckets_for,
    hash_integers,
    hash_strings,
    part_name,
    read_bucket,
    run_tasks,
    write_buckets,
)

MANIFEST = "manifest.json"
QUALITY_REPORT = "quality_report.json"
WORK = "_ingest"
JOB = "job.json"
# Rows a bucket of each pass is sized for: tens of MB of Parquet, whatever the input's size.
ROWS_PER_BUCKET = {"exact": 200_000, "near": 2_000_000, "graph": 500_000}
SHARDS_PER_WRITE_BUCKET = 64
EXAMPLES_OF_DUPLICATES = 100


class IngestConfig(StrictSection):
    """How raw images become shards."""

    samples_per_shard: Annotated[int, Field(ge=1)] | None = None
    shard_bytes: Annotated[int, Field(ge=1024)] = 256 * 1024 * 1024
    reencode: Literal["keep", "jpeg"] = "keep"
    jpeg_quality: Annotated[int, Field(ge=1, le=100)] = 90
    max_side: Annotated[int, Field(ge=16)] | None = None
    quality: QualityConfig = QualityConfig()
    examples_per_reason: Annotated[int, Field(ge=0)] = 5
    # The order of samples across shards is a function of this seed and the keys.
    seed: int = 0
    # Images per unit of work (a listing part, a record part): what a killed task loses.
    images_per_part: Annotated[int, Field(ge=1)] = 10_000

    @model_validator(mode="after")
    def _max_side_needs_reencoding(self) -> "IngestConfig":
        if self.max_side is not None and self.reencode == "keep":
            raise ValueError("max_side needs reencode: jpeg (kept bytes cannot be resized)")
        return self


def key_for(relative_path: str) -> str:
    """A WebDataset key from a path: no suffix, and no dots (they separate key and extension)."""
    stem = posixpath.splitext(relative_path)[0]
    return re.sub(r"[^A-Za-z0-9_/-]", "_", stem).strip("/") or "image"


def encode_for_shard(data: bytes, image: Image.Image, config: IngestConfig) -> tuple[str, bytes]:
    """The (extension, bytes) stored in a shard under the re-encoding policy."""
    if config.reencode == "keep":
        fmt = (Image.open(io.BytesIO(data)).format or "jpeg").lower()
        return {"jpeg": "jpg", "tiff": "tif"}.get(fmt, fmt), data
    if config.max_side and max(image.size) > config.max_side:
        image = image.copy()
        image.thumbnail((config.max_side, config.max_side), Image.BICUBIC)
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=config.jpeg_quality)
    return "jpg", out.getvalue()


def inspect_image(data: bytes, config: IngestConfig) -> dict[str, Any]:
    """Per-sample checks and hashes of one image's bytes."""
    record: dict[str, Any] = {"source_bytes": len(data), "drop_reason": "", "detail": ""}
    try:
        image, (width, height) = decode_image(data, config.quality.max_pixels)
    except Rejected as rejected:
        record.update(drop_reason=rejected.reason, detail=str(rejected)[:200])
        return record
    record.update(width=width, height=height)
    reason = size_reason(width, height, config.quality)
    if reason is None and is_blank(image, config.quality):
        reason = BLANK
    if reason:
        record["drop_reason"] = reason
        return record
    ext, payload = encode_for_shard(data, image, config)
    record.update(
        sha256=content_hash(data), phash=perceptual_hash(image), ext=ext, shard_bytes=len(payload)
    )
    return record


@dataclass(frozen=True)
class Job:
    """What every task of one ingest needs: where, how, and the sizes decided so far."""

    src: str
    dest: str
    options: StorageOptions
    config: IngestConfig
    list_file: str | None = None

    def area(self) -> WorkArea:
        return WorkArea(f"{self.dest.rstrip('/')}/{WORK}", self.options)

    def describe(self) -> dict[str, Any]:
        return {"src": self.src, "list": self.list_file,
                "config": self.config.model_dump(mode="json")}


def _stage(count: int, task: Callable[[int], dict], progress: Progress | None = None,
           amount: Callable[[dict], int] = lambda result: 1) -> list[dict]:
    """Run a pass; stops at the first outage a task reports. Returns the tasks' counters."""
    results = []
    for result in run_tasks(count, task):
        if result.get("storage_error"):
            kind = StorageUnavailable if result["unavailable"] else StorageError
            raise kind(result["storage_error"])
        if progress is not None:
            progress.add(amount(result), reused=result.get("reused", False))
        results.append(result)
    return results


def _once(area: WorkArea, marker: str, work: Callable[[], dict]) -> dict:
    """``work()``'s counters, or those it left when it ran before."""
    done = area.done(marker)
    if done is not None:
        return {**done, "reused": True}
    try:
        counters = work()
    except StorageError as err:  # crosses Ray Data as data: exceptions lose their type there
        return {"storage_error": str(err), "unavailable": isinstance(err, StorageUnavailable)}
    area.mark_done(marker, counters)
    return counters


# ------------------------------------------------------------------------------ 1. list

def _listing_units(job: Job) -> list[list]:
    """What the listing tasks list: [path, recursive] prefixes, or the files of ``--list``."""
    options = job.options
    if job.list_file:
        fs, root = open_filesystem(job.list_file, options)
        if not storage_call(job.list_file, options, fs.exists, root):
            raise StorageError(f"--list {options.describe(job.list_file)} does not exist")
        if storage_call(job.list_file, options, fs.isdir, root):
            files = sorted(storage_call(job.list_file, options, fs.find, root))
        else:
            files = [root]
        return [[fs.unstrip_protocol(f) if "://" in job.list_file else f, False] for f in files]
    fs, root = open_filesystem(job.src, options)
    call = lambda fn, *a, **k: storage_call(job.src, options, fn, *a, **k)  # noqa: E731
    if not call(fs.exists, root):
        raise StorageError(f"{options.describe(job.src)} does not exist")
    if call(fs.isfile, root):
        return [[root, False]]
    # Prefixes one level or two down, so that listing runs in parallel; files directly in an
    # expanded folder are listed on their own (not recursively).
    units, recursive = [], [root.rstrip("/")]
    for _ in range(2):
        if len(recursive) >= 64:
            break
        expanded = []
        for prefix in recursive:
            entries = call(fs.ls, prefix, detail=True)
            expanded += sorted(e["name"].rstrip("/") for e in entries
                               if e["type"] == "directory")
            if any(e["type"] != "directory" for e in entries):
                units.append([prefix, False])
        recursive = expanded
    return units + [[prefix, True] for prefix in recursive]


def _read_list_file(path: str, job: Job) -> list[str]:
    """The image paths a list file names: text (one per line), CSV or Parquet with a url, path
    or key (and optional bucket) column, e.g. an S3 Inventory."""
    import pyarrow.csv
    import pyarrow.parquet

    fs, _ = open_filesystem(job.list_file, job.options)
    _, root = open_filesystem(job.src, job.options)
    data = storage_call(job.list_file, job.options, fs.cat_file, path)
    if path.endswith(".parquet"):
        table = pyarrow.parquet.read_table(io.BytesIO(data))
    elif path.endswith(".csv"):
        table = pyarrow.csv.read_csv(io.BytesIO(data))
    else:
        lines = [line.strip() for line in data.decode().splitlines()]
        table = pa.table({"path": [line for line in lines if line]})
    columns = set(table.column_names)
    if "url" in columns or "path" in columns:
        values = table["url" if "url" in columns else "path"].to_pylist()
        entries = [v.split("://", 1)[1] if "://" in v else v for v in values]
        return [e if e.startswith(root.lstrip("/")) or e.startswith("/") else f"{root}/{e}"
                for e in entries]
    if "key" in columns:
        keys = table["key"].to_pylist()
        if "bucket" in columns:
            return [f"{b}/{k}" for b, k in zip(table["bucket"].to_pylist(), keys)]
        return [f"{root.rstrip('/')}/{k}" for k in keys]
    raise StorageError(f"--list {path}: needs a url, path or key column (has "
                       f"{', '.join(sorted(columns))})")


def _list_task(job: Job, units: list[list]) -> Callable[[int], dict]:
    def task(index: int) -> dict:
        area = job.area()

        def work() -> dict:
            path, recursive = units[index]
            fs, root = open_filesystem(job.src, job.options)
            if job.list_file:
                found = _read_list_file(path, job)
            elif recursive:
                found = storage_call(job.src, job.options, fs.find, path)
            else:
                found = [e["name"] for e in storage_call(job.src, job.options, fs.ls, path,
                                                         detail=True) if e["type"] != "directory"]
            paths = sorted(p for p in found if p.lower().endswith(RAW_IMAGE_SUFFIXES))
            prefix = root.rstrip("/") + "/"
            rel = [p[len(prefix):] if p.startswith(prefix) else p.rsplit("/", 1)[-1]
                   for p in paths]
            size = job.config.images_per_part
            parts = 0
            for start in range(0, len(paths), size):
                area.write_table(f"listing/u={index:06d}-{parts:04d}.parquet",
                                 pa.table({"path": paths[start:start + size],
                                           "rel": rel[start:start + size]}))
                parts += 1
            return {"images": len(paths), "parts": parts}

        return _once(area, f"listing/u={index:06d}", work)
    return task


# ------------------------------------------------------------------------------ 2. keys

def _keys_map(job: Job, listing: list[str], buckets: int) -> Callable[[int], dict]:
    def task(index: int) -> dict:
        area = job.area()

        def work() -> dict:
            table = area.read_table(f"listing/{listing[index]}")
            keys = [key_for(r) for r in table["rel"].to_pylist()]
            table = pa.table({"path": table["path"], "key0": keys})
            return {"rows": write_buckets(area, "keys-in", index, table,
                                          bucket_of(hash_strings(keys), buckets))}

        return _once(area, f"keys-in/m={index:06d}", work)
    return task


def _keys_reduce(job: Job) -> Callable[[int], dict]:
    schema = pa.schema([("path", pa.string()), ("key0", pa.string())])

    def task(index: int) -> dict:
        area = job.area()

        def work() -> dict:
            table = read_bucket(area, "keys-in", index, schema).sort_by(
                [("key0", "ascending"), ("path", "ascending")])
            key0 = table["key0"].to_numpy(zero_copy_only=False)
            # The second and later paths with one key (in path order) get -1, -2, ...
            first = np.r_[True, key0[1:] != key0[:-1]] if len(key0) else np.array([], bool)
            starts = np.maximum.accumulate(np.where(first, np.arange(len(key0)), 0))
            rank = np.arange(len(key0)) - starts
            keys = [k if r == 0 else f"{k}-{r}" for k, r in zip(key0.tolist(), rank.tolist())]
            area.write_table(f"images/{part_name(index)}",
                             pa.table({"path": table["path"], "key": keys}))
            return {"images": len(keys)}

        return _once(area, f"images/{part_name(index)}", work)
    return task


# ------------------------------------------------------------------------------ 3. inspect

RECORD_SCHEMA = pa.schema([
    ("key", pa.string()), ("path", pa.string()), ("source_bytes", pa.int64()),
    ("drop_reason", pa.string()), ("detail", pa.string()), ("width", pa.int64()),
    ("height", pa.int64()), ("sha256", pa.string()), ("phash", pa.uint64()),
    ("ext", pa.string()), ("shard_bytes", pa.int64()),
])


def _inspect_one(fs, path: str, job: Job) -> dict[str, Any]:
    try:
        data = storage_call(job.src, job.options, fs.cat_file, path)
    except StorageUnavailable:
        raise
    except StorageError as err:  # this object alone: gone since listing, access denied
        return {"source_bytes": 0, "drop_reason": READ_FAILED, "detail": str(err)[:200]}
    return inspect_image(data, job.config)


def _inspect_task(job: Job) -> Callable[[int], dict]:
    def task(index: int) -> dict:
        area = job.area()

        def work() -> dict:
            images = area.read_table(f"images/{part_name(index)}")
            fs, _ = open_filesystem(job.src, job.options)
            paths = images["path"].to_pylist()
            with ThreadPoolExecutor(max_workers=4) as pool:  # reads are I/O: overlap them
                records = list(pool.map(lambda p: _inspect_one(fs, p, job), paths))
            defaults = {"width": 0, "height": 0, "sha256": "", "phash": 0, "ext": "",
                        "shard_bytes": 0}
            columns = {name: [r.get(name, defaults.get(name)) for r in records]
                       for name in RECORD_SCHEMA.names if name not in ("key", "path")}
            table = pa.table({"key": images["key"], "path": images["path"], **columns},
                             schema=RECORD_SCHEMA)
            area.write_table(f"records/{part_name(index)}", table)
            reasons = Counter(r["drop_reason"] for r in records if r["drop_reason"])
            candidates = [r for r in records if not r["drop_reason"]]
            return {"images": len(records), "dropped": dict(reasons),
                    "candidates": len(candidates),
                    "candidate_bytes": sum(r["shard_bytes"] for r in candidates)}

        return _once(area, f"records/{part_name(index)}", work)
    return task


# ------------------------------------------------------------------------------ 4. exact

def _exact_map(job: Job, buckets: int) -> Callable[[int], dict]:
    def task(index: int) -> dict:
        area = job.area()

        def work() -> dict:
            records = area.read_table(f"records/{part_name(index)}")
            keep = np.asarray(records["drop_reason"].to_numpy(zero_copy_only=False) == "")
            records = records.filter(pa.array(keep))
            area_px = np.asarray(records["width"]) * np.asarray(records["height"])
            table = pa.table({"key": records["key"], "loc": np.full(len(records), index),
                              "sha256": records["sha256"], "phash": records["phash"],
                              "area": area_px})
            hashes = np.array([int(s[:16], 16) for s in records["sha256"].to_pylist()],
                              dtype=np.uint64)
            return {"rows": write_buckets(area, "exact-in", index, table,
                                          bucket_of(hashes, buckets))}

        return _once(area, f"exact-in/m={index:06d}", work)
    return task


EXACT_SCHEMA = pa.schema([("key", pa.string()), ("loc", pa.int64()), ("sha256", pa.string()),
                          ("phash", pa.uint64()), ("area", pa.int64())])


def _exact_reduce(job: Job) -> Callable[[int], dict]:
    def task(index: int) -> dict:
        area = job.area()

        def work() -> dict:
            table = read_bucket(area, "exact-in", index, EXACT_SCHEMA).sort_by(
                [("sha256", "ascending"), ("area", "descending"), ("key", "ascending")])
            sha = table["sha256"].to_numpy(zero_copy_only=False)
            first = np.r_[True, sha[1:] != sha[:-1]] if len(sha) else np.array([], bool)
            group_start = np.maximum.accumulate(np.where(first, np.arange(len(sha)), 0))
            reps = table.filter(pa.array(first))
            members = table.filter(pa.array(~first))
            member_rep = table.take(pa.array(group_start[~first]))
            area.write_table(f"reps/{part_name(index)}", reps.select(["key", "loc", "phash",
                                                                       "area"]))
            area.write_table(f"members/{part_name(index)}", pa.table({
                "key": members["key"], "loc": members["loc"], "rep": member_rep["key"]}))
            return {"reps": len(reps), "members": len(members)}

        return _once(area, f"reps/{part_name(index)}", work)
    return task


# ------------------------------------------------------------------------------ 5. near

NEAR_SCHEMA = pa.schema([("table", pa.int16()), ("tkey", pa.uint64()), ("phash", pa.uint64()),
                         ("area", pa.int64()), ("key", pa.string()), ("loc", pa.int64())])


def _near_map(job: Job, scheme: dedup.BlockScheme, buckets: int) -> Callable[[int], dict]:
    def task(index: int) -> dict:
        area = job.area()

        def work() -> dict:
            reps = area.read_table(f"reps/{part_name(index)}")
            phash = np.asarray(reps["phash"], dtype=np.uint64)
            tables = len(scheme.tables)
            table_id = np.repeat(np.arange(tables, dtype=np.int16), len(reps))
            tkey = (phash[None, :] & scheme.table_masks[:, None]).ravel()
            repeat = pa.array(np.tile(np.arange(len(reps)), tables))
            rows = pa.table({"table": table_id, "tkey": tkey}).append_column(
                "phash", pa.array(np.tile(phash, tables))).append_column(
                "area", reps["area"].take(repeat)).append_column(
                "key", reps["key"].take(repeat)).append_column("loc", reps["loc"].take(repeat))
            mixed = hash_integers(tkey ^ (table_id.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)))
            return {"rows": write_buckets(area, "near-in", index, rows, bucket_of(mixed, buckets))}

        return _once(area, f"near-in/m={index:06d}", work)
    return task


def _near_reduce(job: Job, scheme: dedup.BlockScheme) -> Callable[[int], dict]:
    def task(index: int) -> dict:
        area = job.area()

        def work() -> dict:
            rows = read_bucket(area, "near-in", index, NEAR_SCHEMA)
            first, second = dedup.grouped_pairs(
                np.asarray(rows["table"]), np.asarray(rows["tkey"], dtype=np.uint64),
                np.asarray(rows["phash"], dtype=np.uint64), scheme)
            key = rows["key"].to_numpy(zero_copy_only=False)
            area_px, loc = np.asarray(rows["area"]), np.asarray(rows["loc"])
            a_wins = dedup.better(area_px[first], key[first], area_px[second], key[second])
            winner = np.where(a_wins, first, second)
            loser = np.where(a_wins, second, first)
            edges = pa.table({"better": key[winner].tolist(), "better_area": area_px[winner],
                              "worse": key[loser].tolist(), "worse_loc": loc[loser],
                              "worse_area": area_px[loser]},
                             schema=EDGE_SCHEMA)
            area.write_table(f"edges/{part_name(index)}", edges)
            return {"edges": len(edges)}

        return _once(area, f"edges/{part_name(index)}", work)
    return task


EDGE_SCHEMA = pa.schema([("better", pa.string()), ("better_area", pa.int64()),
                         ("worse", pa.string()), ("worse_loc", pa.int64()),
                         ("worse_area", pa.int64())])
VERTEX_SCHEMA = pa.schema([("key", pa.string()), ("loc", pa.int64()), ("worse", pa.bool_())])
STATUS_SCHEMA = pa.schema([("key", pa.string()), ("loc", pa.int64()), ("status", pa.int8()),
                           ("of", pa.string())])
JOIN_SCHEMA = pa.schema([("worse", pa.string()), ("better", pa.string()),
                         ("better_area", pa.int64()), ("better_status", pa.int8())])


def _graph_map(job: Job, buckets: int) -> Callable[[int], dict]:
    """Edges to the graph's buckets: its vertices by key, its edges by their better image."""
    def task(index: int) -> dict:
        area = job.area()

        def work() -> dict:
            edges = area.read_table(f"edges/{part_name(index)}")
            vertices = pa.concat_tables([
                pa.table({"key": edges["better"], "loc": pa.nulls(len(edges), pa.int64()),
                          "worse": pa.array(np.zeros(len(edges), bool))}, schema=VERTEX_SCHEMA),
                pa.table({"key": edges["worse"], "loc": edges["worse_loc"],
                          "worse": pa.array(np.ones(len(edges), bool))}, schema=VERTEX_SCHEMA),
            ])
            write_buckets(area, "vertices", index, vertices,
                          bucket_of(hash_strings(vertices["key"]), buckets))
            write_buckets(area, "edges-by-better", index, edges,
                          bucket_of(hash_strings(edges["better"]), buckets))
            return {"edges": len(edges)}

        return _once(area, f"vertices/m={index:06d}", work)
    return task


def _status_init(job: Job) -> Callable[[int], dict]:
    """Images with no better neighbour are kept; the others wait for the rounds."""
    def task(index: int) -> dict:
        area = job.area()

        def work() -> dict:
            vertices = read_bucket(area, "vertices", index, VERTEX_SCHEMA).sort_by(
                [("key", "ascending"), ("worse", "descending")])
            key = vertices["key"].to_numpy(zero_copy_only=False)
            first = np.r_[True, key[1:] != key[:-1]] if len(key) else np.array([], bool)
            firsts = vertices.filter(pa.array(first))  # a worse row first, if the key has one
            status = np.where(np.asarray(firsts["worse"]), dedup.UNDECIDED,
                              dedup.KEPT).astype(np.int8)
            area.write_table(f"status-0/{part_name(index)}", pa.table(
                {"key": firsts["key"], "loc": firsts["loc"], "status": status,
                 "of": pa.nulls(len(firsts), pa.string())}, schema=STATUS_SCHEMA))
            return {"undecided": int((status == dedup.UNDECIDED).sum())}

        return _once(area, f"status-0/{part_name(index)}", work)
    return task


def _round_join(job: Job, round_: int, buckets: int) -> Callable[[int], dict]:
    """Each edge, with the current status of its better image, to its worse image's bucket."""
    def task(index: int) -> dict:
        area = job.area()

        def work() -> dict:
            status = area.read_table(f"status-{round_}/{part_name(index)}")
            edges = read_bucket(area, "edges-by-better", index, EDGE_SCHEMA)
            lookup = dict(zip(status["key"].to_pylist(), status["status"].to_pylist()))
            better_status = np.array([lookup[k] for k in edges["better"].to_pylist()],
                                     dtype=np.int8)
            joined = pa.table({"worse": edges["worse"], "better": edges["better"],
                               "better_area": edges["better_area"],
                               "better_status": better_status}, schema=JOIN_SCHEMA)
            return {"rows": write_buckets(area, f"join-{round_}", index, joined,
                                          bucket_of(hash_strings(joined["worse"]), buckets))}

        return _once(area, f"join-{round_}/m={index:06d}", work)
    return task


def _round_update(job: Job, round_: int) -> Callable[[int], dict]:
    def task(index: int) -> dict:
        area = job.area()

        def work() -> dict:
            status = area.read_table(f"status-{round_}/{part_name(index)}")
            joined = read_bucket(area, f"join-{round_}", index, JOIN_SCHEMA).sort_by(
                [("worse", "ascending"), ("better_area", "descending"), ("better", "ascending")])
            images, decided, of = dedup.resolve_round(
                joined["worse"].to_numpy(zero_copy_only=False),
                joined["better"].to_numpy(zero_copy_only=False),
                np.asarray(joined["better_status"]))
            keys = status["key"].to_pylist()
            new_status = status["status"].to_numpy(zero_copy_only=False).copy()
            new_of = status["of"].to_pylist()
            position = {k: i for i, k in enumerate(keys)}
            for image, value, original in zip(images.tolist(), decided.tolist(), of.tolist()):
                i = position[image]
                if new_status[i] == dedup.UNDECIDED:
                    new_status[i] = value
                    new_of[i] = original if value == dedup.DROPPED else None
            area.write_table(f"status-{round_ + 1}/{part_name(index)}", pa.table(
                {"key": keys, "loc": status["loc"], "status": new_status, "of": new_of},
                schema=STATUS_SCHEMA))
            return {"undecided": int((new_status == dedup.UNDECIDED).sum())}

        return _once(area, f"status-{round_ + 1}/{part_name(index)}", work)
    return task


# ------------------------------------------------------------------------------ decisions

DECISION_SCHEMA = pa.schema([("key", pa.string()), ("reason", pa.string()), ("of", pa.string())])


def _members_map(job: Job, buckets: int) -> Callable[[int], dict]:
    def task(index: int) -> dict:
        area = job.area()

        def work() -> dict:
            members = area.read_table(f"members/{part_name(index)}")
            return {"rows": write_buckets(area, "members-by-rep", index, members,
                                          bucket_of(hash_strings(members["rep"]), buckets))}

        return _once(area, f"members-by-rep/m={index:06d}", work)
    return task


def _decide(job: Job, final_round: int, graph_buckets: int, parts: int) -> Callable[[int], dict]:
    """Drops of one graph bucket, sent to their records' parts: near-duplicate images, and
    exact copies of every image of the bucket (of the image if kept, else of what it copies)."""
    members_schema = pa.schema([("key", pa.string()), ("loc", pa.int64()),
                                ("rep", pa.string())])

    def task(index: int) -> dict:
        area = job.area()

        def work() -> dict:
            status = (area.read_table(f"status-{final_round}/{part_name(index)}")
                      if graph_buckets else STATUS_SCHEMA.empty_table())
            members = read_bucket(area, "members-by-rep", index, members_schema)
            dropped = status.filter(pa.array(
                np.asarray(status["status"].to_numpy(zero_copy_only=False)) == dedup.DROPPED))
            of_dropped = dict(zip(dropped["key"].to_pylist(), dropped["of"].to_pylist()))
            member_reason = [NEAR_DUPLICATE if rep in of_dropped else EXACT_DUPLICATE
                             for rep in members["rep"].to_pylist()]
            member_of = [of_dropped.get(rep, rep) for rep in members["rep"].to_pylist()]
            decisions = pa.concat_tables([
                pa.table({"key": dropped["key"],
                          "reason": [NEAR_DUPLICATE] * len(dropped), "of": dropped["of"]},
                         schema=DECISION_SCHEMA),
                pa.table({"key": members["key"], "reason": member_reason, "of": member_of},
                         schema=DECISION_SCHEMA),
            ])
            locations = np.concatenate([np.asarray(dropped["loc"].to_numpy(zero_copy_only=False),
                                                   dtype=np.int64),
                                        np.asarray(members["loc"], dtype=np.int64)])
            return {"rows": write_buckets(area, "decisions", index, decisions, locations)}

        return _once(area, f"decisions/m={index:06d}", work)
    return task


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
            return {"kept": int(kept.sum()), "kept_bytes": int(np.asarray(rows["shard_bytes"]).sum()),
                    "dropped": {r: len(v) for r, v in by_reason.items()},
                    "examples": examples, "duplicate_of": duplicate_of}

        return _once(area, f"shuffle/m={index:06d}", work)
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

        return _once(area, f"plan/{part_name(index)}", work)
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

        return _once(area, f"shards/{name}", work)
    return task


# ------------------------------------------------------------------------------ the job

def _check_destination(job: Job, overwrite: bool, log: Callable[[str], None]) -> tuple[bool, bool]:
    """Make DEST ready; returns (whether an unfinished ingest of this job is resumed, whether
    DEST existed before)."""
    options, dest = job.options, job.dest
    fs, root = open_filesystem(dest, options)
    root = root.rstrip("/")
    call = lambda fn, *a, **k: storage_call(dest, options, fn, *a, **k)  # noqa: E731
    existed = call(fs.exists, root)
    existing = call(fs.glob, f"{root}/shard-*.tar") if existed else []
    has_manifest = call(fs.exists, f"{root}/{MANIFEST}")
    area = job.area()
    previous = json.loads(area.get(JOB)) if area.exists(JOB) else None
    resumable = previous == job.describe() and not has_manifest
    if (existing or has_manifest or previous) and not (overwrite or resumable):
        if previous is not None and not has_manifest:
            raise StorageError(
                f"{options.describe(dest)} holds an unfinished ingest with other options or "
                "source: rerun it with the same ones to resume, or pass --overwrite")
        raise StorageError(
            f"{options.describe(dest)} already holds shards: choose another DEST or pass --overwrite"
        )
    # Prove we can write before hours of work: create the prefix and a probe object.
    probe = f"{root}/.ssl-pretrain-write-check"
    call(fs.makedirs, root, exist_ok=True)
    call(fs.pipe, probe, b"ok")
    call(fs.rm, probe)
    if resumable:
        log(f"ingest: resuming the unfinished ingest in {options.describe(dest)}")
        return True, existed
    for stale in existing + ([f"{root}/{MANIFEST}"] if has_manifest else []):
        call(fs.rm, stale)
    area.remove()
    area.put(JOB, json.dumps(job.describe(), sort_keys=True).encode())
    return False, existed


class IngestMetrics:
    """Ingest progress as Prometheus series on a plain prometheus_client endpoint.

    Ingest's driver runs on one machine outside Ray's metrics system's reach for a short-lived
    command, so it serves ``ssl_ingest_*`` itself when given a port.
    """

    def __init__(self, port: int | None, address: str = "127.0.0.1"):
        self.enabled = port is not None
        if not self.enabled:
            return
        from prometheus_client import CollectorRegistry, Gauge, start_http_server

        self.registry = CollectorRegistry()
        self.images = Gauge("ssl_ingest_images", "Images by stage of the ingest",
                            ["src", "state"], registry=self.registry)
        self.dropped = Gauge("ssl_ingest_images_dropped", "Images dropped, by reason",
                             ["src", "reason"], registry=self.registry)
        self.shards = Gauge("ssl_ingest_shards_written", "Shards written", ["src"],
                            registry=self.registry)
        self.bytes = Gauge("ssl_ingest_bytes_written", "Bytes of shards written", ["src"],
                           registry=self.registry)
        self.server, self.thread = start_http_server(port, addr=address, registry=self.registry)

    def set(self, src: str, found: int = 0, kept: int = 0, dropped: dict | None = None,
            shards: int = 0, written: int = 0) -> None:
        if not self.enabled:
            return
        self.images.labels(src, "found").set(found)
        self.images.labels(src, "kept").set(kept)
        for reason, count in (dropped or {}).items():
            self.dropped.labels(src, reason).set(count)
        self.shards.labels(src).set(shards)
        self.bytes.labels(src).set(written)


def _sum(results: list[dict], key: str) -> int:
    return sum(int(r.get(key, 0)) for r in results)


def _dedup(job: Job, parts: int, candidates: int, log: Callable[[str], None]) -> int:
    """Exact and near duplicates of the records parts, decided into ``decisions``; returns how
    many images were dropped as duplicates."""
    area = job.area()
    exact_buckets = buckets_for(candidates, ROWS_PER_BUCKET["exact"])
    _stage(parts, _exact_map(job, exact_buckets))
    exact = _stage(exact_buckets, _exact_reduce(job))
    reps = _sum(exact, "reps")
    scheme = dedup.choose_scheme(job.config.quality.near_duplicate_distance, reps)
    near_buckets = buckets_for(reps * len(scheme.tables), ROWS_PER_BUCKET["near"])
    log(f"ingest: near duplicates: {reps} distinct images, {scheme.blocks} blocks, "
        f"{len(scheme.tables)} tables, {near_buckets} buckets")
    _stage(exact_buckets, _near_map(job, scheme, near_buckets))
    edges = _sum(_stage(near_buckets, _near_reduce(job, scheme)), "edges")
    graph_buckets = buckets_for(2 * edges, ROWS_PER_BUCKET["graph"])
    _stage(near_buckets, _graph_map(job, graph_buckets))
    undecided = _sum(_stage(graph_buckets, _status_init(job)), "undecided")
    round_ = 0
    while undecided:
        _stage(graph_buckets, _round_join(job, round_, graph_buckets))
        undecided = _sum(_stage(graph_buckets, _round_update(job, round_)), "undecided")
        round_ += 1
    log(f"ingest: near duplicates: {edges} pairs within "
        f"{job.config.quality.near_duplicate_distance} bits, resolved in {round_} round(s)")
    _stage(exact_buckets, _members_map(job, graph_buckets))
    decided = _stage(graph_buckets, _decide(job, round_, graph_buckets, parts))
    return _sum(decided, "rows")


def ingest(
    src: str,
    dest: str,
    config: IngestConfig,
    options: StorageOptions | None = None,
    overwrite: bool = False,
    address: str | None = None,
    log: Callable[[str], None] = print,
    metrics: IngestMetrics | None = None,
    list_file: str | None = None,
) -> dict[str, Any]:
    """Run the whole ingest (or the rest of an unfinished one); returns the manifest."""
    metrics = metrics or IngestMetrics(None)
    # The endpoint is fixed here, on the driver; credentials stay in each node's environment
    # (a Secret in Kubernetes) unless given explicitly.
    options = (options or StorageOptions()).with_environment_endpoint()
    started = time.time()
    job = Job(src, dest, options, config, list_file)
    units = _listing_units(job)
    resumed, existed = _check_destination(job, overwrite, log)
    area = job.area()

    def give_up(message: str):
        """Stop on unusable input, leaving DEST as it was found."""
        area.remove()
        fs, root = open_filesystem(dest, options)
        if not existed and storage_call(dest, options, fs.exists, root):  # all of it is ours
            storage_call(dest, options, fs.rm, root, recursive=True)
        raise StorageError(message)

    ray = ensure_ray(address)

    listed = _stage(len(units), _list_task(job, units))
    found = _sum(listed, "images")
    if not found:
        give_up(f"no images under {options.describe(src)} (looked for "
                f"{', '.join(RAW_IMAGE_SUFFIXES)})")
    log(f"ingest: {found} images under {options.describe(src)}")
    metrics.set(src, found=found)
    listing = sorted(n for n in area.listdir("listing") if n.endswith(".parquet"))
    parts = buckets_for(found, config.images_per_part)
    _stage(len(listing), _keys_map(job, listing, parts))
    _stage(parts, _keys_reduce(job))

    progress = Progress("inspected", found, "images", log)
    inspected = _stage(parts, _inspect_task(job), progress, lambda r: r["images"])
    log(progress.line())
    if resumed:
        log(f"ingest: resumed: {progress.reused} of {found} images already processed")
    quality_drops = Counter()
    for result in inspected:
        quality_drops.update(result["dropped"])
    candidates = _sum(inspected, "candidates")
    if not candidates:
        give_up(f"no usable images under {options.describe(src)}: every image was dropped")

    _dedup(job, parts, candidates, log)
    candidate_bytes = _sum(inspected, "candidate_bytes")
    if config.samples_per_shard:
        write_buckets_count = buckets_for(candidates,
                                          config.samples_per_shard * SHARDS_PER_WRITE_BUCKET)
    else:
        write_buckets_count = buckets_for(candidate_bytes,
                                          config.shard_bytes * SHARDS_PER_WRITE_BUCKET)
    kept_results = _stage(parts, _kept_task(job, write_buckets_count))
    kept = _sum(kept_results, "kept")
    dropped = Counter()
    examples: dict[str, list[str]] = {}
    duplicate_of: list = []
    for result in kept_results:
        dropped.update(result["dropped"])
        for reason, keys in result["examples"].items():
            examples[reason] = _smallest(examples.get(reason, []) + keys,
                                         config.examples_per_reason)
        duplicate_of = _smallest(duplicate_of + [tuple(p) for p in result["duplicate_of"]],
                                 EXAMPLES_OF_DUPLICATES)
    dropped_counts = {reason: dropped.get(reason, 0) for reason in DROP_REASONS}
    log(f"ingest: keeping {kept} of {found} images; dropped "
        + (", ".join(f"{n} {r}" for r, n in sorted(dropped.items()) if n) or "none"))
    metrics.set(src, found=found, kept=kept, dropped=dropped_counts)

    plans = _stage(write_buckets_count, _plan_task(job))
    offsets = np.r_[0, np.cumsum([p["shards"] for p in plans])].astype(int).tolist()
    total_shards = offsets[-1]
    progress = Progress("written", kept, "images", log)
    written = _stage(total_shards, _write_task(job, offsets[:-1]), progress,
                     lambda r: r["samples"])
    log(progress.line())
    if resumed and progress.reused:
        log(f"ingest: resumed: {sum(1 for r in written if r.get('reused'))} of {total_shards} "
            "shards already written")
    shards = sorted(({k: r[k] for k in ("name", "samples", "bytes", "sha256")} for r in written),
                    key=lambda s: s["name"])

    fs, root = open_filesystem(dest, options)
    root = root.rstrip("/")
    report = {
        "source": src,
        "input_images": found,
        "kept_images": kept,
        "dropped": dropped_counts,
        "examples": {reason: keys for reason, keys in sorted(examples.items())},
        "duplicate_of": {key: original for key, original in duplicate_of},
    }
    manifest = {
        "format": "webdataset",
        "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "source": src,
        "config": config.model_dump(mode="json"),
        "total_samples": sum(s["samples"] for s in shards),
        "total_bytes": sum(s["bytes"] for s in shards),
        "shards": shards,
    }
    storage_call(dest, options, fs.pipe, f"{root}/{QUALITY_REPORT}",
                 json.dumps(report, indent=2).encode())
    storage_call(dest, options, fs.pipe, f"{root}/{MANIFEST}",
                 json.dumps(manifest, indent=2).encode())
    area.remove()
    metrics.set(src, found=found, kept=kept, dropped=dropped_counts,
                shards=len(shards), written=manifest["total_bytes"])
    log(f"ingest: wrote {len(shards)} shards ({manifest['total_samples']} images, "
        f"{manifest['total_bytes'] / 1e6:.1f} MB) to {options.describe(dest)} "
        f"in {time.time() - started:.1f} s")
    return manifest
