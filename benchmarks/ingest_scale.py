"""What ingest's duplicate search costs as the input grows, and what it finds.

    .venv/bin/python benchmarks/ingest_scale.py --images 100000 1000000 3000000
    .venv/bin/python benchmarks/ingest_scale.py --jpegs 3000 12000

Dedup: synthetic pass-1 records (random 64-bit perceptual hashes; 1% of images have a near copy
at 1..6 bits, 0.5% an exact copy) are written as Parquet parts by Ray tasks, then ingest's
exact and near passes and the greedy rounds run on the local cluster (``pipelines.ingest``'s own
stages). Reported per size: seconds and seconds per million images, the driver's peak RSS during
the passes, the scheme chosen, and recall against the planted pairs (and, up to
``--brute-force-max`` images, against brute force over every pair).

JPEGs: a full ``ssl-pretrain ingest`` of ImageNet-like JPEGs (500x375 crops of scikit-image's
photographs, quality 90), images/s per core.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pyarrow as pa

from pipelines.ingest import duplicates
from pipelines.ingest.config import IngestConfig, Job
from pipelines.ingest.records import RECORD_SCHEMA
from pipelines.ingest.workarea import hash_integers, part_name, read_bucket, run_tasks
from pipelines.storage.access import StorageOptions

NEAR_EVERY, EXACT_EVERY = 100, 200


def _phash(index: np.ndarray, seed: int) -> np.ndarray:
    return hash_integers(index.astype(np.uint64), seed)


def synthetic_part(part: int, per_part: int, seed: int) -> pa.Table:
    """Records of one part: image i is a near copy of i + 1 when i % 100 == 50 (at 1..6 bits,
    smaller), an exact copy of i + 1 when i % 200 == 1."""
    index = np.arange(part * per_part, (part + 1) * per_part, dtype=np.int64)
    phash = _phash(index, seed)
    area = np.full(len(index), 500 * 375, dtype=np.int64)
    sha = [hashlib.sha256(f"{seed}-{i}".encode()).hexdigest() for i in index.tolist()]
    near = index % NEAR_EVERY == NEAR_EVERY // 2
    flips = np.zeros(len(index), dtype=np.uint64)
    for position, i in enumerate(index.tolist()):
        if near[position]:
            bits = np.random.default_rng([seed, i]).choice(64, 1 + (i // NEAR_EVERY) % 6,
                                                          replace=False)
            flips[position] = np.uint64(sum(1 << int(b) for b in bits))
    phash = np.where(near, _phash(index + 1, seed) ^ flips, phash)
    area = np.where(near, area // 2, area)
    exact = index % EXACT_EVERY == 1
    phash = np.where(exact, _phash(index + 1, seed), phash)
    sha = [hashlib.sha256(f"{seed}-{i + 1}".encode()).hexdigest() if e else s
           for i, e, s in zip(index.tolist(), exact.tolist(), sha)]
    return pa.table({
        "key": [f"img{i:010d}" for i in index.tolist()], "path": [""] * len(index),
        "source_bytes": np.zeros(len(index), np.int64), "drop_reason": [""] * len(index),
        "detail": [""] * len(index), "width": area // 375, "height": np.full(len(index), 375),
        "sha256": sha, "phash": phash, "ext": ["jpg"] * len(index),
        "shard_bytes": np.full(len(index), 100_000),
    }, schema=RECORD_SCHEMA)


class PeakRss:
    """The driver's resident memory, sampled every 0.1 s."""

    def __init__(self):
        self.process = psutil.Process()
        self.peak = self.process.memory_info().rss
        self.running = True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()

    def _sample(self):
        while self.running:
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(0.1)

    def stop(self) -> int:
        self.running = False
        self.thread.join()
        return self.peak


def brute_force_pairs(phash: np.ndarray, distance: int) -> int:
    """Pairs within ``distance`` bits among ``phash``, counted by comparing every pair."""
    count = 0
    for start in range(0, len(phash), 256):
        block = phash[start:start + 256]
        distances = np.bitwise_count(block[:, None] ^ phash[None, start:])
        within = distances <= distance
        within[:, :len(block)] &= np.triu(np.ones((len(block), len(block)), bool), 1)
        count += int(within.sum())
    return count


def dedup_case(images: int, per_part: int, seed: int, work: Path, brute_force_max: int,
               blocks: int | None = None) -> dict:
    config = IngestConfig(images_per_part=per_part)
    job = Job(src=str(work / "src"), dest=str(work / f"dest-{images}"),
              options=StorageOptions(), config=config)
    area = job.area()
    parts = images // per_part

    def write(index: int) -> dict:
        area.write_table(f"records/{part_name(index)}", synthetic_part(index, per_part, seed))
        return {}

    list(run_tasks(parts, write))
    rss_before = psutil.Process().memory_info().rss
    peak = PeakRss()
    started = time.perf_counter()
    lines: list[str] = []
    duplicates.find_duplicates(job, parts, images, lines.append, blocks)
    seconds = time.perf_counter() - started
    peak_rss = peak.stop()

    dropped: dict[str, str] = {}
    for index in range(parts):
        decisions = read_bucket(area, "decisions", index, duplicates.DECISION_SCHEMA)
        dropped.update(zip(decisions["key"].to_pylist(), decisions["reason"].to_pylist()))
    planted_near = images // NEAR_EVERY
    planted_exact = len(range(1, images, EXACT_EVERY))
    found_near = sum(1 for i in range(NEAR_EVERY // 2, images, NEAR_EVERY)
                     if f"img{i:010d}" in dropped)
    # Of an exact pair the smaller key is kept: the original (i + 1) is the one dropped.
    found_exact = sum(1 for i in range(1, images, EXACT_EVERY)
                      if f"img{i + 1:010d}" in dropped or f"img{i:010d}" in dropped)
    result = {
        "images": images, "seconds": round(seconds, 1),
        "seconds_per_million": round(seconds / images * 1e6, 1),
        "driver_rss_mb_before": round(rss_before / 2**20),
        "driver_peak_rss_mb": round(peak_rss / 2**20),
        "driver_rss_growth_mb": round((peak_rss - rss_before) / 2**20),
        "recall_near": round(found_near / planted_near, 4),
        "recall_exact": round(found_exact / planted_exact, 4),
        "dropped": len(dropped), "log": lines,
    }
    if images <= brute_force_max:
        phash = np.concatenate([np.asarray(area.read_table(f"records/{part_name(i)}")["phash"],
                                           dtype=np.uint64) for i in range(parts)])
        unique = np.unique(phash)  # exact copies share a hash: one pair each, found as exact
        pairs = brute_force_pairs(unique, config.quality.near_duplicate_distance)
        edges = sum(json.loads(area.get(f"edges/{n}"))["edges"]
                    for n in area.listdir("edges") if n.endswith(".done"))
        result["brute_force_pairs"] = pairs
        result["pairs_found"] = edges
        result["recall_vs_brute_force"] = round(edges / pairs, 4) if pairs else None
    area.remove()
    return result


def jpeg_case(count: int, work: Path) -> dict:
    import subprocess
    import sys

    from pipelines.sample_images import sample_photographs

    src = work / f"jpegs-{count}"
    rng = np.random.default_rng(0)
    photos = sample_photographs(min_side=375)
    for index in range(count):
        photo = photos[index % len(photos)]
        width, height = (500, 375) if index % 2 else (375, 500)
        scale = max(width / photo.size[0], height / photo.size[1]) * rng.uniform(1.0, 1.6)
        resized = photo.resize((int(photo.size[0] * scale) + 1, int(photo.size[1] * scale) + 1))
        left = int(rng.integers(0, resized.size[0] - width + 1))
        top = int(rng.integers(0, resized.size[1] - height + 1))
        path = src / f"folder{index % 50:02d}" / f"{index:06d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        resized.crop((left, top, left + width, top + height)).save(path, quality=90)
    command = [str(Path(sys.executable).parent / "ssl-pretrain"), "ingest", str(src),
               str(work / f"shards-{count}"), "--shard-size", "64MB"]
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    seconds = time.perf_counter() - started
    cores = os.cpu_count()
    lines = result.stdout.splitlines()
    # "ingest: wrote ... in 20.9 s": the job's own time, without starting and stopping Ray.
    job_seconds = float(lines[-1].rsplit(" in ", 1)[1].split()[0])
    return {"images": count, "command_seconds": round(seconds, 1),
            "ingest_seconds": job_seconds, "cores": cores,
            "images_per_second_per_core": round(count / job_seconds / cores, 1),
            "log": [line for line in lines if "inspected:" in line or "keeping" in line
                    or "written:" in line or "wrote" in line]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, nargs="*", default=[])
    parser.add_argument("--jpegs", type=int, nargs="*", default=[])
    parser.add_argument("--per-part", type=int, default=50_000)
    parser.add_argument("--brute-force-max", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--blocks", type=int, help="force the scheme's block count")
    parser.add_argument("--work", type=Path, help="scratch folder (default: a temporary one)")
    args = parser.parse_args()

    import ray

    ray.init(logging_level="WARNING")
    work = args.work or Path(tempfile.mkdtemp(prefix="ingest-scale-"))
    results = {"cores": os.cpu_count(), "dedup": [], "jpegs": []}
    for images in args.images:
        results["dedup"].append(dedup_case(images, min(args.per_part, images), args.seed, work,
                                           args.brute_force_max, args.blocks))
        print(json.dumps(results["dedup"][-1]), flush=True)
    ray.shutdown()
    for count in args.jpegs:
        results["jpegs"].append(jpeg_case(count, work))
        print(json.dumps(results["jpegs"][-1]), flush=True)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
