"""Where a stream is in its data: the epoch, the seed of its shard order, the shards consumed.

Each epoch reads every shard once, in a permutation drawn from (seed, epoch). The stream keeps
that order (Ray Data's ``preserve_order``), so the shards consumed form a prefix of the
permutation: the cursor is (epoch, number of shards fully consumed). A resumed stream starts at
the first shard not fully consumed by every worker; the samples of that shard and later ones that
had already been used are read again, and ``CursorTracker`` counts them.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class DataCursor:
    seed: int
    epoch: int = 0
    shards_consumed: int = 0  # a prefix of this epoch's permutation

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "DataCursor":
        return cls(seed=int(data["seed"]), epoch=int(data["epoch"]),
                   shards_consumed=int(data["shards_consumed"]))


def epoch_order(num_shards: int, seed: int, epoch: int) -> list[int]:
    """The shard indices of one epoch, in their seeded reading order."""
    return np.random.default_rng([seed, epoch]).permutation(num_shards).tolist()


def shard_schedule(num_shards: int, cursor: DataCursor, epochs: int) -> list[tuple[int, int, int]]:
    """(epoch, position, shard index) from the cursor through the end of epoch ``epochs - 1``."""
    schedule = []
    for epoch in range(cursor.epoch, epochs):
        order = epoch_order(num_shards, cursor.seed, epoch)
        start = cursor.shards_consumed if epoch == cursor.epoch else 0
        schedule += [(epoch, position, order[position]) for position in range(start, num_shards)]
    return schedule


class CursorTracker:
    """Follows the (epoch, position) of consumed samples and says what a checkpoint should hold.

    Besides the shard being read, it keeps the samples consumed per shard that no checkpoint has
    closed yet (those a resume reads again) and per shard since the last checkpoint (the run's
    record of what was trained).
    """

    def __init__(self, start: DataCursor, num_shards: int):
        self.seed = start.seed
        self.num_shards = num_shards
        self.current = (start.epoch, start.shards_consumed)
        self.open: Counter = Counter()  # (epoch, position) -> samples, shards not yet closed
        self.since_checkpoint: Counter = Counter()

    def observe(self, epochs: np.ndarray, positions: np.ndarray) -> None:
        """Record a consumed batch's ``epoch`` and ``position`` columns."""
        for epoch, position in zip(np.asarray(epochs).tolist(), np.asarray(positions).tolist()):
            self.current = (int(epoch), int(position))
            self.open[self.current] += 1
            self.since_checkpoint[self.current] += 1

    def cursor(self) -> DataCursor:
        """Resume point: every shard before the one being read is fully consumed."""
        epoch, position = self.current
        return DataCursor(seed=self.seed, epoch=epoch, shards_consumed=position)

    def cursor_at_end_of_stream(self) -> DataCursor:
        """Resume point once the stream has ended: its last shard is complete too."""
        epoch, position = self.current
        if position + 1 >= self.num_shards:
            return DataCursor(seed=self.seed, epoch=epoch + 1, shards_consumed=0)
        return DataCursor(seed=self.seed, epoch=epoch, shards_consumed=position + 1)

    def checkpoint_part(self, exhausted: bool) -> dict:
        """This worker's share of a checkpoint: its resume point, the samples of shards it has
        not finished, and what it consumed since the last checkpoint (which it then forgets)."""
        mine = self.cursor_at_end_of_stream() if exhausted else self.cursor()
        part = {"position": (mine.epoch, mine.shards_consumed), "open": dict(self.open),
                "consumed": dict(self.since_checkpoint)}
        self.since_checkpoint = Counter()
        return part

    def close_before(self, cursor: DataCursor) -> None:
        """Forget shards before ``cursor``: a resume from it does not read them again."""
        start = (cursor.epoch, cursor.shards_consumed)
        self.open = Counter({shard: n for shard, n in self.open.items() if shard >= start})


def merge_checkpoint_parts(seed: int, parts: list[dict]) -> tuple[DataCursor, int, dict[str, int]]:
    """Every worker's ``checkpoint_part`` -> (the cursor all agree on: the earliest shard any of
    them still reads, the samples a resume from it reads again, samples consumed per shard as
    ``"epoch:position"``)."""
    epoch, position = min(tuple(part["position"]) for part in parts)
    cursor = DataCursor(seed=seed, epoch=epoch, shards_consumed=position)
    in_flight = sum(n for part in parts for shard, n in part["open"].items()
                    if tuple(shard) >= (epoch, position))
    consumed: Counter = Counter()
    for part in parts:
        consumed.update({f"{e}:{p}": n for (e, p), n in part["consumed"].items()})
    return cursor, in_flight, dict(sorted(consumed.items()))
