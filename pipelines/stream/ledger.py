"""The data stage's ledger: an actor that keeps the stage's totals and, for the data cursor,
what each shard read and which of its samples the view stage dropped.

Light on purpose (no Ray Data, no torch): the training workers and the launcher import it to
find or open the ledger without loading the stage's dependencies.
"""

from __future__ import annotations

from collections import Counter, defaultdict

from pipelines.stream.cursor import DataCursor, Shard

LEDGER_NAMESPACE = "ssl-data"


class StageLedger:
    """The stage's ledger: an actor that nothing on the hot path waits on. Each process sends
    what it counted at most every ``stage.TALLY_SECONDS`` (and its rest when it ends), without
    waiting for a reply; view workers say when they start and end, so that a finished stream's
    totals can wait for the last of them. For the cursor it keeps, per shard not yet consumed,
    the samples its reader read (once the reading ended) and the keys of those the view stage
    dropped (a set: a retried block counts once)."""

    def __init__(self):
        self.totals: Counter = Counter()
        self.open_workers: set[str] = set()
        self.closed_workers: set[str] = set()
        self.read: dict[Shard, int] = {}
        self.dropped: defaultdict[Shard, set[str]] = defaultdict(set)

    def add(self, delta: dict[str, int], worker: str | None = None, closing: bool = False,
            read: dict[Shard, int] | None = None,
            dropped: dict[Shard, list[str]] | None = None) -> None:
        self.totals.update(delta)
        if worker is not None:
            (self.closed_workers if closing else self.open_workers).add(worker)
        self.read.update(read or {})
        for shard, keys in (dropped or {}).items():
            self.dropped[shard].update(keys)

    def snapshot(self) -> tuple[dict[str, int], int]:
        """(totals, view workers started but not yet ended)."""
        return dict(self.totals), len(self.open_workers - self.closed_workers)

    def finished_shards(self) -> dict[Shard, tuple[int, int]]:
        """Shard -> (samples read, samples dropped), for the shards whose reading ended."""
        return {shard: (n, len(self.dropped.get(shard, ()))) for shard, n in self.read.items()}

    def forget(self, cursor: dict) -> None:
        """Drop what ``cursor`` covers: those shards are never read again."""
        covered = DataCursor.from_dict(cursor).covers
        self.read = {shard: n for shard, n in self.read.items() if not covered(shard)}
        for shard in [shard for shard in self.dropped if covered(shard)]:
            del self.dropped[shard]


def open_ledger(name: str | None = None):
    """A handle on the stage's ledger: the one named ``name`` (in ``LEDGER_NAMESPACE``) if it
    exists, else a new one. A non-detached actor lives as long as its creator's references, so a
    run's driver opens the named ledger first and holds it: the data stages of its restarted
    worker groups then find the same one. (Opened by the first stage instead, it was gone after
    the first restart, and the restarted rank 0, looking it up, failed the run once more:
    measured, two restarts for one killed worker.)"""
    import ray

    actor = ray.remote(num_cpus=0)(StageLedger)
    if name is not None:
        actor = actor.options(name=name, namespace=LEDGER_NAMESPACE, get_if_exists=True)
    return actor.remote()
