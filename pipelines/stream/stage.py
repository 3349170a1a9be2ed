"""The streaming data stage on Ray Data: shards in, batches of training-ready views out.

    shard schedule (seeded permutation per epoch, from the cursor)
      -> read shards (tasks; a damaged shard is counted and the stream goes on)
      -> decode, filter, cut views (an actor pool on CPU resources)
      -> the views the objectives declared (uint8), [photometric parameters], epoch, position

The dataset feeds ``ray.train.get_dataset_shard(...).iter_torch_batches(...)`` under Ray Train,
or is iterated directly (``DataStage.iter_batches``) for benchmarks and debugging. Every image
read, dropped (by reason) or emitted is counted by the process that handled it, as its own
Prometheus series, and sent in batches to a totals actor that nothing waits on. Sample order is preserved so that the data cursor is a prefix of the schedule.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Annotated, Any

import numpy as np
from pydantic import Field

from pipelines.cluster import ensure_ray
from pipelines.settings import StrictSection
from pipelines.storage.access import (
    StorageError,
    StorageOptions,
    StorageUnavailable,
    explain,
    unavailable_reason,
)
from pipelines.storage.shards import ReadStats, ShardError
from pipelines.stream.cursor import CursorTracker, DataCursor, shard_schedule
from pipelines.stream.sources import ShardRef, SourceConfig, list_shards, read_shard
from pipelines.views.augment import HYBRID_VIEWS, AugmentConfig, ViewSpec, make_views
from pipelines.views.decode import Rejected
from pipelines.views.photometric import PHOTOMETRIC_FIELDS
from pipelines.views.quality import QualityConfig

logger = logging.getLogger(__name__)

READ_BATCH = 32  # samples per block leaving the shard reader


class DataConfig(StrictSection):
    """The data stage of a training run."""

    source: SourceConfig = SourceConfig()
    quality: QualityConfig = QualityConfig()
    augment: AugmentConfig = AugmentConfig()
    seed: int = 0
    epochs: Annotated[int, Field(ge=1)] = 1000
    view_workers: Annotated[int, Field(ge=1)] = 2  # upper bound of the decode/augment actor pool
    view_batch_size: Annotated[int, Field(ge=1)] = 32


class _Totals:
    """The stage's totals, for ``DataStage.counters``: an actor that nothing on the hot path
    waits on. Each process sends what it counted at most every ``TALLY_SECONDS`` (and its rest
    when it ends), without waiting for a reply; view workers say when they start and end, so
    that a finished stream's totals can wait for the last of them."""

    def __init__(self):
        self.totals: Counter = Counter()
        self.open_workers: set[str] = set()
        self.closed_workers: set[str] = set()

    def add(self, delta: dict[str, int], worker: str | None = None, closing: bool = False) -> None:
        self.totals.update(delta)
        if worker is not None:
            (self.closed_workers if closing else self.open_workers).add(worker)

    def snapshot(self) -> tuple[dict[str, int], int]:
        """(totals, view workers started but not yet ended)."""
        return dict(self.totals), len(self.open_workers - self.closed_workers)


TALLY_SECONDS = 5.0


class _Tally:
    """What one process of the stage counted: exported at once as this process's Prometheus
    series, sent to the totals actor in batches (fire and forget). ``add`` never blocks."""

    def __init__(self, totals, run: str, worker: str | None = None):
        from pipelines.stream.telemetry import DataTelemetry

        self.totals, self.worker = totals, worker
        self.telemetry = DataTelemetry(run) if totals is not None else None
        self.pending: Counter = Counter()
        self.sent = time.monotonic()
        if totals is not None and worker is not None:
            totals.add.remote({}, worker)

    def add(self, delta: dict[str, int]) -> None:
        if self.totals is None:  # counters off (the benchmark's baseline)
            return
        self.telemetry.record(delta)
        self.pending.update(delta)
        if time.monotonic() - self.sent >= TALLY_SECONDS:
            self.flush()

    def flush(self, closing: bool = False) -> None:
        if self.totals is None or not (self.pending or closing):
            return
        self.totals.add.remote(dict(self.pending), self.worker, closing)
        self.pending = Counter()
        self.sent = time.monotonic()


_READER_TALLIES: dict[str, _Tally] = {}


def _reader_tally(totals, run: str) -> _Tally:
    """This reader process's tally (a task process reads many shards)."""
    key = f"{run}:{id(totals)}"
    if key not in _READER_TALLIES:
        _READER_TALLIES[key] = _Tally(totals, run)
    return _READER_TALLIES[key]


def _read_shards(batch: dict[str, np.ndarray], source: SourceConfig, options: StorageOptions,
                 totals, run: str, process_hook: Callable[[], None] | None = None
                 ) -> Iterator[dict[str, Any]]:
    if process_hook is not None:
        process_hook()
    for shard_json, epoch, position in zip(batch["shard"], batch["epoch"], batch["position"]):
        shard = ShardRef.from_json(str(shard_json))
        stats = ReadStats()
        keys: list[str] = []
        datas: list[bytes] = []
        delta: Counter = Counter()

        def flush():
            out = {"key": np.array(keys, dtype=object), "data": np.array(datas, dtype=object),
                   "epoch": np.full(len(keys), epoch, dtype=np.int64),
                   "position": np.full(len(keys), position, dtype=np.int64)}
            keys.clear()
            datas.clear()
            return out

        try:
            for key, data in read_shard(shard, source, options, stats):
                keys.append(key)
                datas.append(data)
                delta["images_read"] += 1
                delta["bytes_read"] += len(data)
                if len(keys) == READ_BATCH:
                    yield flush()
        except (ShardError, StorageError, OSError, ValueError) as err:
            # Storage that stays down after every retry stops the stream (the run resumes
            # later from its checkpoint); skipping would silently drop good shards.
            if isinstance(err, StorageUnavailable):
                raise
            if unavailable_reason(err):
                raise explain(err, shard.uri, options) from err
            # Anything else is a bug and stops the stream; a bad shard must not.
            delta["shard_errors"] += 1
            logger.warning("skipping the rest of shard %s: %s", shard.uri, err)
        delta["shards_read"] += 1
        delta.update({f"skipped_{k}": v for k, v in stats.skipped_members.items()})
        tally = _reader_tally(totals, run)
        tally.add(delta)
        tally.flush()  # once a shard, not waited on: a task process may read no other
        if keys:
            yield flush()


class _ViewMaker:
    """An actor of the decode/augment pool: bytes in, views out, drops counted by reason."""

    def __init__(self, image_size: int, augment: AugmentConfig, quality: QualityConfig,
                 seed: int, totals, run: str, process_hook: Callable[[], None] | None = None,
                 views: tuple[ViewSpec, ...] | list[ViewSpec] = HYBRID_VIEWS):
        if process_hook is not None:
            process_hook()
        self.image_size = image_size
        self.views = list(views)
        self.augment = augment
        self.quality = quality
        self.seed = seed
        self.tally = _Tally(totals, run, worker=uuid.uuid4().hex)

    def __del__(self):
        # Ray Data ends its pool's actors gracefully (``__ray_shutdown__``), which drops this
        # object: the rest of the tally goes out with the worker's end.
        tally = getattr(self, "tally", None)
        if tally is not None:
            tally.flush(closing=True)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows: list[dict[str, np.ndarray]] = []
        epochs, positions = [], []
        dropped: Counter = Counter()
        for key, data, epoch, position in zip(batch["key"], batch["data"], batch["epoch"],
                                              batch["position"]):
            # Views depend on (seed, epoch, key) only: the same in any actor, on any rerun.
            rng = np.random.default_rng([self.seed, int(epoch), _stable_hash(str(key))])
            try:
                rows.append(make_views(data, rng, self.image_size, self.augment, self.quality,
                                       self.views))
            except Rejected as rejected:
                dropped[f"dropped_{rejected.reason}"] += 1
                continue
            epochs.append(epoch)
            positions.append(position)
        self.tally.add({**dropped, "images_emitted": len(rows)})
        out = {}
        on_device = self.augment.photometric_on == "device"
        for view in self.views:
            size = view.size or self.image_size
            names = [view.name] + ([f"{view.name}_photometric"]
                                   if on_device and view.photometric else [])
            for name in names:
                if rows:
                    out[name] = np.stack([row[name] for row in rows])
                elif name.endswith("photometric"):
                    out[name] = np.zeros((0, len(PHOTOMETRIC_FIELDS)), dtype=np.float32)
                else:
                    out[name] = np.zeros((0, size, size, 3), dtype=np.uint8)
        out["epoch"] = np.array(epochs, dtype=np.int64)
        out["position"] = np.array(positions, dtype=np.int64)
        return out


def _stable_hash(text: str) -> int:
    import zlib

    return zlib.crc32(text.encode())


class DataStage:
    """One run's data stage: the shard list, the Ray Data dataset and its counters."""

    def __init__(self, config: DataConfig, image_size: int, options: StorageOptions | None = None,
                 cursor: DataCursor | None = None, address: str | None = None,
                 run_name: str = "adhoc", process_hook: Callable[[], None] | None = None,
                 views: tuple[ViewSpec, ...] | list[ViewSpec] = HYBRID_VIEWS,
                 counters: bool = True):
        self.config = config
        self.views = list(views)  # what the objectives declared: only these are cut
        # Called once in every process of the stage (the run's energy meter counts them).
        self.process_hook = process_hook
        self.image_size = image_size
        self.options = (options or StorageOptions()).with_environment_endpoint()
        self.shards = list_shards(config.source, self.options)
        self.start = cursor or DataCursor(seed=config.seed)
        self.ray = ensure_ray(address)
        self.run_name = run_name
        # counters=False: no series, no totals (only to measure what counting costs)
        self._totals = self.ray.remote(num_cpus=0)(_Totals).remote() if counters else None

    def dataset(self):
        """The streaming dataset from the cursor to the end of the configured epochs."""
        import ray.data

        schedule = shard_schedule(len(self.shards), self.start, self.config.epochs)
        if not schedule:
            raise StorageError("the data cursor is past the last configured epoch: nothing to read")
        context = ray.data.DataContext.get_current()
        context.execution_options.preserve_order = True
        items = [{"shard": self.shards[index].to_json(), "epoch": epoch, "position": position}
                 for epoch, position, index in schedule]
        ds = ray.data.from_items(items, override_num_blocks=len(items))
        ds = ds.map_batches(
            _read_shards, batch_size=1, num_cpus=1,
            fn_kwargs={"source": self.config.source, "options": self.options,
                       "totals": self._totals, "run": self.run_name,
                       "process_hook": self.process_hook},
        )
        ds = ds.map_batches(
            _ViewMaker,
            batch_size=self.config.view_batch_size,
            num_cpus=1,
            compute=ray.data.ActorPoolStrategy(size=self.config.view_workers),
            fn_constructor_kwargs={
                "image_size": self.image_size, "augment": self.config.augment,
                "quality": self.config.quality, "seed": self.config.seed,
                "totals": self._totals, "run": self.run_name, "process_hook": self.process_hook,
                "views": self.views,
            },
        )
        ds.context.execution_options.preserve_order = True
        return ds

    def tracker(self) -> CursorTracker:
        return CursorTracker(self.start, len(self.shards))

    def iter_batches(self, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
        """Batches of numpy arrays straight from the dataset, without Ray Train."""
        yield from self.dataset().iter_batches(batch_size=batch_size, batch_format="numpy",
                                               drop_last=False)

    def counters(self, settle_seconds: float = 30.0) -> dict[str, int]:
        """Counts so far: images/bytes read, dropped by reason, emitted, shard errors. After a
        stream has ended, waits (up to ``settle_seconds``) for its view workers' last counts."""
        if self._totals is None:
            raise RuntimeError("this data stage was built with counters=False")
        deadline = time.monotonic() + settle_seconds
        while True:
            totals, running = self.ray.get(self._totals.snapshot.remote())
            if not running or time.monotonic() > deadline:
                return totals
            time.sleep(0.1)
