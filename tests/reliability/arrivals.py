"""When a stream's batches arrive: the measure of a stall, shared by the straggler test and
``benchmarks/stream_scale.py straggler``."""

from __future__ import annotations

import time
from collections.abc import Callable


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


def longest_gap(times: list[float]) -> float:
    """The longest wait between two consecutive times (0 for fewer than two)."""
    return max((b - a for a, b in zip(times, times[1:])), default=0.0)
