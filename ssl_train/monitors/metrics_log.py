"""The run's JSON-lines files: ``metrics.jsonl`` (every logged step) and the energy ledgers.

Local run directories are appended to in place; remote ones (s3://) get the whole file uploaded
at each sync (checkpoints, the end, the ledger's upload interval), since object stores cannot
append. ``metrics.jsonl`` is written by rank 0; on resume, records after the resumed step are
dropped: those steps are trained again.
"""

from __future__ import annotations

import json
import os
import posixpath
import tempfile
from pathlib import Path

from pipelines.storage.access import StorageOptions, is_remote, open_filesystem, storage_call

METRICS_FILE = "metrics.jsonl"


class RunFile:
    """A JSON-lines file in the run directory: appended to in place when local, uploaded whole
    from a local copy (at ``sync``) when the run directory is in an object store. ``fresh``: a
    new file, nothing to download first."""

    def __init__(self, run_uri: str, name: str, options: StorageOptions | None = None,
                 fresh: bool = False):
        self.run_uri = run_uri
        self.name = name
        self.options = options
        self.remote = is_remote(run_uri)
        if self.remote:
            self._tmp = tempfile.TemporaryDirectory(prefix="ssl-runfile-")
            self.path = Path(self._tmp.name) / posixpath.basename(name)
            fs, root = open_filesystem(run_uri, options)
            remote_path = posixpath.join(root, name)
            if not fresh and storage_call(run_uri, options, fs.exists, remote_path):
                self.path.write_bytes(storage_call(run_uri, options, fs.cat_file, remote_path))
        else:
            self.path = Path(run_uri) / name
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = None

    def append(self, record: dict) -> None:
        if self._file is None:
            self._file = open(self.path, "a")
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def sync(self) -> None:
        """Make the run directory's copy current (an fsync for local run directories)."""
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())
        if self.remote and self.path.exists():
            fs, root = open_filesystem(self.run_uri, self.options)
            storage_call(self.run_uri, self.options, fs.put_file, str(self.path),
                         posixpath.join(root, self.name))

    def close(self) -> None:
        self.sync()
        if self._file is not None:
            self._file.close()
            self._file = None


class MetricsLog(RunFile):
    def __init__(self, run_uri: str, options: StorageOptions | None = None, resume_step: int = 0):
        super().__init__(run_uri, METRICS_FILE, options)
        self._keep_until(resume_step)

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

