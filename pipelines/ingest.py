"""``ssl-pretrain ingest SRC DEST``: raw images to quality-filtered WebDataset shards.

Two parallel passes on Ray Data with a global step between them:
1. inspect every image (decode, per-sample quality checks, content and perceptual hashes, the size
   it will have in a shard) and bring the small per-image records to the driver;
2. on the driver, drop exact and near duplicates across the whole input and plan the shards;
3. write the shards in parallel, then ``quality_report.json`` and, last, ``manifest.json`` (its
   presence marks a complete ingest).
Images are read twice rather than held in memory: the input may be far larger than the cluster.
Nothing is written to DEST until SRC and DEST have both been checked.
"""

from __future__ import annotations

import io
import json
import posixpath
import re
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Annotated, Any, Literal

import numpy as np
from PIL import Image
from pydantic import Field, model_validator

from pipelines.cluster import ensure_ray
from pipelines.decode import Rejected, decode_image
from pipelines.quality import (
    BLANK,
    DROP_REASONS,
    QualityConfig,
    content_hash,
    is_blank,
    perceptual_hash,
    select_unique,
    size_reason,
)
from pipelines.settings import StrictSection
from pipelines.shards import shard_name, write_shard
from pipelines.sources import RAW_IMAGE_SUFFIXES
from pipelines.storage import StorageError, StorageOptions, open_filesystem, storage_call

MANIFEST = "manifest.json"
QUALITY_REPORT = "quality_report.json"


class IngestConfig(StrictSection):
    """How raw images become shards."""

    samples_per_shard: Annotated[int, Field(ge=1)] | None = None
    shard_bytes: Annotated[int, Field(ge=1024)] = 256 * 1024 * 1024
    reencode: Literal["keep", "jpeg"] = "keep"
    jpeg_quality: Annotated[int, Field(ge=1, le=100)] = 90
    max_side: Annotated[int, Field(ge=16)] | None = None
    quality: QualityConfig = QualityConfig()
    examples_per_reason: Annotated[int, Field(ge=0)] = 5

    @model_validator(mode="after")
    def _max_side_needs_reencoding(self) -> "IngestConfig":
        if self.max_side is not None and self.reencode == "keep":
            raise ValueError("max_side needs reencode: jpeg (kept bytes cannot be resized)")
        return self


def key_for(relative_path: str) -> str:
    """A WebDataset key from a path: no suffix, and no dots (they separate key and extension)."""
    stem = posixpath.splitext(relative_path)[0]
    return re.sub(r"[^A-Za-z0-9_/-]", "_", stem).strip("/") or "image"


def list_images(src: str, options: StorageOptions) -> tuple[list[str], list[str]]:
    """Image files under ``src`` (full fsspec paths) and their unique keys, sorted by path."""
    fs, root = open_filesystem(src, options)
    if not storage_call(src, options, fs.exists, root):
        raise StorageError(f"{options.describe(src)} does not exist")
    found = storage_call(src, options, fs.find, root)
    paths = sorted(p for p in found if p.lower().endswith(RAW_IMAGE_SUFFIXES))
    if not paths:
        raise StorageError(
            f"no images under {options.describe(src)} (looked for {', '.join(RAW_IMAGE_SUFFIXES)})"
        )
    keys, seen = [], Counter()
    prefix = root.rstrip("/") + "/"
    for path in paths:
        key = key_for(path[len(prefix):] if path.startswith(prefix) else path.rsplit("/", 1)[-1])
        seen[key] += 1
        keys.append(key if seen[key] == 1 else f"{key}-{seen[key] - 1}")
    return paths, keys


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


def _inspect_batch(batch: dict[str, np.ndarray], src: str, options: StorageOptions,
                   config: IngestConfig) -> dict[str, list]:
    fs, _ = open_filesystem(src, options)
    rows = []
    for path in batch["path"]:
        try:
            data = storage_call(src, options, fs.cat_file, path)
        except StorageError as err:
            # Reported to the driver as data: exceptions lose their type crossing Ray Data.
            rows.append({"path": path, "storage_error": str(err)})
            continue
        rows.append({"path": path, **inspect_image(data, config)})
    columns = ("path", "source_bytes", "drop_reason", "detail", "width", "height", "sha256",
               "phash", "ext", "shard_bytes", "storage_error")
    defaults = {"source_bytes": 0, "drop_reason": "", "detail": "", "width": 0, "height": 0,
                "sha256": "", "phash": "0", "ext": "", "shard_bytes": 0, "storage_error": ""}
    out = {c: [r.get(c, defaults.get(c)) for r in rows] for c in columns}
    out["phash"] = [str(v) for v in out["phash"]]  # 64-bit unsigned: carried as text
    return out


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


def _write_shard_row(row: dict[str, Any], src: str, dest: str, options: StorageOptions,
                     config: IngestConfig) -> dict[str, Any]:
    src_fs, _ = open_filesystem(src, options)
    dest_fs, dest_root = open_filesystem(dest, options)
    samples = json.loads(row["samples"])

    def generate():
        for sample in samples:
            data = storage_call(src, options, src_fs.cat_file, sample["path"])
            image, _ = decode_image(data, config.quality.max_pixels)
            ext, payload = encode_for_shard(data, image, config)
            yield sample["key"], ext, payload, sample["metadata"]

    name = shard_name(int(row["index"]))
    path = f"{dest_root.rstrip('/')}/{name}"
    try:
        with storage_call(dest, options, dest_fs.open, path, "wb") as sink:
            written = write_shard(sink, generate())
    except StorageError as err:
        return {"name": name, "samples": 0, "bytes": 0, "sha256": "", "storage_error": str(err)}
    return {"name": name, **written, "storage_error": ""}


def _raise_storage_errors(rows: list[dict[str, Any]]) -> None:
    failed = [row["storage_error"] for row in rows if row.get("storage_error")]
    if failed:
        more = f" ({len(failed) - 1} more like it)" if len(failed) > 1 else ""
        raise StorageError(failed[0] + more)


def _check_destination(dest: str, options: StorageOptions, overwrite: bool) -> None:
    fs, root = open_filesystem(dest, options)
    root = root.rstrip("/")
    existing = storage_call(dest, options, fs.glob, f"{root}/shard-*.tar")
    has_manifest = storage_call(dest, options, fs.exists, f"{root}/{MANIFEST}")
    if (existing or has_manifest) and not overwrite:
        raise StorageError(
            f"{options.describe(dest)} already holds shards: choose another DEST or pass --overwrite"
        )
    # Prove we can write before hours of work: create the prefix and a probe object.
    probe = f"{root}/.ssl-pretrain-write-check"
    storage_call(dest, options, fs.makedirs, root, exist_ok=True)
    storage_call(dest, options, fs.pipe, probe, b"ok")
    storage_call(dest, options, fs.rm, probe)
    for stale in existing + ([f"{root}/{MANIFEST}"] if has_manifest else []):
        storage_call(dest, options, fs.rm, stale)


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


def ingest(
    src: str,
    dest: str,
    config: IngestConfig,
    options: StorageOptions | None = None,
    overwrite: bool = False,
    address: str | None = None,
    log: Callable[[str], None] = print,
    metrics: IngestMetrics | None = None,
) -> dict[str, Any]:
    """Run the whole ingest; returns the manifest it wrote."""
    metrics = metrics or IngestMetrics(None)
    # The endpoint is fixed here, on the driver; credentials stay in each node's environment
    # (a Secret in Kubernetes) unless given explicitly.
    options = (options or StorageOptions()).with_environment_endpoint()
    started = time.time()
    paths, keys = list_images(src, options)
    _check_destination(dest, options, overwrite)
    log(f"ingest: {len(paths)} images under {options.describe(src)}")
    metrics.set(src, found=len(paths))

    ray = ensure_ray(address)
    import ray.data

    inspected = (
        ray.data.from_items([{"path": p} for p in paths],
                            override_num_blocks=max(1, min(len(paths) // 8, 1000)))
        .map_batches(_inspect_batch, batch_size=16,
                     fn_kwargs={"src": src, "options": options, "config": config})
        .take_all()
    )
    _raise_storage_errors(inspected)
    by_path = {row["path"]: row for row in inspected}
    records = [by_path[p] for p in paths]

    reasons: dict[str, list[str]] = defaultdict(list)
    candidates = []
    for key, record in zip(keys, records):
        if record["drop_reason"]:
            reasons[record["drop_reason"]].append(key)
        else:
            candidates.append((key, record))
    # Larger images win a duplicate group; ties go to the first path.
    priority = [(-(r["width"] * r["height"]), i) for i, (_, r) in enumerate(candidates)]
    duplicates = select_unique(
        [r["sha256"] for _, r in candidates], [int(r["phash"]) for _, r in candidates],
        priority, config.quality.near_duplicate_distance,
    )
    duplicate_of = {}
    for index, (reason, original) in duplicates.items():
        reasons[reason].append(candidates[index][0])
        duplicate_of[candidates[index][0]] = candidates[original][0]
    kept = [c for i, c in enumerate(candidates) if i not in duplicates]
    log(f"ingest: keeping {len(kept)} of {len(paths)} images; dropped "
        + (", ".join(f"{len(v)} {k}" for k, v in sorted(reasons.items())) or "none"))
    dropped_counts = {reason: len(reasons.get(reason, [])) for reason in DROP_REASONS}
    metrics.set(src, found=len(paths), kept=len(kept), dropped=dropped_counts)
    if not kept:
        raise StorageError(f"no usable images under {options.describe(src)}: every image was dropped")

    plans = plan_shards([r["shard_bytes"] for _, r in kept], config)
    rows = [
        {"index": index, "samples": json.dumps([
            {"path": kept[i][1]["path"], "key": kept[i][0],
             "metadata": {"key": kept[i][0], "width": kept[i][1]["width"],
                          "height": kept[i][1]["height"], "sha256": kept[i][1]["sha256"],
                          "phash": f"{int(kept[i][1]['phash']):016x}",
                          "source": kept[i][1]["path"]}}
            for i in plan
        ])}
        for index, plan in enumerate(plans)
    ]
    written = (
        ray.data.from_items(rows, override_num_blocks=len(rows))
        .map(_write_shard_row, fn_kwargs={"src": src, "dest": dest, "options": options,
                                          "config": config})
        .take_all()
    )
    _raise_storage_errors(written)
    shards = sorted(({k: v for k, v in s.items() if k != "storage_error"} for s in written),
                    key=lambda s: s["name"])

    fs, root = open_filesystem(dest, options)
    root = root.rstrip("/")
    report = {
        "source": src,
        "input_images": len(paths),
        "kept_images": len(kept),
        "dropped": dropped_counts,
        "examples": {reason: sorted(keys_)[: config.examples_per_reason]
                     for reason, keys_ in sorted(reasons.items())},
        "duplicate_of": {k: duplicate_of[k] for k in sorted(duplicate_of)[:100]},
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
    metrics.set(src, found=len(paths), kept=len(kept), dropped=dropped_counts,
                shards=len(shards), written=manifest["total_bytes"])
    log(f"ingest: wrote {len(shards)} shards ({manifest['total_samples']} images, "
        f"{manifest['total_bytes'] / 1e6:.1f} MB) to {options.describe(dest)} "
        f"in {time.time() - started:.1f} s")
    return manifest
