"""The streaming data stage on Ray Data: shards in, batches of training-ready views out.

    epochs from the cursor (one row each)
      -> the epoch's groups: its seeded permutation, less what the cursor covers, cut into
         groups of ``read_shards_at_once`` (one task at a time, one block a group)
      -> a view worker (an actor pool, a CPU each) takes a group: reads its shards side by side
         (a thread each), their samples interleaved in turn, and cuts the views of each
         ``view_batch_size`` samples as they arrive (decode, filter, crop); a damaged shard is
         counted and the stream goes on
      -> the views the objectives declared (uint8), [photometric parameters], epoch, position:
         one block a view batch

Nothing on the driver grows with epochs x shards: the groups are made by a task, an epoch at a
time, as the stream needs them. Groups finish in any order (no ``preserve_order``) and go to
idle workers only, so a slow read holds back only its own group and its worker while the other
workers go on. Within a group the order is fixed (shard by shard in turn), so a retried group
yields the same samples in the same order.

The reads are in the view workers, not tasks of their own: Ray Data hands a map task's output
on in blocks of up to 128 MiB, so separate read tasks gave each group to one view worker as one
block, once read, and left the others idle (docs/benchmarks.md, "Data stage throughput").

The dataset feeds ``ray.train.get_dataset_shard(...).iter_torch_batches(...)`` under Ray Train,
or is iterated directly (``DataStage.iter_batches``) for benchmarks and debugging. Every image
read, dropped (by reason) or emitted is counted by the process that handled it, as its own
Prometheus series, and sent in batches to the stage's ledger, an actor that nothing waits on;
the ledger also keeps, for the data cursor, what each shard read and which of its samples the
view stage dropped (``pipelines.stream.cursor.merge_checkpoint_parts``).
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from typing import Annotated, Any

import numpy as np
from pydantic import Field

from pipelines.cluster import ensure_ray
from pipelines.settings import ConfigError, StrictSection
from pipelines.storage.access import (
    StorageError,
    StorageOptions,
    StorageUnavailable,
    explain,
    unavailable_reason,
)
from pipelines.storage.shards import ReadStats, ShardError
from pipelines.stream.cursor import CursorTracker, DataCursor, Shard, epoch_groups
from pipelines.stream.ledger import open_ledger
from pipelines.stream.sources import ShardRef, SourceConfig, list_shards, read_shard
from pipelines.views.augment import HYBRID_VIEWS, AugmentConfig, ViewSpec, make_views
from pipelines.views.decode import Rejected
from pipelines.views.photometric import PHOTOMETRIC_FIELDS
from pipelines.views.quality import QualityConfig

logger = logging.getLogger(__name__)

READ_AHEAD = 8  # samples each shard of a group reads ahead of the interleave
GROUPS_PER_BLOCK = 256  # groups the schedule task emits at once
EPOCH_BLOCKS = 256  # blocks of the epochs' rows (a task takes one epoch at a time regardless)


class DataConfig(StrictSection):
    """The data stage of a training run."""

    source: SourceConfig = Field(
        SourceConfig(),
        description="Where the shards are and their format.")
    quality: QualityConfig = Field(
        QualityConfig(),
        description="The per-sample quality filters.")
    augment: AugmentConfig = Field(
        AugmentConfig(),
        description="The photometric augmentation and where it runs.")
    seed: int = Field(
        0,
        description=("Seed of each epoch's shard order and of the views (a function of seed, "
        "epoch and sample)."))
    epochs: Annotated[int, Field(ge=1)] = Field(
        1000,
        description="Passes over the shards at most (the run stops at train.steps first).")
    # Shards a view worker reads side by side; a batch mixes their samples in turn.
    read_shards_at_once: Annotated[int, Field(ge=1)] = Field(
        16,
        description=("Shards a view worker reads side by side; a batch mixes their samples in "
        "turn."))
    # Actors that read groups and cut their views (each reads a group's shards side by side
    # in threads, and takes one CPU).
    view_workers: Annotated[int, Field(ge=1)] = Field(
        2,
        description="Actors that read groups of shards and cut their views, a CPU each.")
    view_batch_size: Annotated[int, Field(ge=1)] = Field(
        32,
        description=("Samples a view worker cuts at once; each such batch leaves as its own "
        "block."))


TALLY_SECONDS = 5.0
_TELEMETRY: dict[str, Any] = {}


def _telemetry(run: str):
    """This process's Prometheus series of the run (one set, however many tasks it runs)."""
    from pipelines.stream.telemetry import DataTelemetry

    if run not in _TELEMETRY:
        _TELEMETRY[run] = DataTelemetry(run)
    return _TELEMETRY[run]


class _Tally:
    """What one view worker counted: exported at once as this process's Prometheus
    series, sent to the ledger in batches (fire and forget). ``add`` never blocks."""

    def __init__(self, ledger, run: str, worker: str | None = None):
        self.ledger, self.worker = ledger, worker
        self.telemetry = _telemetry(run) if ledger is not None else None
        self.pending: Counter = Counter()
        self.read: dict[Shard, int] = {}
        self.dropped: defaultdict[Shard, list[str]] = defaultdict(list)
        self.sent = time.monotonic()
        if ledger is not None and worker is not None:
            ledger.add.remote({}, worker)

    def add(self, delta: dict[str, int]) -> None:
        if self.ledger is None:  # counters off (the benchmark's baseline)
            return
        self.telemetry.record(delta)
        self.pending.update(delta)
        if time.monotonic() - self.sent >= TALLY_SECONDS:
            self.flush()

    def shard_read(self, shard: Shard, samples: int) -> None:
        self.read[shard] = samples

    def sample_dropped(self, shard: Shard, key: str) -> None:
        self.dropped[shard].append(key)

    def flush(self, closing: bool = False) -> None:
        if self.ledger is None or not (self.pending or self.read or self.dropped or closing):
            return
        self.ledger.add.remote(dict(self.pending), self.worker, closing, self.read,
                               dict(self.dropped))
        self.pending, self.read, self.dropped = Counter(), {}, defaultdict(list)
        self.sent = time.monotonic()


def _epoch_groups(batch: dict[str, np.ndarray], shards: list, cursor: dict, first_epoch: int,
                  group_size: int) -> Iterator[dict[str, np.ndarray]]:
    """One epoch (a row of the epochs' list) -> its groups, one row each, ``GROUPS_PER_BLOCK`` at a
    time. Rows carry the shards' JSON, so that read tasks need nothing else."""
    import ray

    refs = ray.get(shards[0])  # the shard list, put in the object store once
    start = DataCursor.from_dict(cursor)
    for index in batch["id"].tolist():
        epoch = first_epoch + int(index)
        groups = epoch_groups(len(refs), start, epoch, group_size)
        for at in range(0, len(groups), GROUPS_PER_BLOCK):
            chunk = groups[at:at + GROUPS_PER_BLOCK]
            yield {"epoch": np.full(len(chunk), epoch, dtype=np.int64),
                   "group": np.array([json.dumps([[p, refs[i]] for p, i in group])
                                      for group in chunk], dtype=object)}


def schedule_dataset(shards: list[str], cursor: DataCursor, epochs: int, group_size: int):
    """The groups of ``shards`` (their JSON) from ``cursor`` through epoch ``epochs - 1``, one
    block each: made by one task, an epoch at a time, as the stream needs them. The driver holds
    one row per epoch and the shard list, put in the object store once."""
    import ray
    import ray.data

    if cursor.epoch >= epochs:
        raise StorageError("the data cursor is past the last configured epoch: nothing to read")
    left = epochs - cursor.epoch
    # In memory, not ``ray.data.range``: a read task holds a CPU while the stream is paused,
    # which on a small cluster leaves none for the stages behind it.
    rows = ray.data.from_items([{"id": index} for index in range(left)],
                               override_num_blocks=min(left, EPOCH_BLOCKS))
    groups = rows.map_batches(
        _epoch_groups, batch_size=1, num_cpus=0,
        compute=ray.data.TaskPoolStrategy(size=1),  # epochs in order
        fn_kwargs={"shards": [ray.put(shards)], "cursor": cursor.to_dict(),
                   "first_epoch": cursor.epoch, "group_size": group_size},
    ).repartition(target_num_rows_per_block=1)
    return _fused_into_the_schedule(groups)


def _fused_into_the_schedule(ds):
    """``ds`` with its last operator (the repartition into one group a block) taking no CPU and
    one task at a time, as the schedule's map does, so that Ray Data fuses the two into one
    task.

    Ray Data 2.60's ``repartition(target_num_rows_per_block=...)`` takes no remote args or
    compute strategy. Left as it was, its tasks (no work: one group's row to a block) each took
    a CPU, and on a cluster with no CPU to spare beyond the workers, two of them took the view
    workers' CPUs and the stream never started (a hang in a search's trial and in a test run;
    on a 0-CPU cluster it never runs at all). With no CPU but its own compute strategy it was
    not fused with the schedule's map (task pools fuse only at equal sizes) and ran as tasks of
    its own, many at once, each in a worker process Ray started for it: 28 s of CPU over one
    run of ``benchmarks/data_stage.py --stage-only`` on 2 cores (docs/benchmarks.md, "Narrowed
    further"). Both are set on the logical operator, as Ray's own map operators carry
    theirs (Ray is pinned: ``test_the_schedule_of_groups_takes_no_cpu`` fails if these
    attributes move or the two stop being fused).
    """
    import ray.data

    op = ds._logical_plan.dag
    object.__setattr__(op, "ray_remote_args", {**op.ray_remote_args, "num_cpus": 0})
    object.__setattr__(op, "compute", ray.data.TaskPoolStrategy(size=1))
    return ds


class _End:
    def __init__(self, error: BaseException | None = None):
        self.error = error


def _read_into(shard: ShardRef, source: SourceConfig, options: StorageOptions, stats: ReadStats,
               sink: queue.Queue, cancelled: threading.Event) -> None:
    """A shard's samples into ``sink`` (bounded: reads stay ``READ_AHEAD`` ahead), then _End."""
    try:
        for item in read_shard(shard, source, options, stats):
            while not cancelled.is_set():
                try:
                    sink.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if cancelled.is_set():
                return
        sink.put(_End())
    except BaseException as err:  # judged by the interleave, in the task's own thread
        sink.put(_End(err))


def _interleave(epoch: int, group: list[tuple[int, ShardRef]], source: SourceConfig,
                options: StorageOptions, tally: _Tally) -> Iterator[tuple[str, bytes, int]]:
    """(key, bytes, position) of a group's samples: its shards read side by side (a thread
    each, ``READ_AHEAD`` samples ahead), their samples taken in turn, so that the order is the
    same on any rerun and a batch draws on every shard of the group. A damaged shard is counted
    and the rest go on; storage that stays down stops the stream."""
    sinks = [queue.Queue(maxsize=READ_AHEAD) for _ in group]
    stats = [ReadStats() for _ in group]
    counted = [Counter() for _ in group]
    cancelled = threading.Event()
    threads = [threading.Thread(target=_read_into, daemon=True,
                                args=(shard, source, options, stats[i], sinks[i], cancelled))
               for i, (_, shard) in enumerate(group)]
    for thread in threads:
        thread.start()
    try:
        active = list(range(len(group)))
        while active:
            for i in list(active):
                item = sinks[i].get()
                position, shard = group[i]
                if not isinstance(item, _End):
                    key, data = item
                    counted[i]["images_read"] += 1
                    counted[i]["bytes_read"] += len(data)
                    yield key, data, position
                    continue
                active.remove(i)
                if item.error is not None:
                    err = item.error
                    # Storage that stays down after every retry stops the stream (the run
                    # resumes later from its checkpoint); skipping would silently drop good
                    # shards. Anything else but a damaged shard is a bug and stops it too.
                    if isinstance(err, StorageUnavailable):
                        raise err
                    if unavailable_reason(err):
                        raise explain(err, shard.uri, options) from err
                    if not isinstance(err, (ShardError, StorageError, OSError, ValueError)):
                        raise err
                    counted[i]["shard_errors"] += 1
                    logger.warning("skipping the rest of shard %s: %s", shard.uri, item.error)
                counted[i]["shards_read"] += 1
                counted[i].update({f"skipped_{k}": v
                                   for k, v in stats[i].skipped_members.items()})
                tally.add(counted[i])
                tally.shard_read((epoch, position), counted[i]["images_read"])
                tally.flush()  # once a shard, not waited on
    finally:
        cancelled.set()


class _ViewMaker:
    """An actor of the stage's pool: groups in, views out. It reads a group's shards itself
    (threads that wait on storage) and cuts the views of every ``batch_size`` samples as they
    arrive; drops are counted by reason."""

    def __init__(self, image_size: int, augment: AugmentConfig, quality: QualityConfig,
                 seed: int, source: SourceConfig, options: StorageOptions, batch_size: int,
                 ledger, run: str, process_hook: Callable[[], None] | None = None,
                 views: tuple[ViewSpec, ...] | list[ViewSpec] = HYBRID_VIEWS):
        if process_hook is not None:
            process_hook()
        self.image_size = image_size
        self.views = list(views)
        self.augment = augment
        self.quality = quality
        self.seed = seed
        self.source, self.options, self.batch_size = source, options, batch_size
        self.tally = _Tally(ledger, run, worker=uuid.uuid4().hex)

    def __del__(self):
        # Ray Data ends its pool's actors gracefully (``__ray_shutdown__``), which drops this
        # object: the rest of the tally goes out with the worker's end.
        tally = getattr(self, "tally", None)
        if tally is not None:
            tally.flush(closing=True)

    def __call__(self, batch: dict[str, np.ndarray]) -> Iterator[dict[str, np.ndarray]]:
        for epoch, group_json in zip(batch["epoch"].tolist(), batch["group"]):
            group = [(int(p), ShardRef.from_json(ref)) for p, ref in json.loads(str(group_json))]
            samples: list[tuple[str, bytes, int]] = []
            for sample in _interleave(epoch, group, self.source, self.options, self.tally):
                samples.append(sample)
                if len(samples) == self.batch_size:
                    yield self.cut(epoch, samples)
                    samples = []
            if samples:
                yield self.cut(epoch, samples)
        self.tally.flush()

    def cut(self, epoch: int, samples: list[tuple[str, bytes, int]]) -> dict[str, np.ndarray]:
        """The views of ``samples`` (one epoch's), the rejected ones counted and left out."""
        rows: list[dict[str, np.ndarray]] = []
        positions = []
        dropped: Counter = Counter()
        for key, data, position in samples:
            # Views depend on (seed, epoch, key) only: the same in any actor, on any rerun.
            rng = np.random.default_rng([self.seed, epoch, _stable_hash(key)])
            try:
                rows.append(make_views(data, rng, self.image_size, self.augment, self.quality,
                                       self.views))
            except Rejected as rejected:
                dropped[f"dropped_{rejected.reason}"] += 1
                self.tally.sample_dropped((epoch, position), key)
                continue
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
        out["epoch"] = np.full(len(positions), epoch, dtype=np.int64)
        out["position"] = np.array(positions, dtype=np.int64)
        return out


def _stable_hash(text: str) -> int:
    import zlib

    return zlib.crc32(text.encode())


class DataStage:
    """One run's data stage: the shard list, the Ray Data dataset and its ledger.

    ``ledger_name`` names the ledger actor (in ``LEDGER_NAMESPACE``) so that a training worker
    can find it; a stage built again under the same name (a restarted worker group) shares it,
    as long as whoever opened it first holds its handle (``open_ledger``).
    """

    def __init__(self, config: DataConfig, image_size: int, options: StorageOptions | None = None,
                 cursor: DataCursor | None = None, address: str | None = None,
                 run_name: str = "adhoc", process_hook: Callable[[], None] | None = None,
                 views: tuple[ViewSpec, ...] | list[ViewSpec] = HYBRID_VIEWS,
                 counters: bool = True, ledger_name: str | None = None):
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
        self._ledger = None
        if counters:
            self._ledger = open_ledger(ledger_name)

    def schedule(self):
        """The groups from the cursor to the end of the configured epochs, one block each."""
        return schedule_dataset([shard.to_json() for shard in self.shards], self.start,
                                self.config.epochs, self.config.read_shards_at_once)

    def dataset(self):
        """The streaming dataset from the cursor to the end of the configured epochs."""
        import ray.data

        self._check_cpus()
        ds = self.schedule().map_batches(
            _ViewMaker,
            batch_size=1,  # a group a call
            num_cpus=1,
            # A group goes to an idle worker only: queued behind a straggling group on a busy
            # one, it would wait for the straggler. (The price: a worker idles while the next
            # group is handed over, 0.12-0.16 s on the 2-core development machine, against
            # some 40 s of cutting in a group of 16 shards of 2,500 images.)
            compute=ray.data.ActorPoolStrategy(size=self.config.view_workers,
                                               max_tasks_in_flight_per_actor=1),
            fn_constructor_kwargs=self.view_worker_kwargs(),
        )
        ds.context.execution_options.preserve_order = False
        # Ray Data merges what a task yields into blocks of up to ``target_max_block_size``
        # (128 MiB: some 290 images of the hybrid's views at 224 px), and a block leaves the
        # worker only once it is full. Sized just under one view batch, each batch leaves as
        # it is cut (not sliced either: Ray Data slices blocks of 1.5 times the target or more).
        ds.context.target_max_block_size = int(0.8 * self.batch_bytes())
        return ds

    def view_worker_kwargs(self) -> dict[str, Any]:
        """What each view worker (``_ViewMaker``) of this stage is built with."""
        return {
            "image_size": self.image_size, "augment": self.config.augment,
            "quality": self.config.quality, "seed": self.config.seed,
            "source": self.config.source, "options": self.options,
            "batch_size": self.config.view_batch_size,
            "ledger": self._ledger, "run": self.run_name, "process_hook": self.process_hook,
            "views": self.views,
        }

    def batch_bytes(self) -> int:
        """The bytes of one full view batch: every view's pixels, photometric parameters."""
        on_device = self.config.augment.photometric_on == "device"
        row = 16  # epoch, position
        for view in self.views:
            size = view.size or self.image_size
            row += size * size * 3
            if on_device and view.photometric:
                row += 4 * len(PHOTOMETRIC_FIELDS)
        return row * self.config.view_batch_size

    def _check_cpus(self) -> None:
        """Refuse a stage whose view workers would take every CPU: Ray Data then schedules none
        of the other operators (the schedule: measured on Ray 2.60, 2 CPUs and 2 view
        workers), and the stream would wait for ever."""
        cpus = self.ray.cluster_resources().get("CPU", 0)
        views = self.config.view_workers
        if cpus < views + 1:
            raise ConfigError(
                f"data.view_workers ({views}) take {views} of this Ray cluster's {cpus:g} CPUs, "
                f"leaving less than one CPU for the rest of the stream (its schedule): the "
                f"stream would never start. Lower data.view_workers or give the cluster more "
                f"CPUs")

    def tracker(self) -> CursorTracker:
        return CursorTracker(self.start)

    def iter_batches(self, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
        """Batches of numpy arrays straight from the dataset, without Ray Train."""
        yield from self.dataset().iter_batches(batch_size=batch_size, batch_format="numpy",
                                               drop_last=False)

    def _need_ledger(self):
        if self._ledger is None:
            raise RuntimeError("this data stage was built with counters=False")
        return self._ledger

    def finished_shards(self) -> dict[Shard, tuple[int, int]]:
        """The ledger's shard -> (samples read, samples dropped), for shards read to their end."""
        return self.ray.get(self._need_ledger().finished_shards.remote())

    def counters(self, settle_seconds: float = 30.0) -> dict[str, int]:
        """Counts so far: images/bytes read, dropped by reason, emitted, shard errors. After a
        stream has ended, waits (up to ``settle_seconds``) for its view workers' last counts."""
        ledger = self._need_ledger()
        deadline = time.monotonic() + settle_seconds
        while True:
            totals, running = self.ray.get(ledger.snapshot.remote())
            if not running or time.monotonic() > deadline:
                return totals
            time.sleep(0.1)
