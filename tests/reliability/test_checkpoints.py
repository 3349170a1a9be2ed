"""Checkpoints are verified before they are used and never run code: a byte changed in a shard
file is refused by ``eval``, ``export`` and resume, naming the file; a ``.metadata`` or an
optimizer value that would run code when unpickled is refused even when an attacker rewrote the
recorded digests to match, and the code never runs; a checkpoint with a file missing or an
unreadable ``train_state.json`` is one sentence with exit code 2. The checkpoints are real: one
from a two-step run on Ray, and one written by hand with DCP.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict

from pipelines.storage.access import StorageError
from ssl_train.cli import main
from ssl_train.config import load_config
from ssl_train.models.ssl_model import SSLModel
from ssl_train.runtime.launcher import train
from ssl_train.train.checkpoint import CheckpointError, load_checkpoint
from ssl_train.train.optim import build_optimizer
from tests.reliability.conftest import tiny_overrides

pytestmark = pytest.mark.reliability

CHECKPOINT = "checkpoint_000000002"


class _RunsCode:
    """Unpickling this makes the directory ``path``: a stand-in for any code a pickle can run."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (os.mkdir, (self.path,))


def _config(output_dir: Path, *extra: str):
    return load_config("tiny-cpu", tiny_overrides(f"run.output_dir={output_dir}",
                                                  "run.name=trained", *extra))


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, ray_local) -> Path:
    """The run directory of a two-step run with two workers: one checkpoint, at step 2."""
    root = tmp_path_factory.mktemp("checkpoints")
    return Path(train(_config(root, "train.steps=2", "train.checkpoint_every=2"),
                      log=lambda line: None))


@pytest.fixture
def run_dir(trained_run, tmp_path, sample_shards) -> Path:
    """This test's own copy of the trained run (TMP/trained), free to damage."""
    sample_shards(tmp_path)
    return Path(shutil.copytree(trained_run, tmp_path / "trained"))


def _flip_a_byte(path: Path) -> None:
    """Change one byte in the middle of ``path``; its size stays the same."""
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _flip_a_byte_of_the_model(checkpoint: Path, file_name: str) -> None:
    """Change one byte in the middle of a model weight's piece of ``file_name`` (eval and export
    read the model's pieces only, and only those are checked)."""
    with open(checkpoint / ".metadata", "rb") as f:
        metadata = pickle.load(f)  # the test's own checkpoint
    piece = max((info for index, info in metadata.storage_data.items()
                 if index.fqn.startswith("model.") and info.relative_path == file_name),
                key=lambda info: info.length)
    data = bytearray((checkpoint / file_name).read_bytes())
    data[piece.offset + piece.length // 2] ^= 0xFF
    (checkpoint / file_name).write_bytes(bytes(data))


def _record_digests(checkpoint: Path) -> None:
    """Write or rewrite train_state.json so that it lists every other file at its current digest,
    as an attacker who can write the whole checkpoint would."""
    state_path = checkpoint / "train_state.json"
    state = json.loads(state_path.read_text()) if state_path.exists() else {"step": 0}
    state["files"] = {
        path.name: {"bytes": path.stat().st_size,
                    "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
        for path in sorted(checkpoint.iterdir()) if path.name != "train_state.json"}
    state_path.write_text(json.dumps(state))


def _one_error_line(stderr: str, command: str) -> str:
    """The error sentence, checked to be all that was printed on stderr."""
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"ssl-pretrain {command}: error: "), (
        stderr[-3000:])
    return lines[0]


def _ssl_pretrain(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """The installed command, as a user runs it (its stderr is all a user sees)."""
    executable = Path(sys.executable).parent / "ssl-pretrain"
    return subprocess.run([str(executable), *args], capture_output=True, text=True, timeout=300,
                          cwd=cwd)


def _steps(run_dir: Path) -> list[int]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["step"] for r in records if "event" not in r]


# ---------------------------------------------------------------- a changed byte

def test_eval_refuses_a_shard_file_with_one_byte_changed(run_dir, tmp_path):
    checkpoint = run_dir / CHECKPOINT
    _flip_a_byte_of_the_model(checkpoint, "__0_0.distcp")
    result = _ssl_pretrain("eval", str(checkpoint), "--data", "digits",
                           "--out", str(tmp_path / "result.json"), cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-3000:]
    line = _one_error_line(result.stderr, "eval")
    assert "__0_0.distcp" in line and "SHA-256" in line and "refused" in line
    assert not (tmp_path / "result.json").exists()


def test_export_refuses_a_shard_file_with_one_byte_changed_and_writes_nothing(
        run_dir, tmp_path, capsys):
    checkpoint = run_dir / CHECKPOINT
    _flip_a_byte_of_the_model(checkpoint, "__0_0.distcp")
    out = tmp_path / "exported"
    assert main(["export", str(checkpoint), str(out)]) == 2
    line = _one_error_line(capsys.readouterr().err, "export")
    assert "__0_0.distcp" in line and "SHA-256" in line
    assert not out.exists()


def test_resume_refuses_a_changed_latest_checkpoint_and_trains_nothing(run_dir):
    steps_before = _steps(run_dir)
    _flip_a_byte(run_dir / CHECKPOINT / "__1_0.distcp")
    config = _config(run_dir.parent, "train.steps=4", "train.checkpoint_every=2",
                     "train.max_failures=0")
    with pytest.raises(StorageError) as refused:
        train(config, log=lambda line: None)
    message = str(refused.value)
    assert "refused" in message and "__1_0.distcp" in message, message
    assert _steps(run_dir) == steps_before == [1, 2]
    assert sorted(p.name for p in run_dir.glob("checkpoint_0*")) == [CHECKPOINT]


def test_a_two_rank_resume_reads_each_rank_its_own_pieces_once(run_dir):
    config = _config(run_dir.parent, "train.steps=4", "train.checkpoint_every=2")
    train(config, log=lambda line: None)
    assert _steps(run_dir) == [1, 2, 3, 4]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    resumed = next(r for r in records if r.get("event") == "resumed")
    files = json.loads((run_dir / CHECKPOINT / "train_state.json").read_text())["files"]
    total = sum(entry["bytes"] for entry in files.values())
    read = resumed["bytes_read_by_rank"]
    assert resumed["checkpoint_bytes"] == total and len(read) == 2
    # Each rank its own shards (and the small .metadata): not the whole checkpoint each.
    assert max(read) < 0.6 * total and sum(read) < 1.1 * total, (read, total)


# ---------------------------------------------------------------- code in a checkpoint

def test_a_metadata_pickle_that_runs_code_is_refused_and_the_code_never_runs(run_dir, tmp_path):
    checkpoint = run_dir / CHECKPOINT
    marker = tmp_path / "code-ran"
    (checkpoint / ".metadata").write_bytes(pickle.dumps(_RunsCode(marker)))
    _record_digests(checkpoint)
    result = _ssl_pretrain("eval", str(checkpoint), "--data", "digits",
                           "--out", str(tmp_path / "result.json"), cwd=tmp_path)
    assert not marker.exists()
    assert result.returncode == 2, result.stderr[-3000:]
    assert "refused" in _one_error_line(result.stderr, "eval")

    # The same file, unpickled plainly elsewhere, does run its code: the refusal is what saved us.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.copy(checkpoint / ".metadata", elsewhere / ".metadata")
    with open(elsewhere / ".metadata", "rb") as f:
        pickle.load(f)
    assert marker.is_dir()


def _model_and_optimizer():
    config = load_config("tiny-cpu", tiny_overrides())
    model = SSLModel(config)
    return model, build_optimizer(model, config)


def _checkpoint_with_code_in_a_hyper_parameter(directory: Path, marker: Path) -> None:
    """A DCP checkpoint whose first parameter group's learning rate runs code when unpickled."""
    model, optimizer = _model_and_optimizer()
    model_state, optim_state = get_state_dict(model, optimizer)
    optim_state["param_groups"][0]["lr"] = _RunsCode(marker)
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(directory))
    _record_digests(directory)


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")  # one process, on purpose
def test_an_optimizer_value_that_runs_code_is_refused_and_the_code_never_runs(tmp_path):
    checkpoint = tmp_path / "checkpoint_000000000"
    marker = tmp_path / "code-ran"
    _checkpoint_with_code_in_a_hyper_parameter(checkpoint, marker)
    model, optimizer = _model_and_optimizer()
    with pytest.raises(CheckpointError, match="refused"):
        load_checkpoint(checkpoint, model, optimizer)
    assert not marker.exists()

    # DCP's own reader and planner would have run it: the weights-only planner is what saved us.
    model, optimizer = _model_and_optimizer()
    model_state, optim_state = get_state_dict(model, optimizer)
    dcp.load({"model": model_state, "optim": optim_state}, checkpoint_id=str(checkpoint))
    assert marker.is_dir()


# ---------------------------------------------------------------- incomplete checkpoints

def _without_shard_file(checkpoint: Path) -> str:
    (checkpoint / "__1_0.distcp").unlink()
    return "lacks __1_0.distcp"


def _without_train_state(checkpoint: Path) -> str:
    (checkpoint / "train_state.json").unlink()
    return "train_state.json does not exist"


def _garbled_train_state(checkpoint: Path) -> str:
    (checkpoint / "train_state.json").write_text('{"step": 2, "files": {')
    return "train_state.json"


def _empty_train_state(checkpoint: Path) -> str:
    (checkpoint / "train_state.json").write_text("")
    return "train_state.json"


@pytest.mark.parametrize("damage", [_without_shard_file, _without_train_state,
                                    _garbled_train_state, _empty_train_state],
                         ids=lambda damage: damage.__name__.strip("_"))
def test_eval_of_an_incomplete_checkpoint_is_one_sentence_with_exit_2(
        run_dir, tmp_path, capsys, damage):
    checkpoint = run_dir / CHECKPOINT
    expected = damage(checkpoint)
    assert main(["eval", str(checkpoint), "--data", "digits",
                 "--out", str(tmp_path / "result.json")]) == 2
    line = _one_error_line(capsys.readouterr().err, "eval")
    assert expected in line and str(checkpoint) in line
