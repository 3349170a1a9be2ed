"""Ingest's first passes: list the images, give each a unique key, inspect every image.

Outputs, under the work prefix: ``listing/`` (paths, a part per listing unit and 10k images),
``images/`` (path and unique key, bucketed by key) and ``records/`` (per image: size, drop
reason, content and perceptual hash, shard size), the parts every later pass reads. A record part
is the unit of resume of the most expensive pass: ``--images-per-part`` images.
"""

from __future__ import annotations

import io
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pyarrow as pa
from PIL import Image

from pipelines.ingest.config import IngestConfig, Job, key_for
from pipelines.ingest.workarea import (
    Progress,
    bucket_of,
    buckets_for,
    hash_strings,
    once,
    part_name,
    read_bucket,
    run_stage,
    run_starts,
    total,
    write_buckets,
)
from pipelines.storage.access import (
    StorageError,
    StorageUnavailable,
    open_filesystem,
    storage_call,
)
from pipelines.stream.sources import RAW_IMAGE_SUFFIXES
from pipelines.views.decode import Rejected, decode_image
from pipelines.views.quality import (
    BLANK,
    READ_FAILED,
    content_hash,
    is_blank,
    perceptual_hash,
    size_reason,
)


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


# ------------------------------------------------------------------------------ 1. list

def listing_units(job: Job) -> list[list]:
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
    top = call(fs.ls, root, detail=True)
    if not any(e["type"] == "directory" or e["name"].lower().endswith(RAW_IMAGE_SUFFIXES)
               for e in top):  # said before any cluster work
        raise StorageError(f"no images under {options.describe(job.src)} (looked for "
                           f"{', '.join(RAW_IMAGE_SUFFIXES)})")
    units, recursive = [], [root.rstrip("/")]
    for _ in range(2):
        if len(recursive) >= 64:
            break
        expanded = []
        for prefix in recursive:
            entries = top if prefix == root.rstrip("/") else call(fs.ls, prefix, detail=True)
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

        return once(area, f"listing/u={index:06d}", work)
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

        return once(area, f"keys-in/m={index:06d}", work)
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
            first = run_starts(key0)
            starts = np.maximum.accumulate(np.where(first, np.arange(len(key0)), 0))
            rank = np.arange(len(key0)) - starts
            keys = [k if r == 0 else f"{k}-{r}" for k, r in zip(key0.tolist(), rank.tolist())]
            area.write_table(f"images/{part_name(index)}",
                             pa.table({"path": table["path"], "key": keys}))
            return {"images": len(keys)}

        return once(area, f"images/{part_name(index)}", work)
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

        return once(area, f"records/{part_name(index)}", work)
    return task


def make_records(job: Job, units: list[list], log: Callable[[str], None],
                 resumed: bool) -> tuple[int, int, list[dict]]:
    """List, key and inspect every image: (images found, record parts, the parts' counters)."""
    area = job.area()
    found = total(run_stage(len(units), _list_task(job, units)), "images")
    if not found:
        return 0, 0, []
    log(f"ingest: {found} images under {job.options.describe(job.src)}")
    listing = sorted(n for n in area.listdir("listing") if n.endswith(".parquet"))
    parts = buckets_for(found, job.config.images_per_part)
    run_stage(len(listing), _keys_map(job, listing, parts))
    run_stage(parts, _keys_reduce(job))
    progress = Progress("inspected", found, "images", log)
    inspected = run_stage(parts, _inspect_task(job), progress, lambda r: r["images"])
    log(progress.line())
    if resumed:
        log(f"ingest: resumed: {progress.reused} of {found} images already processed")
    return found, parts, inspected
