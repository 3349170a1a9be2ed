"""Processes killed mid-run: a training worker at random steps, the driver during a checkpoint
write (then restarted with the same command), a data-stage actor. The run completes with every
step trained once; samples read again after a restart are counted, and only those of shards in
flight are read again; a partly written checkpoint is never used."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import psutil
import pytest
import ray

from pipelines.sample_images import sample_photograph_dir
from pipelines.storage.shards import shard_name, write_shard
from pipelines.stream.cursor import DataCursor, epoch_order
from pipelines.stream.stage import DataConfig, DataStage
from ssl_train.config import load_config
from ssl_train.runtime.launcher import train
from ssl_train.train.checkpoint import is_complete
from tests.conftest import S3_CREDENTIALS
from tests.pipelines.planted import PHOTOGRAPHS
from tests.reliability.conftest import tiny_overrides
from tests.reliability.faultproxy import WRITES, Fault

pytestmark = pytest.mark.reliability
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

PER_SHARD = 3


def _local_shards(root: Path) -> list[int]:
    """scikit-image's photographs as tar shards of 3 under ``root``; returns each shard's size."""
    folder = sample_photograph_dir()
    samples = [(name.split(".")[0], name.split(".")[1], (folder / name).read_bytes(), {})
               for name in PHOTOGRAPHS]
    root.mkdir(parents=True, exist_ok=True)
    sizes = []
    for index in range(0, len(samples), PER_SHARD):
        with open(root / shard_name(index // PER_SHARD), "wb") as sink:
            sizes.append(write_shard(sink, samples[index:index + PER_SHARD])["samples"])
    return sizes


def _records(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _trained_steps(records) -> list[int]:
    return [r["step"] for r in records if "event" not in r]


def _training_workers() -> list[psutil.Process]:
    return sorted((p for p in psutil.process_iter(["cmdline"])
                   if any("RayTrainWorker" in part for part in (p.info["cmdline"] or []))),
                  key=lambda p: p.pid)


def _kill_a_worker_at(run_dir: Path, step: int, pick: int, killed: list, deadline: float):
    while time.time() < deadline and max(_trained_steps(_records(run_dir)), default=0) < step:
        time.sleep(0.05)
    workers = _training_workers()
    if workers:
        victim = workers[pick % len(workers)]
        victim.kill()
        killed.append(victim.pid)


@pytest.mark.parametrize("seed", [
    0, pytest.param(1, marks=pytest.mark.full), pytest.param(2, marks=pytest.mark.full),
    pytest.param(3, marks=pytest.mark.full)])
def test_a_worker_killed_at_a_random_step_costs_only_the_shards_in_flight(
        seed, tmp_path, ray_local, figures):
    sizes = _local_shards(tmp_path / "shards")
    steps, batch = 16, 8
    config = load_config("tiny-cpu", tiny_overrides(
        f"run.output_dir={tmp_path}", "run.name=killed", f"data.source.url={tmp_path / 'shards'}",
        f"train.steps={steps}", "train.checkpoint_every=4", "train.max_failures=3",
        f"data.seed={seed}"))
    run_dir = tmp_path / "killed"
    rng = random.Random(seed)
    kill_step, pick = rng.randint(2, steps - 3), rng.randrange(2)
    killed: list[int] = []
    killer = threading.Thread(target=_kill_a_worker_at, daemon=True,
                              args=(run_dir, kill_step, pick, killed, time.time() + 300))
    killer.start()
    train(config, log=lambda line: None)
    killer.join(timeout=5)
    assert killed, "no training worker was found to kill"

    records = _records(run_dir)
    # Every step once: those after the last checkpoint were trained again and logged once.
    assert _trained_steps(records) == list(range(1, steps + 1))
    # A restart: from the newest checkpoint, or from scratch when the kill came before the first.
    events = [r for r in records if r.get("event") in ("started", "resumed")]
    # One kill, one restart: the restarted workers find what the run needs (its data ledger).
    assert events[0]["event"] == "started" and len(events) == 2, events
    assert events[1]["event"] == ("resumed" if kill_step > 4 else events[1]["event"])
    # Samples per shard, as the checkpoints recorded them: all trained samples are there...
    trained = Counter()
    for record in records:
        if record.get("event") == "checkpoint":
            trained.update(record["samples_by_shard"])
    assert sum(trained.values()) == steps * batch
    # ...and a shard was trained more than once only by the samples counted as replayed, all of
    # them from shards in flight (at or after the cursor) when the resumed checkpoint was taken.
    cursors = {r["checkpoint"]: r["cursor"] for r in records if r.get("event") == "checkpoint"}
    over = {}
    for key, n in trained.items():
        epoch, position = map(int, key.split(":"))
        size = sizes[epoch_order(len(sizes), seed, epoch)[position]]
        if n > size:
            over[(epoch, position)] = n - size
    replayed = events[-1]["samples_replayed"]
    assert sum(over.values()) <= replayed
    for resumed in (e for e in events if e["event"] == "resumed"):
        cursor = DataCursor.from_dict(cursors[resumed["checkpoint"].rsplit("/", 1)[1]])
        assert not any(cursor.covers(shard) for shard in over), (over, cursor)
    figures(seed=seed, killed_after_step=kill_step, restarts=len(events) - 1,
            resumed_from=[e["checkpoint"].rsplit("/", 1)[1] if e["checkpoint"] else None
                          for e in events[1:]],
            samples_replayed=replayed, samples_trained=steps * batch)


def _ray_train_workers_gone(deadline: float) -> None:
    while time.time() < deadline and _training_workers():
        time.sleep(0.5)


@pytest.mark.full  # ~2 min (Ray notices the dead driver slowly); make test keeps the
# partly-written checkpoint case (test_checkpoints_in_s3_resume_past_a_partly_written_one_...)
def test_a_driver_killed_during_a_checkpoint_write_resumes_from_the_last_complete_one(
        faulty_s3, tmp_path, ray_local, figures):
    proxy, bucket, direct = faulty_s3
    sizes = _local_shards(tmp_path / "shards")
    # The checkpoint of step 6 never finishes uploading: its first file hangs, then drops.
    stall = proxy.add(Fault("stall", WRITES, path="checkpoint_000000006/", delay_s=30, limit=1))
    executable = Path(sys.executable).parent / "ssl-pretrain"
    # This driver's job does not get the session's environment: the workers get the
    # credentials from the driver's options.
    command = [str(executable), "train", "--address", ray_local.get_runtime_context().gcs_address,
               "--access-key-id", S3_CREDENTIALS["AWS_ACCESS_KEY_ID"],
               "--secret-access-key", S3_CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
               *[part for item in tiny_overrides(
                   f"run.output_dir={bucket}/runs", "run.name=driver",
                   f"data.source.url={tmp_path / 'shards'}", "train.steps=8",
                   "train.checkpoint_every=3") for part in ("--set", item)]]
    env = {**os.environ, "AWS_ENDPOINT_URL": proxy.url}
    first = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True, start_new_session=True)
    output: list[str] = []
    threading.Thread(target=lambda: output.extend(first.stdout), daemon=True).start()
    try:
        deadline = time.time() + 300
        while time.time() < deadline and not stall.fired and first.poll() is None:
            time.sleep(0.1)
        assert stall.fired, "".join(line for line in output if "pid=" not in line)[-3000:]
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait(timeout=30)
    _ray_train_workers_gone(time.time() + 120)
    run = f"{bucket}/runs/driver"
    partial = f"{run}/checkpoint_000000006"
    assert not is_complete(partial)

    second = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert f"resuming run driver from {run}/checkpoint_000000003" in second.stdout
    records = [json.loads(line) for line in direct.cat_file(
        f"{run[5:]}/metrics.jsonl").splitlines()]
    assert [r["step"] for r in records if "event" not in r] == list(range(1, 9))
    resumed = [r for r in records if r.get("event") == "resumed"]
    assert resumed[-1]["checkpoint"].endswith("checkpoint_000000003")
    assert is_complete(f"{run}/checkpoint_000000008")
    figures(resumed_from_step=3, partial_checkpoint="checkpoint_000000006",
            samples_replayed=resumed[-1]["samples_replayed"], shards=len(sizes))


def _view_actors() -> list[psutil.Process]:
    return [p for p in psutil.process_iter(["cmdline"])
            if any("_ViewMaker" in part for part in (p.info["cmdline"] or []))]


def test_a_killed_data_stage_actor_is_restarted_and_the_stream_goes_on(tmp_path, ray_local,
                                                                       figures):
    sizes = _local_shards(tmp_path / "shards")
    epochs = 10
    stage = DataStage(DataConfig.model_validate({
        "source": {"url": str(tmp_path / "shards")}, "epochs": epochs, "view_batch_size": 4,
        "quality": {"min_side": 32}}), 32)
    positions: list[tuple[int, int]] = []
    killed = []
    for batch in stage.iter_batches(batch_size=4):
        positions += list(zip(batch["epoch"].tolist(), batch["position"].tolist()))
        if not killed:
            actors = _view_actors()
            assert actors, "no data-stage actor found"
            actors[0].kill()
            killed.append(actors[0].pid)
    # Every sample of every epoch arrives, each once (groups of shards finish in any order).
    expected = Counter({(epoch, position): sizes[epoch_order(len(sizes), 0, epoch)[position]]
                        for epoch in range(epochs) for position in range(len(sizes))})
    assert Counter(positions) == expected
    figures(actors_killed=len(killed), samples=len(positions))
