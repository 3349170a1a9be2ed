"""``ssl-pretrain ingest SRC DEST``: raw images to shuffled, quality-filtered WebDataset shards.

A Ray Data job end to end, in passes over Parquet parts under ``DEST/_ingest/``
(``pipelines.ingest.workarea``); the driver holds counters, the shard plan's summary and the manifest,
never a per-image record:
1. **records** (``records.py``): prefixes of SRC listed in parallel (or the objects of
   ``--list``), a unique key per image, every image read, checked and hashed;
2. **duplicates** (``duplicates.py``): exact copies by content hash, near copies by perceptual
   hash within ``near_duplicate_distance`` bits (``pipelines.ingest.dedup``), and the greedy keep rule;
3. **shards** (``output.py``): kept images in a seeded random order, cut by bytes or count and
   written in parallel; then ``quality_report.json`` and, last, ``manifest.json`` (its presence
   marks a complete ingest), and the work prefix is removed.
Every task writes its outputs, then a done marker: a killed ingest, rerun with the same command,
reuses what was finished. Images are read twice (inspect, write) rather than held anywhere.
Nothing is written to DEST until SRC and DEST have both been checked.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

from pipelines.cluster import ensure_ray
from pipelines.ingest.config import (
    JOB,
    MANIFEST,
    QUALITY_REPORT,
    IngestConfig,
    Job,
    key_for,
)
from pipelines.ingest.duplicates import find_duplicates
from pipelines.ingest.output import plan_shards, shuffle_and_plan, write_shards
from pipelines.ingest.records import (
    encode_for_shard,
    inspect_image,
    listing_units,
    make_records,
)
from pipelines.ingest.workarea import total
from pipelines.storage.access import (
    StorageError,
    StorageOptions,
    open_filesystem,
    storage_call,
)
from pipelines.stream.sources import RAW_IMAGE_SUFFIXES
from pipelines.views.quality import DROP_REASONS

__all__ = ["IngestConfig", "IngestMetrics", "ingest", "key_for", "inspect_image",
           "encode_for_shard", "plan_shards", "MANIFEST", "QUALITY_REPORT"]


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
            f"{options.describe(dest)} already holds shards: choose another DEST or pass "
            "--overwrite"
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
    units = listing_units(job)
    resumed, existed = _check_destination(job, overwrite, log)
    ensure_ray(address)

    found, parts, inspected = make_records(job, units, log, resumed)
    if not found:
        _give_up(job, existed, f"no images under {options.describe(src)} (looked for "
                               f"{', '.join(RAW_IMAGE_SUFFIXES)})")
    metrics.set(src, found=found)
    candidates = total(inspected, "candidates")
    if not candidates:
        _give_up(job, existed,
                 f"no usable images under {options.describe(src)}: every image was dropped")
    find_duplicates(job, parts, candidates, log)
    summary = shuffle_and_plan(job, parts, candidates, total(inspected, "candidate_bytes"))
    dropped = {reason: summary.dropped.get(reason, 0) for reason in DROP_REASONS}
    log(f"ingest: keeping {summary.kept} of {found} images; dropped "
        + (", ".join(f"{n} {r}" for r, n in sorted(summary.dropped.items()) if n) or "none"))
    metrics.set(src, found=found, kept=summary.kept, dropped=dropped)
    shards = write_shards(job, summary, log, resumed)

    report = {
        "source": src,
        "input_images": found,
        "kept_images": summary.kept,
        "dropped": dropped,
        "examples": dict(sorted(summary.examples.items())),
        "duplicate_of": dict(summary.duplicate_of),
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
    fs, root = open_filesystem(dest, options)
    root = root.rstrip("/")
    storage_call(dest, options, fs.pipe, f"{root}/{QUALITY_REPORT}",
                 json.dumps(report, indent=2).encode())
    storage_call(dest, options, fs.pipe, f"{root}/{MANIFEST}",
                 json.dumps(manifest, indent=2).encode())
    job.area().remove()
    metrics.set(src, found=found, kept=summary.kept, dropped=dropped,
                shards=len(shards), written=manifest["total_bytes"])
    log(f"ingest: wrote {len(shards)} shards ({manifest['total_samples']} images, "
        f"{manifest['total_bytes'] / 1e6:.1f} MB) to {options.describe(dest)} "
        f"in {time.time() - started:.1f} s")
    return manifest


def _give_up(job: Job, existed: bool, message: str) -> None:
    """Stop on unusable input, leaving DEST as it was found."""
    job.area().remove()
    fs, root = open_filesystem(job.dest, job.options)
    if not existed and storage_call(job.dest, job.options, fs.exists, root):  # all of it is ours
        storage_call(job.dest, job.options, fs.rm, root, recursive=True)
    raise StorageError(message)
