"""A killed ingest, rerun with the same command, resumes and ends as a clean run would.

The ingest runs as the CLI a user runs, as a job on a running Ray cluster (as on KubeRay),
against S3 through the fault proxy (reads of raw images slowed, so that the kills land mid-pass).
Each kill is a SIGKILL of the driver, as a deleted driver pod would be; Ray then ends its tasks.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest

from pipelines.ingest import IngestConfig, ingest
from pipelines.sample_images import sample_photographs
from tests.conftest import S3_CREDENTIALS
from tests.reliability.faultproxy import READS, Fault

pytestmark = pytest.mark.reliability

IMAGES, PER_PART, PER_SHARD = 48, 8, 8


def _raw_images(direct, bucket: str) -> None:
    rng = np.random.default_rng(1)
    photos = sample_photographs(min_side=128)
    for index in range(IMAGES):
        photo = photos[index % len(photos)]
        side = int(rng.integers(96, min(photo.size) + 1))
        left = int(rng.integers(0, photo.size[0] - side + 1))
        top = int(rng.integers(0, photo.size[1] - side + 1))
        out = io.BytesIO()
        photo.crop((left, top, left + side, top + side)).resize((128, 128)).save(
            out, format="JPEG", quality=90)
        direct.pipe(f"{bucket[5:]}/raw/folder{index % 6}/image{index:04d}.jpg", out.getvalue())


def _kill_tree(process: subprocess.Popen) -> None:
    parent = psutil.Process(process.pid)
    everything = [parent, *parent.children(recursive=True)]
    for p in everything:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(everything, timeout=30)


def _run_until(args: list[str], direct, marker_glob: str,
               timeout: float = 300) -> tuple[list[str], str]:
    """Start the CLI; SIGKILL it (and its Ray) once a done marker matches ``marker_glob``.
    Returns the markers there were when it was killed, and what it printed."""
    process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            direct.invalidate_cache()
            if direct.glob(marker_glob):
                _kill_tree(process)
                direct.invalidate_cache()
                return direct.glob(marker_glob), process.stdout.read()
            if process.poll() is not None:
                pytest.fail(f"the ingest ended before it could be killed:\n{process.stdout.read()}")
            time.sleep(0.25)
        pytest.fail("no done marker appeared in time")
    finally:
        if process.poll() is None:
            _kill_tree(process)


def _shards(direct, prefix: str) -> tuple[list, dict]:
    manifest = json.loads(direct.cat_file(f"{prefix}/manifest.json"))
    report = json.loads(direct.cat_file(f"{prefix}/quality_report.json"))
    return [(s["name"], s["samples"], s["bytes"], s["sha256"]) for s in manifest["shards"]], report


def test_an_ingest_killed_in_pass_one_and_in_shard_writing_resumes_to_the_clean_result(
    faulty_s3, ray_local, figures
):
    proxy, bucket, direct = faulty_s3
    _raw_images(direct, bucket)
    config = IngestConfig(samples_per_shard=PER_SHARD, images_per_part=PER_PART)
    ingest(f"{bucket}/raw", f"{bucket}/clean", config, log=lambda line: None)
    clean = _shards(direct, f"{bucket[5:]}/clean")

    proxy.add(Fault("slow", methods=READS, path=r"/raw/", delay_s=0.15))
    # A job of its own on the running cluster: its tasks get the credentials it is given.
    command = [str(Path(sys.executable).parent / "ssl-pretrain"), "ingest", f"{bucket}/raw",
               f"{bucket}/resumed", "--samples-per-shard", str(PER_SHARD),
               "--images-per-part", str(PER_PART),
               "--address", ray_local.get_runtime_context().gcs_address,
               "--access-key-id", S3_CREDENTIALS["AWS_ACCESS_KEY_ID"],
               "--secret-access-key", S3_CREDENTIALS["AWS_SECRET_ACCESS_KEY"]]
    work = f"{bucket[5:]}/resumed/_ingest"
    parts = IMAGES // PER_PART
    markers, _ = _run_until(command, direct, f"{work}/records/*.done")
    assert 1 <= len(markers) < parts  # killed in the middle of pass 1
    inspected = sum(json.loads(direct.cat_file(m))["images"] for m in markers)
    markers, output = _run_until(command, direct, f"{work}/shards/*.done")
    assert "resuming the unfinished ingest" in output
    # The parts finished before the kill were not inspected again.
    assert f"resumed: {inspected} of {IMAGES} images already processed" in output
    shards = len(clean[0])
    written = len(markers)
    assert 1 <= written < shards  # killed in the middle of shard writing

    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert f"resumed: {IMAGES} of {IMAGES} images already processed" in result.stdout
    assert f"of {shards} shards already written" in result.stdout
    assert _shards(direct, f"{bucket[5:]}/resumed") == clean  # the same shards, byte for byte
    assert not direct.exists(work)
    figures(images=IMAGES, parts=parts, shards=shards, killed_after_images=inspected,
            killed_after_shards=written)
