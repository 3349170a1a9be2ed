"""The run's ``metrics.jsonl``: every logged step, one JSON object a line, in the run directory.

Written by rank 0. Local run directories are appended to in place; remote ones (s3://) get the
whole file uploaded at each checkpoint and at the end, since object stores cannot append. On
resume, records after the resumed step are dropped: those steps are trained again.
"""

from __future__ import annotations

import json
import os
import posixpath
import tempfile
from pathlib import Path

from pipelines.storage import StorageOptions, is_remote, open_filesystem, storage_call

METRICS_FILE = "metrics.jsonl"


class MetricsLog:
    def __init__(self, run_uri: str, options: StorageOptions | None = None, resume_step: int = 0):
        self.run_uri = run_uri
        self.options = options
        self.remote = is_remote(run_uri)
        if self.remote:
            self._tmp = tempfile.TemporaryDirectory(prefix="ssl-metrics-")
            self.path = Path(self._tmp.name) / METRICS_FILE
            fs, root = open_filesystem(run_uri, options)
            remote_path = posixpath.join(root, METRICS_FILE)
            if storage_call(run_uri, options, fs.exists, remote_path):
                self.path.write_bytes(storage_call(run_uri, options, fs.cat_file, remote_path))
        else:
            self.path = Path(run_uri) / METRICS_FILE
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self._keep_until(resume_step)
        self._file = open(self.path, "a")

    def _keep_until(self, step: int) -> None:
        if not self.path.exists():
            return
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                if json.loads(line).get("step", 0) <= step:
                    kept.append(line)
            except ValueError:
                continue  # a line cut by a crash
        self.path.write_text("".join(f"{line}\n" for line in kept))

    def append(self, record: dict) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def sync(self) -> None:
        """Make the run directory's copy current (a no-op for local run directories)."""
        self._file.flush()
        os.fsync(self._file.fileno())
        if self.remote:
            fs, root = open_filesystem(self.run_uri, self.options)
            storage_call(self.run_uri, self.options, fs.put_file, str(self.path),
                         posixpath.join(root, METRICS_FILE))

    def close(self) -> None:
        self.sync()
        self._file.close()
