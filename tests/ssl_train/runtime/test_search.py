"""``ssl-pretrain tune``: the search space, the default space, and a real two-trial search."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipelines.settings import ConfigError
from ssl_train.config import load_config
from ssl_train.runtime.search import (
    check_space,
    default_space,
    load_space,
    parse_space,
    search,
)
from tests.conftest import TINY_OVERRIDES


def test_a_space_file_gives_one_dimension_per_key(tmp_path):
    path = tmp_path / "space.yaml"
    path.write_text("optim.base_lr: {loguniform: [1.0e-4, 1.0e-2]}\n"
                    "objectives.mae.mask_ratio: {uniform: [0.6, 0.9]}\n"
                    "train.global_batch_size: {choice: [16, 32]}\n"
                    "optim.warmup_steps: {randint: [0, 20]}\n")
    dimensions = load_space(str(path))
    assert [(d.key, d.kind, d.values) for d in dimensions] == [
        ("optim.base_lr", "loguniform", (1e-4, 1e-2)),
        ("objectives.mae.mask_ratio", "uniform", (0.6, 0.9)),
        ("train.global_batch_size", "choice", (16, 32)),
        ("optim.warmup_steps", "randint", (0, 20))]
    check_space(load_config("tiny-cpu"), dimensions)


@pytest.mark.parametrize("raw, said", [
    ({"optim.base_lr": {"gaussian": [0, 1]}}, "optim.base_lr must be one of"),
    ({"optim.base_lr": {"uniform": [0.1]}}, "takes [low, high] with low < high"),
    ({"optim.base_lr": {"uniform": [0.2, 0.1]}}, "takes [low, high] with low < high"),
    ({"optim.base_lr": {"loguniform": [0, 0.1]}}, "loguniform needs low > 0"),
    ({"optim.warmup_steps": {"randint": [0, 2.5]}}, "randint takes integers"),
    ({"optim.base_lr": {"choice": []}}, "choice takes a list"),
    ([1, 2], "must be a YAML mapping"),
])
def test_a_malformed_space_is_refused_naming_the_key(raw, said):
    with pytest.raises(ConfigError, match=None) as refused:
        parse_space(raw)
    assert said in str(refused.value)


@pytest.mark.parametrize("raw, said", [
    ({"optim.learning_rate": {"uniform": [0.1, 0.2]}}, "unknown key optim.learning_rate"),
    ({"objectives.mae.mask_ratio": {"uniform": [0.5, 1.2]}}, "objectives.mae.mask_ratio"),
    ({"objectives.dino.student_temperature": {"uniform": [0.1, 0.2]}}, "no objective dino"),
    ({"train.global_batch_size": {"choice": [16, 7]}}, "global_batch_size"),
])
def test_a_space_the_config_cannot_take_is_refused_before_any_trial(raw, said):
    with pytest.raises(ConfigError) as refused:
        check_space(load_config("tiny-cpu"), parse_space(raw))
    assert said in str(refused.value)


def test_the_default_space_follows_the_objectives_and_the_weighting():
    dimensions, notes = default_space(load_config("tiny-cpu"))
    assert [d.key for d in dimensions] == [
        "objectives.simclr.temperature", "objectives.mae.mask_ratio", "optim.base_lr"]
    lr = next(d for d in dimensions if d.key == "optim.base_lr")
    assert lr.values == pytest.approx((4e-3 / 5, 4e-3 * 5))
    assert notes and "weighting is learned" in notes[0]
    fixed, notes = default_space(load_config("tiny-cpu", ["weighting=fixed"]))
    assert "objectives.mae.weight" in [d.key for d in fixed] and not notes
    assert "objectives.simclr.weight" not in [d.key for d in fixed]  # it fixes the scale
    check_space(load_config("tiny-cpu", ["weighting=fixed"]), fixed)
    mocov3, _ = default_space(load_config("tiny-cpu", ["objectives=[mocov3]"]))
    assert [d.key for d in mocov3] == ["objectives.mocov3.temperature", "optim.base_lr"]


def test_a_bad_space_file_exits_2_before_any_cluster_work(tmp_path):
    space = tmp_path / "space.yaml"
    space.write_text("optim.base_lr: {uniform: [0.1\n")
    result = subprocess.run(
        [str(Path(sys.executable).parent / "ssl-pretrain"), "tune", "--space", str(space),
         "--trials", "2"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert f"ssl-pretrain tune: error: space {space} is not valid YAML" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.reliability  # two training runs under Tune, ~45 s: a long variant (make reliability)
@pytest.mark.full
def test_a_two_trial_search_reports_a_failed_trial_and_writes_the_best_config(
        tmp_path, ray_local, sample_shards):
    """Two real training runs under Tune, two workers each (with the trial's driver and the view
    worker, the whole 4-CPU test cluster); the first reads a data source that does not exist."""
    config = load_config("tiny-cpu", [
        *TINY_OVERRIDES, "train.steps=4", "train.checkpoint_every=2",
        "telemetry.health_every=4", f"run.output_dir={tmp_path}", "run.name=search"])
    samples, missing = sample_shards(tmp_path), f"{tmp_path}/no-such-shards"
    dimensions = parse_space({"optim.base_lr": {"loguniform": [1e-4, 1e-2]},
                              "data.source.url": {"choice": [samples, missing]}})
    lines: list[str] = []
    summary = search(config, dimensions, trials=2, options=None, log=lines.append,
                     first_points=[{"optim.base_lr": 1e-3, "data.source.url": missing},
                                   {"optim.base_lr": 2e-3, "data.source.url": samples}])
    search_dir = tmp_path / "search"
    failed, completed = summary["trials"]
    assert [failed["trial"], completed["trial"]] == ["trial-001", "trial-002"]
    assert failed["status"].startswith("failed:") and "no-such-shards" in failed["status"]
    assert failed["metric"] is None
    assert completed["status"] == "completed" and completed["steps"] == 4
    assert completed["params"]["optim.base_lr"] == pytest.approx(2e-3)
    assert completed["metric"] > 1.0  # RankMe of the held batch: an effective rank
    assert summary["best"] == completed["trial"]
    # Each trial is a run of its own, in its own run directory, checked at every checkpoint.
    run_dir = Path(completed["run_dir"])
    assert run_dir.parent == search_dir / "trials"
    assert sorted(p.name for p in run_dir.glob("checkpoint_0*")) == [
        "checkpoint_000000002", "checkpoint_000000004"]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "held_effective_rank" in r] == [2, 4]
    # The table, the summary and the best config are in the search directory.
    table = (search_dir / "search_results.md").read_text()
    assert table.splitlines()[0] == ("| trial | optim.base_lr | data.source.url | "
                                     "held_effective_rank | steps | status |")
    assert len(table.splitlines()) == 4 and "failed:" in table and "completed" in table
    assert json.loads((search_dir / "search_results.json").read_text()) == summary
    best = load_config(str(search_dir / "best_config.yaml"))
    assert best.optim.base_lr == pytest.approx(2e-3)
    assert best.data.source.url == samples
    assert best.run.name == "search-best" and best.run.output_dir == str(tmp_path)
    assert best.telemetry.health_every == 4
    assert yaml.safe_load((search_dir / "best_config.yaml").read_text())["train"]["steps"] == 4
    assert any(line.startswith(f"best trial: {completed['trial']}") for line in lines)
    assert any("trials check the held batch every 2 steps" in line for line in lines)
