"""The real job on Ray Train: FSDP2 workers, checkpoints in object storage, resume, failures."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import ray.cloudpickle
import s3fs

from ssl_train.config import load_config
from ssl_train.models.ssl_model import SSLModel
from ssl_train.runtime.launcher import train
from ssl_train.train.checkpoint import is_complete, load_checkpoint, local_copy, read_train_state
from ssl_train.train.optim import build_optimizer
from tests.conftest import TINY_OVERRIDES

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

TINY = TINY_OVERRIDES


def _config(tmp_path, *overrides):
    return load_config("tiny-cpu", [*TINY, f"run.output_dir={tmp_path}", *overrides])


def _records(run_dir) -> list[dict]:
    return [json.loads(line) for line in Path(run_dir, "metrics.jsonl").read_text().splitlines()]


def _steps(records):
    return [r["step"] for r in records if "event" not in r]


def _events(records):
    return [r for r in records if r.get("event") in ("started", "resumed")]


# ---------------------------------------------------------------- checkpoints on S3, resume

def _s3(endpoint):
    return s3fs.S3FileSystem(endpoint_url=endpoint, key="testing-key", secret="testing-secret",
                             skip_instance_cache=True)


BYOL_MAE = ["objectives=[byol, mae]", "objectives.byol.projector.hidden_dim=128",
            "objectives.byol.projector.out_dim=64", "objectives.byol.predictor.hidden_dim=128",
            "objectives.byol.predictor.out_dim=64"]


def _adam_steps(local_dir, config) -> set[int]:
    model = SSLModel(config)
    optimizer = build_optimizer(model, config)
    load_checkpoint(local_dir, model, optimizer)
    return {int(state["step"]) for state in optimizer.state.values()}


def test_checkpoints_in_s3_resume_past_a_partly_written_one_with_fewer_workers(
    tmp_path, s3_bucket, s3_env, ray_local
):
    """Of the hybrid [byol, mae]: its EMA teacher is saved sharded over two workers and loaded
    resharded onto one (strictly: every teacher tensor must be in the checkpoint)."""
    runs = f"{s3_bucket}/runs"
    first = _config(runs, *BYOL_MAE, "train.steps=6", "train.checkpoint_every=3",
                    "run.name=s3run")
    train(first, log=lambda line: None)
    fs = _s3(s3_env)
    run_dir = f"{s3_bucket[5:]}/runs/s3run"
    names = sorted(p.rsplit("/", 1)[1] for p in fs.ls(run_dir) if "checkpoint_0" in p)
    assert names == ["checkpoint_000000003", "checkpoint_000000006"]
    state3 = json.loads(fs.cat_file(f"{run_dir}/checkpoint_000000003/train_state.json"))
    state6 = json.loads(fs.cat_file(f"{run_dir}/checkpoint_000000006/train_state.json"))
    assert state6["step"] == 6 and state6["world_size"] == 2
    assert {"__0_0.distcp", "__1_0.distcp", ".metadata"} <= set(state6["files"])
    # Checkpoint 6 loses a shard, as if its upload had died half way: the resume must skip it.
    fs.rm_file(f"{run_dir}/checkpoint_000000006/__1_0.distcp")
    assert not is_complete(f"s3://{run_dir}/checkpoint_000000006")

    second = _config(runs, *BYOL_MAE, "train.steps=9", "train.checkpoint_every=3",
                     "run.name=s3run", "train.num_workers=1")
    train(second, log=lambda line: None)

    fs.get(f"{run_dir}/metrics.jsonl", str(tmp_path / "metrics.jsonl"))
    records = _records(tmp_path)
    assert _steps(records) == list(range(1, 10))  # the log restarts at the resumed step
    events = _events(records)
    assert [(e["event"], e["step"], e["world_size"]) for e in events] == [
        ("started", 0, 2), ("resumed", 3, 1)]
    assert events[1]["checkpoint"].endswith("checkpoint_000000003")

    state9 = json.loads(fs.cat_file(f"{run_dir}/checkpoint_000000009/train_state.json"))
    assert state9["step"] == 9 and state9["world_size"] == 1
    assert (state9["cursor"]["epoch"], state9["cursor"]["shards_consumed"]) > (
        state3["cursor"]["epoch"], state3["cursor"]["shards_consumed"])
    # The optimizer state went on from checkpoint 3: AdamW has taken 9 steps.
    with local_copy(f"s3://{run_dir}/checkpoint_000000009") as local_dir:
        assert _adam_steps(local_dir, second) == {9}
    # Each run left its node's energy ledger in the bucket; the last report has both.
    assert len(fs.glob(f"{run_dir}/energy/ledger-*/part-00000.jsonl")) == 2
    report = json.loads(fs.cat_file(f"{run_dir}/energy_report.json"))
    assert report["meter_sessions"] == 2 and report["complete"] and report["steps"] == 9


@pytest.mark.reliability  # two runs, ~60 s: a long variant, run by make reliability
@pytest.mark.full
def test_slices_continue_one_run_until_its_configured_steps(tmp_path, ray_local, sample_shards):
    sample_shards(tmp_path)
    config = _config(tmp_path, "train.steps=5", "train.checkpoint_every=10", "run.name=sliced",
                     "optim.warmup_steps=0")
    lines: list[str] = []
    train(config, log=lines.append, slice_steps=3)
    assert any("this slice trains steps 1-3 of 5" in line for line in lines)
    assert sorted(p.name for p in (tmp_path / "sliced").glob("checkpoint_0*")) == [
        "checkpoint_000000003"]
    train(config, log=lines.append, slice_steps=3)
    train(config, log=lines.append, slice_steps=3)
    assert "run sliced is complete at step 5" in lines[-1]
    records = _records(tmp_path / "sliced")
    assert _steps(records) == [1, 2, 3, 4, 5]
    assert [(e["event"], e["step"]) for e in _events(records)] == [("started", 0), ("resumed", 3)]
    # The schedule spans the configured 5 steps, not the slice: the last step is the cosine's end.
    lr = [r["lr"] for r in records if "lr" in r]
    peak = config.learning_rate
    assert lr[-1] < lr[2] < peak
    assert read_train_state(str(tmp_path / "sliced" / "checkpoint_000000005"))["step"] == 5


def test_a_bf16_run_trains_records_its_precision_and_is_checked_for_truncation(
    tmp_path, ray_local, sample_shards
):
    sample_shards(tmp_path)
    config = _config(tmp_path, "train.steps=3", "train.checkpoint_every=3", "run.name=trunc",
                     "parallel.mixed_precision=bf16")
    run_dir = train(config, log=lambda line: None)
    # The GPUs' policy on two CPU workers: finite losses, and bf16 recorded as in effect.
    records = _records(run_dir)
    started = _events(records)[0]
    assert started["world_size"] == 2 and started["device"] == "cpu"
    assert started["precision"] == {"param_dtype": "bfloat16", "reduce_dtype": "float32",
                                    "loss_dtype": "float32"}
    steps = [r for r in records if "event" not in r]
    assert [r["step"] for r in steps] == [1, 2, 3]
    for key in ("loss", "loss_contrastive", "loss_masked", "grad_norm"):
        assert np.isfinite([r[key] for r in steps]).all(), key
    # A checkpoint with a cut shard file, or none at all, is not complete.
    checkpoint = Path(run_dir, "checkpoint_000000003")
    shard = checkpoint / "__0_0.distcp"
    shard.write_bytes(shard.read_bytes()[:-10])
    assert not is_complete(str(checkpoint))
    assert not is_complete(str(tmp_path / "nothing-here"))


# ---------------------------------------------------------------- two nodes

TWO_NODE_SCRIPT = textwrap.dedent("""
    import json, sys
    import ray
    from ray.cluster_utils import Cluster
    from ssl_train.config import load_config
    from ssl_train.runtime.launcher import train

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2})
    cluster.add_node(num_cpus=2)
    ray.init(address=cluster.address)
    config = load_config("tiny-cpu", json.loads(sys.argv[1]))
    train(config, address=cluster.address, log=lambda line: None)
    ray.shutdown()
    cluster.shutdown()
""")


@pytest.mark.reliability  # a second Ray cluster, ~75 s: a long variant, run by make reliability
@pytest.mark.full
def test_two_node_cluster_runs_one_worker_per_node(tmp_path):
    overrides = [*TINY, f"run.output_dir={tmp_path}", "run.name=twonode", "train.steps=3",
                 "train.checkpoint_every=3", "train.placement_strategy=STRICT_SPREAD",
                 "train.cpus_per_worker=1"]
    result = subprocess.run(
        [sys.executable, "-c", TWO_NODE_SCRIPT, json.dumps(overrides)],
        capture_output=True, text=True, timeout=600,
        env={**os.environ, "RAY_ADDRESS": ""},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    records = _records(tmp_path / "twonode")
    started = _events(records)[0]
    assert started["world_size"] == 2 and len(set(started["nodes"])) == 2
    assert _steps(records) == [1, 2, 3]
    assert np.isfinite([r["loss"] for r in records if "loss" in r]).all()
    # One energy meter per node, and each node's training worker counted on its own node.
    report = json.loads((tmp_path / "twonode" / "energy_report.json").read_text())
    assert report["meter_sessions"] == 2 and len(report["energy_joules"]["by_node"]) == 2
    train_by_node = {row["node"] for row in report["energy_joules"]["by_device"]
                     if row["stages"]["train"] > 0}
    assert train_by_node == set(started["nodes"])
