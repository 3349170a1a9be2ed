"""Object storage that fails: 5xx answers, throttling, dropped connections and slow responses,
injected by a proxy on 127.0.0.1 in front of the moto S3 server, on reads and on checkpoint
writes. Transient faults are retried and the run completes; an outage ends the run with one
clear sentence after bounded retries, and its last complete checkpoint is intact."""

from __future__ import annotations

import io
import json
import sys
import threading
import time

import pytest
import ray

from pipelines.sample_images import sample_photograph_dir
from pipelines.storage.access import StorageOptions, StorageUnavailable
from pipelines.storage.shards import shard_name, write_shard
from pipelines.stream.stage import DataConfig, DataStage
from ssl_train.config import load_config
from ssl_train.runtime.launcher import train
from ssl_train.train.checkpoint import (
    is_complete,
    latest_complete_checkpoint,
    list_checkpoints,
    local_copy,
    verify_checkpoint,
)
from tests.reliability.arrivals import arrivals_with_a_straggler, longest_gap
from tests.reliability.conftest import tiny_overrides
from tests.reliability.faultproxy import READS, WRITES, Fault

pytestmark = pytest.mark.reliability
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

PHOTOS = ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png",
          "hubble_deep_field.jpg", "brick.png", "grass.png")


def _put_shards(direct, prefix: str, per_shard: int = 2) -> int:
    """The photographs as WebDataset shards under ``prefix`` (straight to the server)."""
    folder = sample_photograph_dir()
    samples = [(name.split(".")[0], name.split(".")[1], (folder / name).read_bytes(), {})
               for name in PHOTOS]
    for index in range(0, len(samples), per_shard):
        sink = io.BytesIO()
        write_shard(sink, samples[index:index + per_shard])
        direct.pipe(f"{prefix}/{shard_name(index // per_shard)}", sink.getvalue())
    return len(samples)


def _transient_faults(methods, share: float, limit: int = 3) -> list[Fault]:
    """Each kind of transient fault on ``share`` of the requests of ``methods``, ``limit`` times."""
    return [Fault("error", methods, share=share, limit=limit, code="SlowDown"),
            Fault("error", methods, share=share, limit=limit, code="InternalError"),
            Fault("error", methods, share=share, limit=limit, code="ServiceUnavailable"),
            Fault("reset", methods, share=share, limit=limit),
            Fault("slow", methods, share=share, limit=limit, delay_s=0.5)]


def _by_kind(faults: list[Fault]) -> dict[str, int]:
    return {(f.code if f.kind == "error" else f.kind): f.fired for f in faults}


def test_shard_reads_retry_through_errors_resets_and_slow_responses(faulty_s3, ray_local,
                                                                      figures):
    proxy, bucket, direct = faulty_s3
    total = _put_shards(direct, f"{bucket[5:]}/shards", per_shard=1)
    faults = [proxy.add(fault) for fault in _transient_faults(READS, share=0.25)]
    stage = DataStage(DataConfig.model_validate({"source": {"url": f"{bucket}/shards"},
                                                 "epochs": 4}), 32)
    emitted = sum(len(batch["view_a"]) for batch in stage.iter_batches(batch_size=4))
    counters = stage.counters()
    # Every image of every epoch arrives; no shard was given up on.
    assert emitted == 4 * total
    assert counters.get("shard_errors", 0) == 0
    assert all(fault.fired for fault in faults), _by_kind(faults)
    figures(requests=proxy.requests, faults_injected=_by_kind(faults), images=emitted)


def _run_on_faulty_s3(direct, bucket: str, name: str, *extra: str):
    """The photographs as shards in ``bucket`` and a tiny run ``name`` on them, in the bucket."""
    _put_shards(direct, f"{bucket[5:]}/shards")
    return load_config("tiny-cpu", tiny_overrides(
        f"run.output_dir={bucket}/runs", f"run.name={name}", f"data.source.url={bucket}/shards",
        *extra))


@pytest.mark.full  # ~60 s; make test keeps the read faults and the outage cases
def test_a_run_completes_through_faults_on_reads_and_checkpoint_writes(faulty_s3, ray_local,
                                                                         figures):
    proxy, bucket, direct = faulty_s3
    config = _run_on_faulty_s3(direct, bucket, "faulty", "train.steps=6",
                               "train.checkpoint_every=3", "energy.upload_every_seconds=2")
    faults = [proxy.add(fault) for fault in _transient_faults(READS | WRITES, share=0.05)]
    writes = proxy.add(Fault("error", WRITES, path="checkpoint_", share=0.3, code="SlowDown"))
    run_uri = train(config, log=lambda line: None)
    proxy.clear()
    checkpoints = list_checkpoints(run_uri)
    assert [c.rsplit("_", 1)[1] for c in checkpoints] == ["000000006", "000000003"]
    assert all(is_complete(c) for c in checkpoints)
    with local_copy(checkpoints[0]) as local:
        assert verify_checkpoint(local)["step"] == 6
    records = [json.loads(line) for line in direct.cat_file(
        f"{bucket[5:]}/runs/faulty/metrics.jsonl").splitlines()]
    assert [r["step"] for r in records if "event" not in r] == [1, 2, 3, 4, 5, 6]
    assert writes.fired > 0, "no checkpoint write was failed: the test proves nothing"
    injected = {**_by_kind(faults), "SlowDown on checkpoint writes": writes.fired}
    figures(requests=proxy.requests, faults_injected=injected)


def _start_outage_after(proxy, direct, checkpoint: str, outage: list, deadline: float):
    """Turn every request into a 503 once ``checkpoint`` is completely written."""
    server = StorageOptions(endpoint_url=direct.endpoint_url)
    while time.time() < deadline and not is_complete(f"s3://{checkpoint}", server):
        time.sleep(0.2)
    outage.append((time.time(), proxy.add(Fault("error", READS | WRITES,
                                                code="ServiceUnavailable"))))


def test_an_outage_ends_the_run_clearly_and_keeps_the_last_checkpoint(faulty_s3, ray_local,
                                                                       figures):
    proxy, bucket, direct = faulty_s3
    config = _run_on_faulty_s3(direct, bucket, "outage", "train.steps=40",
                               "train.checkpoint_every=2", "train.max_failures=1")
    outage: list = []
    watcher = threading.Thread(target=_start_outage_after, daemon=True, args=(
        proxy, direct, f"{bucket[5:]}/runs/outage/checkpoint_000000004", outage,
        time.time() + 300))
    watcher.start()
    with pytest.raises(StorageUnavailable) as raised:
        train(config, options=StorageOptions(max_attempts=2), log=lambda line: None)
    stopped = time.time()
    message = str(raised.value)
    assert outage, "the outage never started"
    started, fault = outage[0]
    assert "the run stopped" in message and "kept failing" in message, message
    assert "rerun the same command" in message and "testing-secret" not in message
    assert "\n" not in message

    proxy.clear()
    latest = latest_complete_checkpoint(f"{bucket}/runs/outage")
    assert latest is not None and int(latest.rsplit("_", 1)[1]) >= 4
    with local_copy(latest) as local:
        step = verify_checkpoint(local)["step"]  # every file matches its recorded digest
    figures(outage_to_stop_seconds=round(stopped - started, 1), requests_refused=fault.fired,
            last_checkpoint_step=step)


def test_a_straggling_shard_does_not_stop_the_stream(faulty_s3, ray_local, figures):
    from pipelines.stream.cursor import DataCursor, epoch_groups, epoch_order

    proxy, bucket, direct = faulty_s3
    total = _put_shards(direct, f"{bucket[5:]}/shards", per_shard=1)
    epochs = 40  # long enough for the stream to go on well past the straggler's delay
    config = DataConfig.model_validate({"source": {"url": f"{bucket}/shards"}, "epochs": epochs,
                                        "read_shards_at_once": 2, "view_batch_size": 2})
    # The straggler: a shard of epoch 0's second group, its first read held back until 10 s
    # after the stream's first batch (in the suite the stream once took 12 s to start, and a
    # hold counted from the read ended inside the start-up).
    group = epoch_groups(total, DataCursor(seed=0), 0, 2)[1]
    slow = {(0, position) for position, _ in group}
    slow_shard = shard_name(epoch_order(total, 0, 0)[group[0][0]])
    delay = 10.0
    slowed, fault = arrivals_with_a_straggler(DataStage(config, 32), proxy, slow_shard, delay)
    assert fault.fired == 1
    assert sum(len(samples) for _, samples in slowed) == total * epochs  # nothing is lost
    slow_arrives = min(t for t, samples in slowed if samples & slow)
    first = slowed[0][0]
    assert slow_arrives >= first + delay
    # While the straggler is held, the other groups keep coming, about as often as they do
    # once it has arrived (the stream's own rhythm, measured on the same run).
    held = [t for t, samples in slowed if not samples & slow and t <= slow_arrives]
    after = [t for t, _ in slowed if t >= slow_arrives]
    assert held[-1] - first >= delay / 2, "the stream ended before the straggler: lengthen it"
    assert len(after) >= 10, "the stream ended with the straggler: lengthen it"
    gap_held, gap_after = longest_gap(held), longest_gap(after)
    assert gap_held < delay / 4, (gap_held, slowed[:50])
    figures(straggler_delay_s=delay, first_batch_s=round(first, 2),
            straggler_arrives_s=round(slow_arrives, 2),
            samples_while_held=sum(len(s) for t, s in slowed if t < slow_arrives),
            longest_gap_while_held_s=round(gap_held, 2),
            longest_gap_after_it_s=round(gap_after, 2),
            stall_s=round(max(0.0, gap_held - gap_after), 2), stream_s=round(slowed[-1][0], 2))
