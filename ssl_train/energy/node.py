"""One energy meter per node: samples the node's devices, splits their energy by stage, writes the
run's ledger and exports ``ssl_energy_joules_total`` / ``ssl_co2e_grams_total``.

Training workers and data-stage processes register their pids (and GPU UUIDs) with the meter of
their node; they never read a device themselves, so a node's devices are read once whatever the
number of workers or actors on it. Each interval, a CPU or DRAM reading is split by the CPU time
each stage's processes used, as a share of the node's CPU capacity in that interval; a GPU's
reading goes to ``train`` when a training worker uses it. What is left is ``idle``: idle power,
other processes (Ray's own, the driver, other pods on a shared node). The shares add up to the
reading, so stages add up to the node's meters.

``NodeEnergy`` is the plain object (used directly in tests); ``NodeEnergyActor`` is the Ray actor,
named per (run, node) and pinned to its node.
"""

from __future__ import annotations

import os
import platform
import socket
import threading
import time
import uuid
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any

import psutil

from pipelines.storage.access import StorageOptions
from ssl_train.energy.carbon import co2e_grams
from ssl_train.energy.meters import NvmlGpu, cpu_model, load_nvml, node_meters
from ssl_train.monitors.metrics_log import RunFile

STAGES = ("train", "data", "idle")
NAMESPACE = "ssl-energy"
LEDGER_DIR = "energy"


@dataclass
class EnergySettings:
    """Everything a node's meter needs, picklable (it travels to every node)."""

    run: str
    run_uri: str
    storage: dict
    grid: dict  # {g_per_kwh, source, year, region}
    pue: dict  # {value, source, year}
    interval_seconds: float = 1.0
    record_every_seconds: float = 60.0
    upload_every_seconds: float = 300.0
    powercap_root: str = "/sys/class/powercap"
    cpu_tdp_watts: float | None = None
    images_per_step: int = 0  # the global batch: the report's functional unit per step
    # One train() call; a process registers once per session and stage.
    session: str = field(default_factory=lambda: uuid.uuid4().hex[:12])

    def co2e(self, joules: float) -> float:
        return co2e_grams(joules, self.grid["g_per_kwh"], self.pue["value"])


def utc(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, timezone.utc).isoformat(timespec="milliseconds")


def _same_gpu(a: str, b: str) -> bool:
    def norm(text: str) -> str:
        return text.lower().removeprefix("gpu-")

    return norm(a) == norm(b)


class NodeEnergy:
    """The meters of one node, the processes of each stage, and the ledger they feed."""

    def __init__(self, settings: EnergySettings, node: str, nvml=None, exporter=None):
        self.settings = settings
        self.node = node
        self.meters = node_meters(settings.powercap_root, nvml, settings.cpu_tdp_watts)
        self.logical_cpus = psutil.cpu_count() or 1
        self.processes: dict[int, tuple[str, psutil.Process, float]] = {}
        self.train_gpus: set[str] = set()
        self.totals: dict[tuple[str, str, str, str], float] = defaultdict(float)
        self.exporter = exporter
        self.lock = threading.Lock()
        started = time.time()
        session = datetime.fromtimestamp(started, timezone.utc).strftime("%Y%m%dT%H%M%S")
        folder = f"{LEDGER_DIR}/ledger-{node[:12]}-{session}-{uuid.uuid4().hex[:6]}"
        self.ledger = LedgerParts(settings.run_uri, folder, StorageOptions(**settings.storage),
                                  settings.upload_every_seconds, started)
        self.pending: dict | None = None  # samples not yet written, summed into one record
        self.ledger.append({
            "type": "meter", "run": settings.run, "node": node, "hostname": socket.gethostname(),
            "started": utc(started), "interval_seconds": settings.interval_seconds,
            "inventory": {
                "cpu_model": cpu_model(), "logical_cpus": self.logical_cpus,
                "memory_bytes": psutil.virtual_memory().total, "platform": platform.platform(),
                "gpus": [{"uuid": m.uuid, "name": m.name} for m in self.meters
                         if isinstance(m, NvmlGpu)],
            },
            "meters": [asdict(m.info()) for m in self.meters],
            "grid_intensity": settings.grid, "pue": settings.pue,
            "images_per_step": settings.images_per_step,
        })
        self.ledger.roll(started)  # the header is its own part: in storage from the start
        self.t0 = started

    def register(self, pid: int, stage: str, gpu_uuids: list[str] = ()) -> None:
        """Count ``pid``'s CPU time (from now on) toward ``stage``; its GPUs toward training."""
        with self.lock:
            try:
                process = psutil.Process(pid)
                self.processes[pid] = (stage, process, sum(process.cpu_times()[:2]))
            except psutil.Error:
                return
            if stage == "train":
                self.train_gpus.update(gpu_uuids)

    def _stage_cpu_seconds(self) -> dict[str, float]:
        used = {"train": 0.0, "data": 0.0}
        for pid, (stage, process, last) in list(self.processes.items()):
            try:
                now = sum(process.cpu_times()[:2])
            except psutil.Error:
                del self.processes[pid]  # exited: its last interval is left to idle
                continue
            used[stage] += max(0.0, now - last)
            self.processes[pid] = (stage, process, now)
        return used

    def sample(self) -> dict:
        """Read every meter once, split the energy by stage, append it to the ledger."""
        with self.lock:
            t1 = time.time()
            readings = [meter.read() for meter in self.meters]
            cpu = self._stage_cpu_seconds()
            capacity = self.logical_cpus * max(t1 - self.t0, 1e-9)
            busy = sum(cpu.values())
            scale = 1.0 if busy <= capacity else capacity / busy
            entries = []
            for reading in readings:
                if reading.component == "gpu":
                    stage = ("train" if any(_same_gpu(reading.device, g) for g in self.train_gpus)
                             else "idle")
                    split = {stage: reading.joules}
                else:
                    split = {stage: reading.joules * seconds / capacity * scale
                             for stage, seconds in cpu.items()}
                split["idle"] = reading.joules - sum(split.values())
                entries.append({"device": reading.device, "component": reading.component,
                                "source": reading.source, "joules": reading.joules,
                                "stages": split})
                for stage, joules in split.items():
                    key = (stage, reading.device, reading.component, reading.source)
                    self.totals[key] += joules
                    if self.exporter is not None:
                        self.exporter.record(stage, reading.device, reading.component,
                                             reading.source, joules)
            record = {"type": "interval", "node": self.node, "t0": self.t0, "t1": t1,
                      "cpu_seconds": cpu, "entries": entries, "samples": 1}
            self.t0 = t1
            self.pending = record if self.pending is None else summed(self.pending, record)
            if t1 - self.pending["t0"] >= self.settings.record_every_seconds:
                self._write_pending()
            self.ledger.roll_if_due(t1)
            return record

    def _write_pending(self) -> None:
        if self.pending is not None:
            self.ledger.append(self.pending)
            self.pending = None

    def total_joules(self) -> float:
        """Energy of this node so far, all stages and devices, after a fresh sample."""
        self.sample()
        with self.lock:
            return sum(self.totals.values())

    def stop(self) -> None:
        self.sample()
        with self.lock:
            self._write_pending()
            self.ledger.append({"type": "stopped", "node": self.node, "time": utc(time.time())})
            self.ledger.close()


def summed(first: dict, second: dict) -> dict:
    """Two consecutive interval records of one meter as one: joules, stage shares and CPU
    seconds add up, the window spans both."""
    entries = []
    for a, b in zip(first["entries"], second["entries"], strict=True):
        stages = {stage: a["stages"].get(stage, 0.0) + b["stages"].get(stage, 0.0)
                  for stage in {**a["stages"], **b["stages"]}}
        entries.append({**a, "joules": a["joules"] + b["joules"], "stages": stages})
    cpu = {stage: first["cpu_seconds"].get(stage, 0.0) + second["cpu_seconds"].get(stage, 0.0)
           for stage in {**first["cpu_seconds"], **second["cpu_seconds"]}}
    return {**first, "t1": second["t1"], "cpu_seconds": cpu, "entries": entries,
            "samples": first["samples"] + second["samples"]}


class LedgerParts:
    """One meter session's ledger as rolling parts, ``FOLDER/part-NNNNN.jsonl``: the open part
    is appended to (and flushed) locally; every ``roll_seconds`` and at the end it is closed,
    made durable once (uploaded to an object store, fsynced locally) and never written again.
    Upload volume stays linear in the run's length, and a crash loses at most the open part's
    lines in an object store (none locally)."""

    def __init__(self, run_uri: str, folder: str, options: StorageOptions, roll_seconds: float,
                 now: float):
        self.run_uri, self.folder, self.options = run_uri, folder, options
        self.roll_seconds = roll_seconds
        self.index = 0
        self.opened = now
        self.part = self._open()

    def _open(self) -> RunFile:
        return RunFile(self.run_uri, f"{self.folder}/part-{self.index:05d}.jsonl", self.options,
                       fresh=True)

    def append(self, record: dict) -> None:
        self.part.append(record)

    def roll_if_due(self, now: float) -> None:
        if now - self.opened >= self.roll_seconds:
            self.roll(now)

    def roll(self, now: float) -> None:
        """Close the open part (made durable) and open the next."""
        self.part.close()
        self.index += 1
        self.opened = now
        self.part = self._open()

    def close(self) -> None:
        self.part.close()


class EnergyExporter:
    """The Prometheus counters of one node's meter (Ray-native, scraped from the node)."""

    def __init__(self, settings: EnergySettings, node: str):
        from ray.util.metrics import Counter

        from ssl_train.monitors.telemetry import ENERGY_COUNTERS

        self.settings = settings
        self.node = node
        self.joules, self.co2e = (
            Counter(name, description, tag_keys=("run", *extra))
            for name, (description, extra) in ENERGY_COUNTERS.items())

    def record(self, stage: str, device: str, component: str, source: str, joules: float) -> None:
        if joules <= 0:
            return
        self.joules.inc(joules, tags={"run": self.settings.run, "stage": stage,
                                      "node": self.node, "device": device,
                                      "component": component, "source": source})
        self.co2e.inc(self.settings.co2e(joules),
                      tags={"run": self.settings.run, "stage": stage})


class NodeEnergyActor:
    """The Ray actor around ``NodeEnergy``: samples every ``interval_seconds`` in a thread."""

    def __init__(self, settings: EnergySettings):
        import ray

        node = ray.get_runtime_context().get_node_id()
        self.energy = NodeEnergy(settings, node, load_nvml(), EnergyExporter(settings, node))
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True, name="energy-meter")
        self.thread.start()

    def _run(self) -> None:
        while not self.stopped.wait(self.energy.settings.interval_seconds):
            self.energy.sample()

    def register(self, pid: int, stage: str, gpu_uuids: list[str]) -> None:
        self.energy.register(pid, stage, gpu_uuids)

    def total_joules(self) -> float:
        return self.energy.total_joules()

    def stop(self) -> None:
        if not self.stopped.is_set():
            self.stopped.set()
            self.thread.join()
            self.energy.stop()


def meter_name(run: str, node: str) -> str:
    return f"energy-{run}-{node}"


def node_meter(settings: EnergySettings, node: str):
    """The meter of ``node`` for this run, started if it is not running yet."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    return ray.remote(num_cpus=0)(NodeEnergyActor).options(
        name=meter_name(settings.run, node), namespace=NAMESPACE, get_if_exists=True,
        scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False),
        max_concurrency=2,
    ).remote(settings)


def start_node_meters(settings: EnergySettings) -> list:
    """One meter on every alive node of the cluster (nodes that join later start theirs when a
    worker registers there). A meter lives while a handle to it does: keep the list."""
    import ray

    meters = [node_meter(settings, node["NodeID"]) for node in ray.nodes() if node["Alive"]]
    ray.get([meter.total_joules.remote() for meter in meters])  # started and sampling
    return meters


def run_meters(run: str) -> list:
    """Handles to every running meter of ``run``."""
    import ray

    prefix = meter_name(run, "")
    return [ray.get_actor(entry["name"], namespace=NAMESPACE)
            for entry in ray.util.list_named_actors(all_namespaces=True)
            if entry["namespace"] == NAMESPACE and entry["name"].startswith(prefix)]


def run_total_joules(run: str) -> float:
    """Energy of the run so far, summed over its nodes' meters."""
    import ray

    return sum(ray.get([meter.total_joules.remote() for meter in run_meters(run)]))


def stop_node_meters(run: str, timeout: float = 60.0) -> None:
    """Final sample and a closed, uploaded ledger on every node; then the meters exit."""
    import ray

    meters = run_meters(run)
    try:
        ray.get([meter.stop.remote() for meter in meters], timeout=timeout)
    finally:  # a ledger that cannot be uploaded must not leave its meter running
        for meter in meters:
            ray.kill(meter)


# (session, stage) -> the meter this process registered with; the handle keeps a meter this
# process started (on a node that joined after the run began) alive while the process lives.
_REGISTERED: dict[tuple[str, str], Any] = {}


def register_process(settings: EnergySettings, stage: str, gpu_uuids: list[str] = ()) -> None:
    """Count this process toward ``stage`` on its node's meter (once per process and stage)."""
    import ray

    if (settings.session, stage) in _REGISTERED:
        return
    meter = node_meter(settings, ray.get_runtime_context().get_node_id())
    ray.get(meter.register.remote(os.getpid(), stage, list(gpu_uuids)))
    _REGISTERED[(settings.session, stage)] = meter
