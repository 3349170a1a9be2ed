"""Energy meters at the device boundary: RAPL counters, NVML counters, and the CPU estimate.

Each meter owns one device (a RAPL zone, a GPU by UUID, or the node's CPUs when nothing can be
read) and answers ``read()`` with the joules since its previous read, tagged with where the figure
comes from: ``measured`` (a hardware energy counter), ``sampled`` (power readings integrated over
time) or ``estimated`` (a model of power from CPU utilisation). Meters know nothing about Ray,
workers or stages; ``ssl_train.energy.node`` decides how many exist (one per device per node).
The boundaries are injectable for tests: the powercap folder, the NVML module, the clock.
"""

from __future__ import annotations

import csv
import importlib.resources
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import psutil

MEASURED, SAMPLED, ESTIMATED = "measured", "sampled", "estimated"

# The estimate's power model: P = TDP x (IDLE_SHARE + (1 - IDLE_SHARE) x utilisation), the linear
# load model of SPECpower-style measurements with an idle floor at 30 % of TDP.
IDLE_SHARE = 0.3
DEFAULT_TDP_WATTS = 85.0  # CodeCarbon's fallback for a CPU model missing from its table
DRAM_WATTS_PER_GIB = 0.375  # CodeCarbon's historical DRAM estimate (3 W per 8 GB)


@dataclass(frozen=True)
class Reading:
    """Joules one device used since the previous read."""

    device: str
    component: str  # cpu, dram, gpu
    source: str  # measured, sampled, estimated
    joules: float


@dataclass(frozen=True)
class MeterInfo:
    """What a meter measures and how, for the ledger's inventory."""

    device: str
    component: str
    source: str
    detail: str


class RaplZone:
    """One RAPL energy counter (``energy_uj``), with wraparound at ``max_energy_range_uj``."""

    def __init__(self, path: Path, device: str, component: str):
        self.path = path
        self.device = device
        self.component = component
        self.max_range_uj = int((path / "max_energy_range_uj").read_text())
        self.last_uj = self._counter()

    def _counter(self) -> int:
        return int((self.path / "energy_uj").read_text())

    def read(self) -> Reading:
        now = self._counter()
        delta = now - self.last_uj
        if delta < 0:  # the counter passed max_energy_range_uj and restarted from zero
            delta += self.max_range_uj
        self.last_uj = now
        return Reading(self.device, self.component, MEASURED, delta / 1e6)

    def info(self) -> MeterInfo:
        return MeterInfo(self.device, self.component, MEASURED,
                         f"RAPL counter {self.path / 'energy_uj'}")


def rapl_zones(root: str | Path) -> list[RaplZone]:
    """Package and DRAM zones under a powercap folder whose counters this process can read.

    Core and uncore subzones are parts of their package and are not counted again.
    """
    root = Path(root)
    zones: list[RaplZone] = []
    if not root.is_dir():
        return zones
    for path in sorted(root.glob("intel-rapl:*")):
        try:
            name = (path / "name").read_text().strip()
        except OSError:
            continue
        if re.fullmatch(r"intel-rapl:\d+", path.name) and name.startswith("package"):
            component, device = "cpu", name
        elif name == "dram":
            package = path.name.split(":")[1]
            component, device = "dram", f"dram-{package}"
        else:
            continue
        try:
            zones.append(RaplZone(path, device, component))
        except (OSError, ValueError):
            continue  # energy_uj is root-only on kernels patched for CVE-2020-8694
    return zones


class NvmlGpu:
    """One GPU by UUID: NVML's total-energy counter (mJ) where supported, else power sampling."""

    def __init__(self, nvml, index: int, clock: Callable[[], float] = time.monotonic):
        self.nvml = nvml
        self.clock = clock
        self.handle = nvml.nvmlDeviceGetHandleByIndex(index)
        self.uuid = _text(nvml.nvmlDeviceGetUUID(self.handle))
        self.name = _text(nvml.nvmlDeviceGetName(self.handle))
        try:
            self.last_mj = nvml.nvmlDeviceGetTotalEnergyConsumption(self.handle)
            self.source = MEASURED
        except nvml.NVMLError:
            self.source = SAMPLED
            self.last_time = clock()
            self.last_watts = nvml.nvmlDeviceGetPowerUsage(self.handle) / 1000.0

    def read(self) -> Reading:
        if self.source == MEASURED:
            now_mj = self.nvml.nvmlDeviceGetTotalEnergyConsumption(self.handle)
            joules = (now_mj - self.last_mj) / 1000.0
            self.last_mj = now_mj
        else:  # trapezoids between consecutive power readings
            now, watts = self.clock(), self.nvml.nvmlDeviceGetPowerUsage(self.handle) / 1000.0
            joules = (now - self.last_time) * (watts + self.last_watts) / 2
            self.last_time, self.last_watts = now, watts
        return Reading(self.uuid, "gpu", self.source, joules)

    def info(self) -> MeterInfo:
        how = ("NVML total-energy counter" if self.source == MEASURED
               else "NVML power readings integrated over time")
        return MeterInfo(self.uuid, "gpu", self.source, f"{self.name}: {how}")


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def nvml_gpus(nvml) -> list[NvmlGpu]:
    """Every GPU NVML sees on this node (none when NVML or its driver is absent)."""
    if nvml is None:
        return []
    try:
        nvml.nvmlInit()
        return [NvmlGpu(nvml, index) for index in range(nvml.nvmlDeviceGetCount())]
    except nvml.NVMLError:
        return []


def load_nvml():
    """The NVML bindings (``pynvml`` from nvidia-ml-py), or None where they are not installed."""
    try:
        import pynvml
    except ImportError:
        return None
    return pynvml


def cpu_model() -> str:
    """The CPU's model name as the kernel reports it."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def _normalise(name: str) -> str:
    name = re.sub(r"\((R|TM|tm|r)\)|\bCPU\b|\bProcessor\b|@.*$|\d+-Core", " ", name)
    return " ".join(name.split()).lower()


def tdp_watts(model: str) -> tuple[float, str]:
    """(TDP per package, where it came from) from CodeCarbon's CPU table."""
    table = importlib.resources.files("codecarbon") / "data" / "hardware" / "cpu_power.csv"
    wanted = _normalise(model)
    with table.open() as rows:
        for row in csv.DictReader(rows):
            if _normalise(row["Name"]) == wanted:
                return float(row["TDP"]), f"TDP of {row['Name']} in CodeCarbon's cpu_power.csv"
    return DEFAULT_TDP_WATTS, (f"CPU model {model!r} is not in CodeCarbon's cpu_power.csv: "
                               f"{DEFAULT_TDP_WATTS:g} W assumed (set energy.cpu_tdp_watts)")


class CpuEstimate:
    """The node's CPUs from utilisation and TDP, for nodes without readable RAPL counters."""

    def __init__(self, tdp: float, tdp_detail: str, packages: int = 1,
                 clock: Callable[[], float] = time.monotonic):
        self.watts_max = tdp * packages
        self.detail = tdp_detail
        self.clock = clock
        self.last_time = clock()
        self.last_busy, self.last_total = node_cpu_seconds()

    def read(self) -> Reading:
        now = self.clock()
        busy, total = node_cpu_seconds()
        elapsed = max(total - self.last_total, 1e-9)
        utilisation = min(1.0, max(0.0, (busy - self.last_busy) / elapsed))
        watts = self.watts_max * (IDLE_SHARE + (1 - IDLE_SHARE) * utilisation)
        joules = watts * (now - self.last_time)
        self.last_time, self.last_busy, self.last_total = now, busy, total
        return Reading("cpu", "cpu", ESTIMATED, joules)

    def info(self) -> MeterInfo:
        return MeterInfo("cpu", "cpu", ESTIMATED,
                         f"{self.watts_max:g} W x ({IDLE_SHARE} + {1 - IDLE_SHARE:.1f} x CPU "
                         f"utilisation); {self.detail}")


class DramEstimate:
    """The node's memory at a constant power per GiB installed."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self.gib = psutil.virtual_memory().total / 1024**3
        self.clock = clock
        self.last_time = clock()

    def read(self) -> Reading:
        now = self.clock()
        joules = DRAM_WATTS_PER_GIB * self.gib * (now - self.last_time)
        self.last_time = now
        return Reading("dram", "dram", ESTIMATED, joules)

    def info(self) -> MeterInfo:
        return MeterInfo("dram", "dram", ESTIMATED,
                         f"{DRAM_WATTS_PER_GIB} W/GiB x {self.gib:.1f} GiB installed (constant)")


def node_cpu_seconds() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole node since boot."""
    times = psutil.cpu_times()
    idle = times.idle + getattr(times, "iowait", 0.0)
    total = sum(times) - getattr(times, "guest", 0.0) - getattr(times, "guest_nice", 0.0)
    return total - idle, total


def cpu_packages() -> int:
    """Physical CPU packages (sockets) on this node."""
    try:
        ids = {line.split(":", 1)[1].strip()
               for line in Path("/proc/cpuinfo").read_text().splitlines()
               if line.startswith("physical id")}
    except OSError:
        ids = set()
    return max(1, len(ids))


def node_meters(powercap_root: str | os.PathLike, nvml, tdp_override: float | None = None):
    """The meters of one node: RAPL zones (else the CPU and DRAM estimates) and every GPU."""
    meters: list = rapl_zones(powercap_root)
    components = {meter.component for meter in meters}
    if "cpu" not in components:
        model = cpu_model()
        tdp, detail = ((tdp_override, "TDP from energy.cpu_tdp_watts") if tdp_override
                       else tdp_watts(model))
        meters.append(CpuEstimate(tdp, detail, cpu_packages()))
    if "dram" not in components:
        meters.append(DramEstimate())
    return meters + nvml_gpus(nvml)
