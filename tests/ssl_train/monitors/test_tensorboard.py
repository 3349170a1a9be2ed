"""Rank 0's TensorBoard event files in an s3:// run directory: each part uploaded once."""

from __future__ import annotations

import pytest
import s3fs

from pipelines.storage.access import StorageOptions
from ssl_train.monitors.tensorboard import TENSORBOARD_DIR, TensorBoardLog


def test_an_s3_run_directory_gets_each_event_file_once_and_every_step(tmp_path, s3_bucket,
                                                                     s3_env):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = f"{s3_bucket}/runs/tb"
    options = StorageOptions(endpoint_url=s3_env)
    board = TensorBoardLog(run, options)
    fs = s3fs.S3FileSystem(endpoint_url=s3_env, key="testing-key", secret="testing-secret")
    uploaded: dict[str, int] = {}
    for checkpoint in range(3):  # ten steps between checkpoints
        for step in range(checkpoint * 10 + 1, checkpoint * 10 + 11):
            board.scalars(step, {"loss": 1.0 / step, "step_seconds": 0.5,
                                 "data_wait_seconds": 0.1})
        board.sync()
        files = {p: fs.info(p)["size"] for p in fs.ls(f"{run}/{TENSORBOARD_DIR}", refresh=True)}
        # Locally only the new part the next steps go to, never uploaded yet.
        assert not {p.name for p in board.folder.iterdir()} & {p.rsplit("/", 1)[1] for p in files}
        # What was uploaded before is not uploaded again: the earlier parts are unchanged.
        assert {p: files[p] for p in uploaded} == uploaded
        assert len(files) == checkpoint + 1
        uploaded = files
    board.close()
    fs.get(f"{run}/{TENSORBOARD_DIR}/", str(tmp_path / "tb"), recursive=True)
    events = EventAccumulator(str(tmp_path / "tb")).Reload()
    loss = events.Scalars("loss/loss")
    assert [e.step for e in loss] == list(range(1, 31))
    assert events.Scalars("throughput/data_wait_share")[0].value == pytest.approx(0.2)
