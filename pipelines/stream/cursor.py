"""Where a stream is in its data: the epoch, the seed of its shard order, the shards consumed.

Each epoch reads every shard once, in a permutation drawn from (seed, epoch). Shards are read
several at a time and finish in any order, so the cursor is a watermark and the shards finished
beyond it: (epoch, ``shards_consumed``: every position of the epoch's permutation before it is
consumed, ``done``: the (epoch, position) pairs after it that are consumed too). ``done`` holds
only the shards that finished while an earlier one was still being read: a few read-aheads' worth.

A shard is consumed when every sample its reader read is either trained on (by any worker) or
was dropped by the view stage; the data stage's ledger knows what was read and dropped, the
workers what they trained on (``merge_checkpoint_parts``). A resumed stream reads every shard
the cursor does not cover; the samples of those already trained on are read again, and counted.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np

Shard = tuple[int, int]  # (epoch, position in the epoch's permutation)


@dataclass(frozen=True)
class DataCursor:
    seed: int
    epoch: int = 0
    shards_consumed: int = 0  # every position of this epoch's permutation before it is consumed
    done: tuple[Shard, ...] = ()  # consumed shards after the watermark, sorted

    def covers(self, shard: Shard) -> bool:
        """Whether a resume from this cursor skips ``shard``."""
        return tuple(shard) < (self.epoch, self.shards_consumed) or tuple(shard) in self.done

    def to_dict(self) -> dict:
        return {"seed": self.seed, "epoch": self.epoch, "shards_consumed": self.shards_consumed,
                "done": [list(shard) for shard in self.done]}

    @classmethod
    def from_dict(cls, data: dict) -> "DataCursor":
        return cls(seed=int(data["seed"]), epoch=int(data["epoch"]),
                   shards_consumed=int(data["shards_consumed"]),
                   done=tuple(sorted((int(e), int(p)) for e, p in data.get("done", ()))))

    def advanced(self, num_shards: int, consumed: Iterable[Shard]) -> "DataCursor":
        """This cursor with ``consumed`` shards added: the watermark moves over every run of
        consumed positions, and the rest stay in ``done``."""
        done = set(self.done) | {tuple(s) for s in consumed if not self.covers(s)}
        epoch, position = self.epoch, self.shards_consumed
        while (epoch, position) in done:
            done.remove((epoch, position))
            epoch, position = (epoch + 1, 0) if position + 1 == num_shards else (epoch,
                                                                                  position + 1)
        return DataCursor(self.seed, epoch, position, tuple(sorted(done)))


def epoch_order(num_shards: int, seed: int, epoch: int) -> list[int]:
    """The shard indices of one epoch, in their seeded reading order."""
    return np.random.default_rng([seed, epoch]).permutation(num_shards).tolist()


def epoch_groups(num_shards: int, cursor: DataCursor, epoch: int, size: int
                 ) -> list[list[tuple[int, int]]]:
    """The (position, shard index) pairs of one epoch that ``cursor`` does not cover, in the
    permutation's order, cut into groups of ``size`` (the shards one read task reads at once)."""
    order = epoch_order(num_shards, cursor.seed, epoch)
    start = cursor.shards_consumed if epoch == cursor.epoch else 0
    done = {position for e, position in cursor.done if e == epoch}
    left = [(position, order[position]) for position in range(start, num_shards)
            if position not in done]
    return [left[i:i + size] for i in range(0, len(left), size)]


class CursorTracker:
    """One worker's record of what it trained on: the samples per shard that no checkpoint has
    closed yet (those a resume reads again) and per shard since the last checkpoint (the run's
    record of what was trained)."""

    def __init__(self, start: DataCursor):
        self.seed = start.seed
        self.open: Counter = Counter()  # (epoch, position) -> samples, shards not yet consumed
        self.since_checkpoint: Counter = Counter()

    def observe(self, epochs: np.ndarray, positions: np.ndarray) -> None:
        """Record a consumed batch's ``epoch`` and ``position`` columns."""
        for shard in zip(np.asarray(epochs).tolist(), np.asarray(positions).tolist()):
            self.open[shard] += 1
            self.since_checkpoint[shard] += 1

    def checkpoint_part(self, exhausted: bool) -> dict:
        """This worker's share of a checkpoint: the samples of shards not yet consumed, what it
        trained on since the last checkpoint (which it then forgets), whether its stream ended."""
        part = {"open": dict(self.open), "consumed": dict(self.since_checkpoint),
                "exhausted": exhausted}
        self.since_checkpoint = Counter()
        return part

    def close(self, cursor: DataCursor) -> None:
        """Forget the shards ``cursor`` covers: a resume from it does not read them again."""
        self.open = Counter({shard: n for shard, n in self.open.items()
                             if not cursor.covers(shard)})


def merge_checkpoint_parts(
    cursor: DataCursor, num_shards: int, epochs: int, parts: list[dict],
    finished: Mapping[Shard, tuple[int, int]],
) -> tuple[DataCursor, int, dict[str, int]]:
    """Every worker's ``checkpoint_part`` and the stage's ledger (``finished``: shard -> (samples
    read, samples dropped) for the shards whose reading ended) -> (the new cursor, the samples a
    resume from it reads again, samples trained per shard since the last checkpoint as
    ``"epoch:position"``). A shard is consumed when what was trained on and what was dropped add
    up to what was read; a stream that ended on every worker consumed everything."""
    trained: Counter = Counter()
    for part in parts:
        trained.update({tuple(shard): n for shard, n in part["open"].items()})
    if parts and all(part["exhausted"] for part in parts):
        new = DataCursor(seed=cursor.seed, epoch=epochs)
    else:
        new = cursor.advanced(num_shards, (
            shard for shard, (read, dropped) in finished.items()
            if trained.get(tuple(shard), 0) + dropped >= read))
    in_flight = sum(n for shard, n in trained.items() if not new.covers(shard))
    consumed: Counter = Counter()
    for part in parts:
        consumed.update({f"{e}:{p}": n for (e, p), n in part["consumed"].items()})
    return new, in_flight, dict(sorted(consumed.items()))
