"""One live ``train`` per run directory: the run directory's lease."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ssl_train.runtime.lease import LEASE_FILE, RunInUse, RunLease


def _dead_pid() -> int:
    """The pid of a process of this host that has ended."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def _plant(run_dir: Path, **lease) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / LEASE_FILE).write_text(json.dumps(
        {"id": "other", "host": socket.gethostname(), "pid": 1, "started": time.time(),
         "renewed": time.time(), **lease}))


def test_a_live_holder_is_refused_and_the_lease_is_gone_after_the_run(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    lines = []
    with RunLease(str(run_dir), renew_seconds=0.5, stale_seconds=5):
        assert (run_dir / LEASE_FILE).is_file()
        started = time.monotonic()
        with pytest.raises(RunInUse) as refused:
            RunLease(str(run_dir), log=lines.append, renew_seconds=0.5, stale_seconds=5).acquire()
        # Refused as soon as the holder renewed, well before its lease could go stale.
        assert time.monotonic() - started < 3
    message = str(refused.value)
    assert f"run directory {run_dir} is in use by a live run" in message
    assert socket.gethostname() in message and "another run.name" in message
    assert "\n" not in message
    assert not (run_dir / LEASE_FILE).exists()  # released at the end of the run


def test_a_dead_local_holders_lease_is_taken_over_at_once(tmp_path):
    run_dir = tmp_path / "run"
    _plant(run_dir, pid=_dead_pid())  # renewed just now, but its process is gone
    started = time.monotonic()
    with RunLease(str(run_dir), log=lambda line: None):
        assert time.monotonic() - started < 2
        held = json.loads((run_dir / LEASE_FILE).read_text())
        assert held["id"] != "other"


def test_a_lease_not_renewed_for_the_stale_time_is_taken_over(tmp_path):
    run_dir = tmp_path / "run"
    # Another host's lease (its process cannot be checked from here), renewed 1 s ago and never
    # again: taken over once it is stale, and the takeover is said.
    _plant(run_dir, host="another-pod", pid=7, renewed=time.time() - 1)
    lines: list[str] = []
    started = time.monotonic()
    with RunLease(str(run_dir), log=lines.append, renew_seconds=0.5, stale_seconds=3):
        waited = time.monotonic() - started
    assert 1.5 < waited < 6
    assert any("another-pod" in line and "waiting" in line for line in lines), lines
    assert any("taking over the lease" in line for line in lines), lines


def test_a_second_train_on_a_live_runs_directory_exits_2_naming_it(tmp_path):
    out = tmp_path / "runs"
    run_dir = out / "busy"
    run_dir.mkdir(parents=True)
    executable = Path(sys.executable).parent / "ssl-pretrain"
    # A live holder that renews often (the real run renews every 10 s; the second run is told
    # once it has seen one renewal).
    with RunLease(str(run_dir), renew_seconds=0.5, log=lambda line: None):
        result = subprocess.run(
            [str(executable), "train", "--config", "tiny-cpu", "--set", f"run.output_dir={out}",
             "--set", "run.name=busy"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-3000:]
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith("ssl-pretrain train: error: run directory ")
    assert "is in use by a live run" in error and "Traceback" not in result.stderr
    assert "local Ray cluster" not in result.stdout  # refused before any cluster work
