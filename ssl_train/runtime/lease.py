"""The run directory's lease: one live ``train`` per run directory.

A run holds ``RUN_DIR/run.lease.json`` (who holds it and when it last said so) while it runs,
renews it every ``RENEW_SECONDS`` from a thread of the driver, and deletes it at its end. A
second ``train`` that finds a lease watches it: renewed again, its holder is alive and the
second run is refused in one sentence naming it (within ``RENEW_SECONDS``); not renewed for
``STALE_SECONDS``, its holder died (a killed pod, a lost node) and the lease is taken over. A
holder on this host whose process is gone is known dead at once (a killed local run restarted
by hand). This module must not start Ray or touch anything else in the run directory.

Taking a lease is a read, then a write: two runs started within the same second could both
take it. A scheduled job's next slice starts minutes or hours after the last one, which is what
this guards against.
"""

from __future__ import annotations

import json
import os
import posixpath
import socket
import threading
import time
import uuid
from collections.abc import Callable

from pipelines.storage.access import StorageOptions, open_filesystem, storage_call

LEASE_FILE = "run.lease.json"
RENEW_SECONDS = 10.0
STALE_SECONDS = 35.0  # three renewals missed: the holder is gone


class RunInUse(Exception):
    """Another live run holds the run directory; the message names it."""


class RunLease:
    """The lease of one run directory, held by this process while the ``with`` block runs."""

    def __init__(self, run_uri: str, options: StorageOptions | None = None,
                 log: Callable[[str], None] = print, renew_seconds: float = RENEW_SECONDS,
                 stale_seconds: float = STALE_SECONDS):
        self.run_uri, self.options, self.log = run_uri, options, log
        self.renew_seconds, self.stale_seconds = renew_seconds, stale_seconds
        self.fs, root = open_filesystem(run_uri, options)
        self.path = posixpath.join(root, LEASE_FILE)
        self.holder = {"id": uuid.uuid4().hex, "host": socket.gethostname(), "pid": os.getpid(),
                       "started": time.time()}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _read(self) -> dict | None:
        try:
            return json.loads(self.fs.cat_file(self.path))
        except FileNotFoundError:
            return None
        except ValueError:  # a half-written lease: its writer died mid-write
            return None

    def _write(self) -> None:
        body = json.dumps({**self.holder, "renewed": time.time()}).encode()
        storage_call(self.run_uri, self.options, self.fs.pipe_file, self.path, body)

    def acquire(self) -> None:
        """Take the lease, or raise RunInUse when a live run holds it."""
        current = storage_call(self.run_uri, self.options, self._read)
        if current is not None and not self._gone(current):
            self.log(f"run directory {self.run_uri} has the lease of another run (host "
                     f"{current.get('host')}, pid {current.get('pid')}): waiting up to "
                     f"{self.stale_seconds:.0f} s to see whether it is alive")
            deadline = float(current.get("renewed", 0)) + self.stale_seconds
            while time.time() < deadline:
                time.sleep(min(1.0, self.renew_seconds / 4))
                now = storage_call(self.run_uri, self.options, self._read)
                if now is None:  # released: its run ended
                    break
                if now.get("renewed") != current.get("renewed"):
                    raise RunInUse(self._in_use(now))
            else:
                self.log(f"taking over the lease of {self.run_uri}: its holder did not renew "
                         f"it for {self.stale_seconds:.0f} s")
        self._write()
        self._thread = threading.Thread(target=self._renew, daemon=True, name="run-lease")
        self._thread.start()

    def _gone(self, lease: dict) -> bool:
        """True when the lease's holder is known dead: released, stale, or a process of this
        host that no longer exists."""
        if time.time() - float(lease.get("renewed", 0)) >= self.stale_seconds:
            return True
        if lease.get("host") != self.holder["host"]:
            return False
        try:
            os.kill(int(lease.get("pid", 0)), 0)
        except ProcessLookupError:
            return True
        except (PermissionError, ValueError, OverflowError):
            return False
        return False

    def _in_use(self, lease: dict) -> str:
        started = time.strftime("%Y-%m-%d %H:%M:%S UTC",
                                time.gmtime(float(lease.get("started", 0))))
        return (f"run directory {self.run_uri} is in use by a live run (host {lease.get('host')},"
                f" pid {lease.get('pid')}, started {started}): wait for it to end, or give this "
                "run another run.name")

    def _renew(self) -> None:
        while not self._stop.wait(self.renew_seconds):
            try:
                self._write()
            except Exception as err:  # noqa: BLE001 - a missed renewal is retried; the run goes on
                self.log(f"could not renew the lease of {self.run_uri}: {err}")

    def release(self) -> None:
        """Stop renewing and delete the lease, if it is still this run's. A lease that cannot be
        deleted (the storage is down: often why the run ended) is said and left: it goes stale
        and the next run takes it over."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        try:
            current = storage_call(self.run_uri, self.options, self._read)
            if current is not None and current.get("id") == self.holder["id"]:
                storage_call(self.run_uri, self.options, self.fs.rm_file, self.path)
        except Exception as err:  # noqa: BLE001 - the run's own outcome is what to report
            self.log(f"the lease of {self.run_uri} was left in place ({err}); the next run "
                     f"takes it over after {self.stale_seconds:.0f} s")

    def __enter__(self) -> RunLease:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
