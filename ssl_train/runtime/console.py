"""The run's console: rank 0 writes its lines, the driver prints them.

Rank 0 composes the progress line (one a log step) and the run's few notes (the resume, the
energy projection, data running out). Printed by rank 0 itself, each would reach the driver's
terminal through Ray's log forwarding with the worker's prefix (``(RayTrainWorker pid=..,
ip=..)``), and a Kubernetes job's submitter log would read as a worker's. Instead rank 0 puts
each line on a small queue actor (Ray's ``ray.util.queue.Queue``, no CPU) that the driver owns,
and a thread of the driver prints them as they come, through the same ``log`` as the driver's
own lines. One round trip a log step, from rank 0 only.
"""

from __future__ import annotations

import sys
import threading
from typing import Callable

POLL_SECONDS = 0.5  # how long the driver's thread waits for a line before checking for the end


class ConsoleWriter:
    """What rank 0 calls with a line (picklable: travels in the train loop's config)."""

    def __init__(self, queue):
        self.queue = queue

    def __call__(self, line: str) -> None:
        try:
            self.queue.put(line)
        except Exception:  # the driver is gone (the run is ending anyway): keep the line
            sys.stdout.write(line + "\n")
            sys.stdout.flush()


class DriverConsole:
    """Prints, on the driver, the lines written by a ``writer()`` in the workers.

    Made once connected to Ray (the queue is an actor); a context manager around ``fit()``: on
    leaving it, the lines still queued are printed before the queue ends, so the last step's
    line is never lost.
    """

    def __init__(self, log: Callable[[str], None] = print):
        from ray.util.queue import Queue

        self.log = log
        self.queue = Queue(actor_options={"num_cpus": 0})  # a full cluster still has room
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> DriverConsole:
        self._thread = threading.Thread(target=self._print_lines, name="run-console",
                                        daemon=True)
        self._thread.start()
        return self

    def writer(self) -> ConsoleWriter:
        return ConsoleWriter(self.queue)

    def _print_lines(self) -> None:
        from ray.util.queue import Empty

        while not self._stop.is_set():
            try:
                line = self.queue.get(timeout=POLL_SECONDS)
            except Empty:
                continue
            except Exception:  # the queue's actor is gone: nothing more can arrive
                return
            self.log(line)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        try:
            for line in self.queue.get_nowait_batch(self.queue.qsize()):
                self.log(line)
        except Exception:  # the queue's actor is gone: its lines with it (an error is on its way)
            pass
        finally:
            self.queue.shutdown(force=True)
