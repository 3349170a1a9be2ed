"""The streaming data stage on real shards in a real S3 bucket."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import textwrap
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import s3fs

from pipelines.ingest import IngestConfig, ingest
from pipelines.storage.shards import ShardError, iter_shard_samples
from pipelines.stream.cursor import DataCursor, epoch_order, merge_checkpoint_parts
from pipelines.stream.stage import DataConfig, DataStage
from tests.pipelines.planted import PHOTOGRAPHS, raw_image_files, write_tree

REPO = Path(__file__).resolve().parents[3]

IMAGE_SIZE = 64


def _fs(endpoint):
    return s3fs.S3FileSystem(endpoint_url=endpoint, key="testing-key", secret="testing-secret",
                             skip_instance_cache=True)


@pytest.fixture
def shards_on_s3(s3_bucket, s3_env, ray_local):
    """The planted input ingested into 5 shards (4 images each, the last 3) on S3."""
    fs = _fs(s3_env)
    for relative, data in raw_image_files().items():
        fs.pipe(f"{s3_bucket[5:]}/raw/{relative}", data)
    dest = f"{s3_bucket}/shards"
    manifest = ingest(f"{s3_bucket}/raw", dest, IngestConfig(samples_per_shard=4),
                      log=lambda line: None)
    report = json.loads(fs.cat_file(f"{dest[5:]}/quality_report.json"))
    return dest, manifest, report


def _config(url, **overrides):
    return DataConfig.model_validate({"source": {"url": url}, "epochs": 1, **overrides})


def _drain(stage, batch_size=8):
    batches = list(stage.iter_batches(batch_size))
    return {key: np.concatenate([b[key] for b in batches]) for key in batches[0]}


def test_stream_emits_views_and_counts_match_the_ingest_report(shards_on_s3):
    dest, manifest, report = shards_on_s3
    stage = DataStage(_config(dest), IMAGE_SIZE)
    out = _drain(stage)
    kept = report["kept_images"]
    for name in ("view_a", "view_b", "view_mae"):
        assert out[name].shape == (kept, IMAGE_SIZE, IMAGE_SIZE, 3)
        assert out[name].dtype == np.uint8
    assert not np.array_equal(out["view_a"], out["view_b"])  # two different augmentations
    counters = stage.counters()
    assert counters["images_read"] == kept == manifest["total_samples"]
    assert counters["images_emitted"] == kept
    assert counters["shards_read"] == len(manifest["shards"])
    assert not any(k.startswith("dropped_") for k in counters)  # ingest already removed them
    assert counters.get("shard_errors", 0) == 0
    # Every sample of every shard once; the shards are read side by side, their samples in turn.
    sizes = [manifest["shards"][i]["samples"] for i in epoch_order(len(manifest["shards"]), 0, 0)]
    assert sorted(out["position"].tolist()) == [p for p, n in enumerate(sizes) for _ in range(n)]
    assert len(set(out["position"][:8].tolist())) == len(manifest["shards"])


def test_a_truncated_shard_in_the_middle_is_counted_and_the_stream_goes_on(
    shards_on_s3, s3_env, s3_bucket
):
    dest, manifest, _ = shards_on_s3
    fs = _fs(s3_env)
    damaged = f"{s3_bucket}/damaged"
    order = epoch_order(len(manifest["shards"]), 0, 0)
    middle = manifest["shards"][order[2]]["name"]  # read third
    readable_in_damaged = 0
    for shard in manifest["shards"]:
        data = fs.cat_file(f"{dest[5:]}/{shard['name']}")
        if shard["name"] == middle:
            data = data[: len(data) * 2 // 3]
            try:
                for _ in iter_shard_samples(io.BytesIO(data)):
                    readable_in_damaged += 1
            except ShardError:
                pass
        fs.pipe(f"{damaged[5:]}/{shard['name']}", data)
    fs.pipe(f"{damaged[5:]}/manifest.json", json.dumps(manifest).encode())

    stage = DataStage(_config(damaged), IMAGE_SIZE)
    out = _drain(stage)
    lost = manifest["shards"][order[2]]["samples"] - readable_in_damaged
    assert lost > 0
    counters = stage.counters()
    assert counters["shard_errors"] == 1
    assert counters["images_emitted"] == manifest["total_samples"] - lost == len(out["view_a"])
    assert set(out["position"].tolist()) >= {0, 1, 3, 4}  # shards after the damaged one arrive


def test_a_resume_reads_every_shard_not_consumed_and_counts_what_it_reads_again(shards_on_s3):
    dest, manifest, _ = shards_on_s3
    sizes = [manifest["shards"][i]["samples"] for i in epoch_order(5, 7, 0)]
    config = _config(dest, seed=7, read_shards_at_once=2)  # groups of 2: finished out of order
    first = DataStage(config, IMAGE_SIZE)
    tracker = first.tracker()
    trained = Counter()
    for batch in first.iter_batches(batch_size=2):
        tracker.observe(batch["epoch"], batch["position"])
        trained.update(zip(batch["epoch"].tolist(), batch["position"].tolist()))
        if sum(trained.values()) >= 15:  # of 19: at least one shard is complete
            break
    complete = {shard for shard, n in trained.items() if n == sizes[shard[1]]}
    finished = first.finished_shards()
    deadline = time.monotonic() + 10  # the readers' reports are not waited on: give them time
    while not complete <= set(finished) and time.monotonic() < deadline:
        time.sleep(0.1)
        finished = first.finished_shards()
    start = DataCursor(seed=7)
    cursor, in_flight, consumed = merge_checkpoint_parts(
        start, 5, 1, [tracker.checkpoint_part(False)], finished)
    cursor = DataCursor.from_dict(json.loads(json.dumps(cursor.to_dict())))
    covered = {(0, p) for p in range(5) if cursor.covers((0, p))}
    assert covered == complete and complete  # exactly the shards trained to their end
    assert in_flight == sum(n for shard, n in trained.items() if shard not in covered)
    assert consumed == {f"{e}:{p}": n for (e, p), n in sorted(trained.items())}

    resumed = DataStage(config, IMAGE_SIZE, cursor=cursor)
    out = _drain(resumed, batch_size=2)
    assert resumed.counters()["shards_read"] == 5 - len(covered)  # consumed shards are skipped
    again = Counter(zip(out["epoch"].tolist(), out["position"].tolist()))
    # Every shard not consumed is read whole; with the first pass, every sample is trained, and
    # trained twice only where it was counted as read again.
    assert again == {(0, p): sizes[p] for p in range(5) if (0, p) not in covered}
    assert sum(trained.values()) + sum(again.values()) == sum(sizes) + in_flight


def test_a_batch_draws_on_as_many_shards_as_are_read_side_by_side(tmp_path, ray_local):
    src = write_tree(tmp_path / "raw", raw_image_files())
    config = _config(str(src / "photos"), **{
        "source": {"url": str(src / "photos"), "format": "images", "images_per_shard": 2},
        "read_shards_at_once": 10, "quality": {"min_side": 32}})
    stage = DataStage(config, IMAGE_SIZE)
    first = next(iter(stage.iter_batches(batch_size=16)))
    assert len(set(first["position"].tolist())) >= 8  # 10 shards of 2 photographs


def test_device_placement_emits_parameters_for_the_training_worker(tmp_path, ray_local):
    src = write_tree(tmp_path / "raw", raw_image_files())
    config = _config(str(src / "photos"), **{
        "source": {"url": str(src / "photos"), "format": "images", "images_per_shard": 8},
        "augment": {"photometric_on": "device"},
    })
    stage = DataStage(config, IMAGE_SIZE)
    out = _drain(stage)
    assert out["view_a_photometric"].shape == (len(PHOTOGRAPHS), 7)
    assert out["view_a_photometric"].dtype == np.float32
    assert stage.counters()["images_emitted"] == len(PHOTOGRAPHS)
    assert stage.counters()["shards_read"] == 3  # 19 files in groups of 8


def test_parquet_source_with_an_image_bytes_column(tmp_path, ray_local):
    files = raw_image_files()
    rows = [{"image": {"bytes": data, "path": name}, "label": i}
            for i, (name, data) in enumerate(files.items()) if name.startswith("photos/")]
    rows += [{"image": {"bytes": files["planted/truncated.jpg"], "path": "t"}, "label": -1}]
    pq.write_table(pa.Table.from_pylist(rows[:10]), tmp_path / "part-0.parquet")
    pq.write_table(pa.Table.from_pylist(rows[10:]), tmp_path / "part-1.parquet")
    config = _config(str(tmp_path), source={"url": str(tmp_path), "format": "parquet"})
    stage = DataStage(config, IMAGE_SIZE)
    out = _drain(stage)
    counters = stage.counters()
    assert counters["images_read"] == len(PHOTOGRAPHS) + 1
    assert counters["dropped_unreadable"] == 1
    assert len(out["view_a"]) == counters["images_emitted"] == len(PHOTOGRAPHS)


def test_views_feed_torch_batches(shards_on_s3):
    import torch

    dest, manifest, _ = shards_on_s3
    dataset = DataStage(_config(dest), IMAGE_SIZE).dataset()
    batch = next(iter(dataset.iter_torch_batches(batch_size=4, device="cpu")))
    assert batch["view_a"].dtype == torch.uint8 and batch["view_a"].shape == (4, 64, 64, 3)
    assert batch["position"].dtype == torch.int64


def test_view_workers_that_take_every_cpu_are_refused_before_the_stream_hangs(tmp_path,
                                                                              ray_local):
    from pipelines.settings import ConfigError

    src = write_tree(tmp_path / "raw", raw_image_files())
    cpus = int(ray_local.cluster_resources()["CPU"])
    config = _config(str(src / "photos"), source={"url": str(src / "photos"), "format": "images"},
                     view_workers=cpus)  # every CPU: the other operators would never start
    with pytest.raises(ConfigError, match=rf"data.view_workers \({cpus}\) take {cpus} "
                                          rf"of this Ray cluster's {cpus} CPUs"):
        DataStage(config, IMAGE_SIZE).dataset()


def test_the_schedule_of_groups_takes_no_cpu(tmp_path):
    """The groups reach the view workers on a cluster with no CPU to spare: on a 0-CPU Ray
    instance the schedule still yields every group, one a block (its repartition once took a
    CPU a task and starved the view workers of a full cluster), from one operator: the
    repartition runs in the schedule's task (once it ran as tasks of their own, each in a
    worker process started for it)."""
    script = textwrap.dedent("""
        import json, re, ray
        from pipelines.stream.cursor import DataCursor
        from pipelines.stream.stage import schedule_dataset
        ray.init(num_cpus=0, include_dashboard=False, logging_level="ERROR")
        ds = schedule_dataset([f"s{i}" for i in range(6)], DataCursor(seed=0), epochs=2,
                              group_size=2)
        ds.context.enable_progress_bars = False
        blocks = [len(b["group"]) for b in ds.iter_batches(batch_size=None)]
        print(json.dumps([blocks, re.findall(r"Operator \\d+ ([^:]+):", ds.stats())]))
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=120, cwd=str(tmp_path),
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 0, result.stderr[-2000:]
    blocks, operators = json.loads(result.stdout.strip().splitlines()[-1])
    assert blocks == [1] * 6  # 3 groups x 2 epochs
    assert len(operators) == 2 and operators[1].startswith(
        "MapBatches(_epoch_groups)->StreamingRepartition"), operators
