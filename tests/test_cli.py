"""The installed ``ssl-pretrain`` command and its subcommands."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import TINY_OVERRIDES

SUBCOMMANDS = ("ingest", "train", "tune", "eval", "export", "energy-report", "config", "k8s")


def _ssl_pretrain(*args: str) -> subprocess.CompletedProcess:
    # The console script is installed beside the interpreter that runs the tests.
    executable = Path(sys.executable).parent / "ssl-pretrain"
    assert executable.is_file(), "the ssl-pretrain console script is not installed"
    return subprocess.run([str(executable), *args], capture_output=True, text=True, timeout=600)


def test_help_lists_every_subcommand():
    result = _ssl_pretrain("--help")
    assert result.returncode == 0
    for name in SUBCOMMANDS:
        assert name in result.stdout


@pytest.mark.parametrize("name", SUBCOMMANDS)
def test_every_subcommand_has_help(name):
    result = _ssl_pretrain(name, "--help")
    assert result.returncode == 0 and result.stdout.startswith(f"usage: ssl-pretrain {name}")


def test_unknown_subcommand_is_a_usage_error():
    result = _ssl_pretrain("pretrain")
    assert result.returncode == 2 and "invalid choice" in result.stderr


def test_train_runs_on_the_sample_photographs_and_writes_a_run_directory(tmp_path):
    result = _ssl_pretrain(
        "train", "--set", "train.steps=3", "--set", "train.log_every=1",
        "--set", "train.checkpoint_every=3",
        "--set", f"run.output_dir={tmp_path}", "--set", "run.name=smoke",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    # One line a log step, printed by the driver in order: no worker's prefix
    # ("(RayTrainWorker pid=...)"), as a Kubernetes job's submitter log shows it.
    progress = [line for line in result.stdout.splitlines() if "img/s" in line]
    assert [line.split(" | ")[0] for line in progress] == ["step 1/3", "step 2/3", "step 3/3"]
    # The first progress line says what the figures were computed in; FSDP has nothing to say.
    assert "2 x cpu: fp32 parameters and compute, fp32 gradient reduction" in result.stdout
    assert "FSDP2" not in result.stdout + result.stderr
    # The local cluster the command starts is described once; Ray's own notice is not repeated.
    assert result.stdout.count("local Ray cluster at ") == 1
    assert "dashboard http://" in result.stdout and "token authentication on" in result.stdout
    assert "Token authentication is enabled" not in result.stdout + result.stderr
    # One progress line a log step and nothing else a step: no result dumps from Ray Train,
    # no Python warnings.
    console = result.stdout + result.stderr
    assert "Reporting training result" not in console
    assert "Checkpoint successfully created" not in console  # from every rank, every checkpoint
    assert "Warning" not in console, [line for line in console.splitlines() if "Warning" in line]
    assert f"run directory: {tmp_path}/smoke" in result.stdout
    assert not (tmp_path / "smoke" / "run.lease.json").exists()  # released at the end
    # TensorBoard's own reader finds every step's losses and the run's energy in the event files.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "smoke" / "tensorboard")).Reload()
    tags = events.Tags()["scalars"]
    for name in ("loss/loss", "loss/loss_contrastive", "loss/loss_masked", "train/lr",
                 "throughput/images_per_second", "throughput/data_wait_share",
                 "energy/energy_joules_so_far"):
        assert name in tags, tags
    assert [event.step for event in events.Scalars("loss/loss_masked")] == [1, 2, 3]
    # The pictures of the last step: MAE's reconstructions (also a PNG) and the views given.
    assert {"mae/reconstructions", "views/given"} <= set(events.Tags()["images"])
    assert [event.step for event in events.Images("mae/reconstructions")] == [3]
    png = (tmp_path / "smoke" / "reconstructions_step_3.png").read_bytes()
    assert png.startswith(b"\x89PNG")
    records = [json.loads(line) for line in
               (tmp_path / "smoke" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "event" not in r] == [1, 2, 3]
    assert (tmp_path / "smoke" / "checkpoint_000000003" / "train_state.json").is_file()
    assert (tmp_path / "sample-shards" / "manifest.json").is_file()
    # The run ends with its energy report: complete, every figure from the ledger.
    report = json.loads((tmp_path / "smoke" / "energy_report.json").read_text())
    assert report["complete"] and report["steps"] == 3 and report["images"] == 3 * 32
    assert report["energy_joules"]["total_it"] > 0
    assert report["energy_joules"]["by_stage"]["train"] > 0
    assert "energy of run smoke" in result.stdout

    again = _ssl_pretrain("train", "--set", "train.steps=3", "--set", f"run.output_dir={tmp_path}",
                          "--set", "run.name=smoke")
    assert again.returncode == 0 and "is complete at step 3" in again.stdout


# ~200 s on 2 cores (two local clusters side by side, ~60 s each alone): a long variant, run by
# make reliability; the one-run-per-directory lease is tested in make test (test_lease.py).
@pytest.mark.full
@pytest.mark.reliability
def test_two_local_runs_on_separate_run_directories_both_complete(tmp_path, sample_shards):
    executable = Path(sys.executable).parent / "ssl-pretrain"
    sample_shards(tmp_path)  # both runs' embedded default, ingested once a session

    def start(name: str) -> subprocess.Popen:
        overrides = [*TINY_OVERRIDES, "train.steps=2", "train.checkpoint_every=2",
                     f"run.output_dir={tmp_path}", f"run.name={name}", "energy.enabled=false"]
        return subprocess.Popen(
            [str(executable), "train", *[arg for item in overrides for arg in ("--set", item)]],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    first = start("first")
    seen = ""
    while "local Ray cluster at" not in seen:  # the first run's cluster holds its ports
        line = first.stdout.readline()
        assert line, seen[-3000:]
        seen += line
    second = start("second")
    second_out, _ = second.communicate(timeout=600)
    first_out, _ = first.communicate(timeout=600)
    assert first.returncode == 0, (seen + first_out)[-3000:]
    assert second.returncode == 0, second_out[-3000:]
    # The second run's metrics moved off the first's port, and it said so.
    assert "metrics port 8090 is taken" in second_out
    for name in ("first", "second"):
        assert (tmp_path / name / "checkpoint_000000002" / "train_state.json").is_file()
