"""When a stream's batches arrive: the measure of a stall, shared by the straggler test and
``benchmarks/stream_scale.py straggler``."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from tests.reliability.faultproxy import Fault


def arrivals(stage, batch_size: int = 2, on_first: Callable[[], None] | None = None,
             ) -> list[tuple[float, set[tuple[int, int]]]]:
    """(seconds since the stream started, the batch's (epoch, position)s) of every batch of a
    ``DataStage``. ``on_first`` is called when the first batch has arrived."""
    started, out = time.perf_counter(), []
    for batch in stage.iter_batches(batch_size=batch_size):
        out.append((time.perf_counter() - started,
                    set(zip(batch["epoch"].tolist(), batch["position"].tolist()))))
        if on_first is not None and len(out) == 1:
            on_first()
    return out


def arrivals_with_a_straggler(stage, proxy, shard: str, delay: float,
                              ) -> tuple[list[tuple[float, set[tuple[int, int]]]], Fault]:
    """``arrivals(stage)`` with the first GET of ``shard`` (through ``proxy``) held until
    ``delay`` seconds after the stream's first batch; returns them and the fault.

    Counted from the first batch, not from the read: the stream's start-up (7-13 s on two cores,
    minutes when they are busy) would otherwise hide part of the delay, or all of it. The read
    is held ``delay`` + 600 s at most, should no batch ever come."""
    release = threading.Event()
    fault = proxy.add(Fault("slow", frozenset({"GET"}), path=f"/shards/{shard}$",
                            delay_s=delay + 600, release=release, limit=1))
    releaser = threading.Timer(delay, release.set)
    try:
        return arrivals(stage, on_first=releaser.start), fault
    finally:
        releaser.cancel()


def longest_gap(times: list[float]) -> float:
    """The longest wait between two consecutive times (0 for fewer than two)."""
    return max((b - a for a, b in zip(times, times[1:])), default=0.0)
