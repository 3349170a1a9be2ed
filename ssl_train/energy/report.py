"""``ssl-pretrain energy-report RUN_DIR``: the run's energy and carbon, from its ledger alone.

Streams over every part of every ledger under RUN_DIR/energy (one folder per node meter session;
a line cut by a crash is skipped and counted) and the run's ``metrics.jsonl`` (steps trained, the
projection), holding sums and 32 bytes of chart per ledger line rather than the text, and
writes ``energy_report.json``, ``energy_report.md`` and ``energy_report.png`` (power over time
by stage, one panel per node). Field names follow the Green Software Foundation's SCI terms:
E (energy, kWh, facility overhead included through PUE), I (grid intensity, gCO2e/kWh),
O = E x I (operational emissions), M (embodied emissions: not assessed), R (functional unit:
one training image).
"""

from __future__ import annotations

import io
import json
import posixpath
from array import array
from collections import defaultdict, deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from pipelines.storage.access import StorageError, StorageOptions, open_filesystem, storage_call
from ssl_train.energy.carbon import JOULES_PER_KWH, co2e_grams
from ssl_train.energy.meters import DRAM_WATTS_PER_GIB, ESTIMATED, IDLE_SHARE, MEASURED, SAMPLED
from ssl_train.energy.node import LEDGER_DIR, STAGES, utc

REPORT_NAME = "energy_report"

UNCERTAINTY = {
    MEASURED: "RAPL and NVML counters measure the package, DRAM or board they name; not power "
                "supply losses, fans, disks, network or the rest of the server (PUE covers the "
                "facility, not these). Where a node runs other pods, their share of the counter "
                "is in `idle`.",
    SAMPLED: "NVML power readings (averaged by the driver over about a second) integrated with the "
             "trapezoid rule at the sampling interval: phases shorter than the interval are "
             "smoothed; expect a few percent of error.",
    ESTIMATED: f"CPU power is modelled as TDP x ({IDLE_SHARE} + {1 - IDLE_SHARE:.1f} x node CPU "
               "utilisation) per package, from a TDP table, without any counter: expect +-30-50 %, "
               "more on a virtual machine that holds a slice of a package whose whole TDP is "
               f"counted. DRAM is a constant {DRAM_WATTS_PER_GIB} W per GiB installed.",
    "attribution": "CPU and DRAM energy is split between stages by each stage's share of the "
                   "node's CPU time in each interval; a GPU goes to `train` when a training worker "
                   "uses it. `idle` is the rest: idle power, Ray's own processes, the driver, "
                   "other tenants of the node.",
}


class LedgerError(StorageError):
    """RUN_DIR has no energy ledger to report on."""


PART_READERS = 16  # parts read at once from the run directory (object-store latency overlaps)

INCOMPLETE = "; the run did not stop cleanly: figures up to its last ledger line"


def _bounded_map(fn, items: list, workers: int = PART_READERS) -> Iterator:
    """``fn`` over ``items`` in threads, results in order, at most ``2 * workers`` held at once:
    memory stays bounded however many parts a ledger has."""
    with ThreadPoolExecutor(workers) as pool:
        window: deque = deque()
        for item in items:
            window.append(pool.submit(fn, item))
            if len(window) >= 2 * workers:
                yield window.popleft().result()
        while window:
            yield window.popleft().result()


@dataclass
class _Series:
    """One node's power over time, one point per ledger line (compact arrays)."""

    times: array = field(default_factory=lambda: array("d"))
    watts: dict = field(default_factory=lambda: {stage: array("d") for stage in STAGES})


@dataclass
class LedgerScan:
    """Everything the report needs from a run's ledger, folded line by line: its memory grows
    with the number of nodes, devices and lines (a few numbers each), not with their text."""

    sessions: list[dict] = field(default_factory=list)  # folder, meter header, stopped, lines
    cut_lines: int = 0
    parts: int = 0
    by_stage: dict = field(default_factory=lambda: dict.fromkeys(STAGES, 0.0))
    by_node: dict = field(default_factory=lambda: defaultdict(float))
    by_device: dict = field(default_factory=dict)
    gpu_seconds: float = 0.0
    start: float | None = None
    end: float | None = None
    series: dict = field(default_factory=lambda: defaultdict(_Series))
    steps: int = 0
    projection: dict | None = None

    def add(self, session: dict, record: dict) -> None:
        kind = record.get("type")
        if kind == "meter":
            session["meter"] = record
        elif kind == "stopped":
            session["stopped"] = record["time"]
        elif kind == "interval" and session["meter"] is not None:
            self._interval(session["meter"], record)
            session["lines"] += 1

    def _interval(self, meter: dict, interval: dict) -> None:
        node, t0, t1 = meter["node"], interval["t0"], interval["t1"]
        self.start = t0 if self.start is None else min(self.start, t0)
        self.end = t1 if self.end is None else max(self.end, t1)
        watts = dict.fromkeys(STAGES, 0.0)
        for entry in interval["entries"]:
            key = (node, entry["device"], entry["component"], entry["source"])
            row = self.by_device.get(key)
            if row is None:
                row = self.by_device[key] = {
                    "node": node, "device": entry["device"], "component": entry["component"],
                    "source": entry["source"], "interval_seconds": meter["interval_seconds"],
                    "joules": 0.0, "stages": dict.fromkeys(STAGES, 0.0)}
            row["joules"] += entry["joules"]
            self.by_node[node] += entry["joules"]
            for stage, joules in entry["stages"].items():
                row["stages"][stage] += joules
                self.by_stage[stage] += joules
                watts[stage] += joules
            if entry["component"] == "gpu":
                self.gpu_seconds += t1 - t0
        series = self.series[node]
        series.times.append((t0 + t1) / 2)
        for stage in STAGES:
            series.watts[stage].append(watts[stage] / max(t1 - t0, 1e-9))


def _lines(data: bytes) -> tuple[list[dict], int]:
    """The JSON lines of a file's bytes, and how many a crash cut (skipped)."""
    parsed, cut = [], 0
    for line in data.decode().splitlines():
        try:
            parsed.append(json.loads(line))
        except ValueError:
            cut += 1
    return parsed, cut


def read_ledger(run_uri: str, options: StorageOptions | None = None) -> LedgerScan:
    """Folds every part of every meter session under RUN_DIR/energy, and the run's
    ``metrics.jsonl`` (steps trained, the projection), into a ``LedgerScan``, streaming: parts
    are read a few at a time and dropped once counted."""
    fs, root = open_filesystem(run_uri, options)
    pattern = posixpath.join(root, LEDGER_DIR, "ledger-*", "part-*.jsonl")
    parts = sorted(storage_call(run_uri, options, fs.glob, pattern))
    if not parts:
        raise LedgerError(f"no energy ledger under {run_uri.rstrip('/')}/{LEDGER_DIR}: was the run "
                          "trained with energy.enabled?")
    scan, sessions = LedgerScan(parts=len(parts)), {}
    read = lambda path: _lines(storage_call(run_uri, options, fs.cat_file, path))  # noqa: E731
    for path, (records, cut) in zip(parts, _bounded_map(read, parts)):
        folder = posixpath.basename(posixpath.dirname(path))
        session = sessions.setdefault(folder, {"folder": folder, "meter": None, "stopped": None,
                                               "lines": 0})
        scan.cut_lines += cut
        for record in records:  # parts sort in order: a session's header comes first
            scan.add(session, record)
    scan.sessions = [s for s in sessions.values() if s["meter"] is not None]
    metrics_path = posixpath.join(root, "metrics.jsonl")
    if storage_call(run_uri, options, fs.exists, metrics_path):
        with storage_call(run_uri, options, fs.open, metrics_path, "rb") as stream:
            for line in stream:
                try:
                    record = json.loads(line)
                except ValueError:
                    continue
                if "loss" in record:
                    scan.steps = max(scan.steps, int(record["step"]))
                elif record.get("event") == "energy_projection":
                    scan.projection = record
    return scan


def build_report(scan: LedgerScan) -> dict:
    """The report's content from a ledger (``read_ledger``)."""
    sessions = scan.sessions
    nodes = {}
    for session in sessions:
        meter = session["meter"]
        nodes.setdefault(meter["node"], {"node": meter["node"], "hostname": meter["hostname"],
                                         **meter["inventory"], "meters": meter["meters"],
                                         "sessions": 0})
        nodes[meter["node"]]["sessions"] += 1
    latest = max(sessions, key=lambda s: s["meter"]["started"])["meter"]
    grid, pue = latest["grid_intensity"], latest["pue"]
    by_stage, by_device = scan.by_stage, scan.by_device
    it_joules = sum(scan.by_node.values())
    facility_joules = it_joules * pue["value"]
    steps = scan.steps
    images_per_step = latest.get("images_per_step", 0)
    images = steps * images_per_step
    operational = co2e_grams(it_joules, grid["g_per_kwh"], pue["value"])
    sources = sorted({row["source"] for row in by_device.values()})
    return {
        "run": latest["run"],
        "start_utc": utc(scan.start) if scan.start is not None else None,
        "end_utc": utc(scan.end) if scan.end is not None else None,
        "duration_seconds": (scan.end - scan.start) if scan.start is not None else 0.0,
        "complete": all(s["stopped"] for s in sessions),
        "meter_sessions": len(sessions),
        "ledger_parts": scan.parts,
        "ledger_lines": sum(s["lines"] for s in sessions),
        "ledger_lines_cut": scan.cut_lines,
        "hardware": sorted(nodes.values(), key=lambda n: n["hostname"]),
        "accelerator_hours": scan.gpu_seconds / 3600,
        "energy_joules": {
            "total_it": it_joules,
            "by_stage": by_stage,
            "idle": by_stage["idle"],
            "by_node": dict(scan.by_node),
            "by_device": sorted(by_device.values(),
                                key=lambda r: (r["node"], r["component"], r["device"])),
        },
        "sources": sources,
        "pue": pue,
        "grid_intensity": grid,
        "steps": steps,
        "images": images,
        "energy_per_step_joules": facility_joules / steps if steps else None,
        "energy_per_image_joules": facility_joules / images if images else None,
        "projection": scan.projection,
        "sci": {
            "functional_unit": "one training image",
            "E_kwh": facility_joules / JOULES_PER_KWH,
            "I_g_per_kwh": grid["g_per_kwh"],
            "O_g": operational,
            "M_g": None,
            "M_note": "embodied emissions of the hardware are not assessed",
            "R": images,
            "SCI_g_per_image": operational / images if images else None,
        },
        "co2e_grams_by_stage": {stage: co2e_grams(j, grid["g_per_kwh"], pue["value"])
                                for stage, j in by_stage.items()},
        "uncertainty": {key: UNCERTAINTY[key] for key in (*sources, "attribution")},
    }


def year_of(figure: dict) -> str:
    return f", year {figure['year']}" if figure.get("year") else ""


def _kj(joules: float) -> str:
    return f"{joules / 1000:,.3f}"


def render_markdown(report: dict) -> str:
    """The report as a Markdown page an auditor can read."""
    energy, sci, grid, pue = (report["energy_joules"], report["sci"], report["grid_intensity"],
                              report["pue"])
    lines = [
        f"# Energy report: run `{report['run']}`", "",
        f"- Window (UTC): {report['start_utc']} to {report['end_utc']} "
        f"({report['duration_seconds']:.0f} s, {report['meter_sessions']} meter session(s)"
        f"{'' if report['complete'] else INCOMPLETE})",
        f"- Steps trained: {report['steps']}; training images (R): {report['images']}",
        f"- Accelerator-hours: {report['accelerator_hours']:.3f}",
        f"- IT energy: {_kj(energy['total_it'])} kJ; with PUE {pue['value']}: "
        f"{sci['E_kwh']:.6f} kWh (E)",
        f"- Grid intensity (I): {grid['g_per_kwh']:g} gCO2e/kWh — {grid['source']}"
        f"{year_of(grid)}",
        f"- PUE: {pue['value']} — {pue['source']}{year_of(pue)}",
        f"- Operational emissions (O = E x I): {sci['O_g']:.3f} gCO2e; embodied (M): not assessed",
    ]
    if report["energy_per_image_joules"] is not None:
        lines.append(f"- Energy per training image: {report['energy_per_image_joules']:.3f} J; "
                     f"per step: {report['energy_per_step_joules']:.3f} J; SCI: "
                     f"{sci['SCI_g_per_image']:.6f} gCO2e per image")
    if report["projection"]:
        p = report["projection"]
        lines.append(f"- Projection after {p['step']} steps: {_kj(p['projected_joules'])} kJ and "
                     f"{p['projected_co2e_grams']:.3f} gCO2e for the configured {p['steps']} steps")
    lines += ["", "## Energy by stage", "", "| stage | kJ | gCO2e |", "|---|---:|---:|"]
    for stage, joules in energy["by_stage"].items():
        lines.append(f"| {stage} | {_kj(joules)} | {report['co2e_grams_by_stage'][stage]:.3f} |")
    lines += ["", "## Energy by node, device and component", "",
              "| node | device | component | source | interval s | kJ | train | data | idle |",
              "|---|---|---|---|---:|---:|---:|---:|---:|"]
    hostnames = {n["node"]: n["hostname"] for n in report["hardware"]}
    for row in energy["by_device"]:
        stages = row["stages"]
        lines.append(f"| {hostnames[row['node']]} | {row['device']} | {row['component']} | "
                     f"{row['source']} | {row['interval_seconds']:g} | {_kj(row['joules'])} | "
                     f"{_kj(stages['train'])} | {_kj(stages['data'])} | {_kj(stages['idle'])} |")
    lines += ["", "## Hardware", ""]
    for node in report["hardware"]:
        gpus = ", ".join(f"{g['name']} ({g['uuid']})" for g in node["gpus"]) or "none"
        lines.append(f"- {node['hostname']} (Ray node {node['node'][:12]}): {node['cpu_model']}, "
                     f"{node['logical_cpus']} logical CPUs, "
                     f"{node['memory_bytes'] / 1024**3:.1f} GiB; GPUs: {gpus}")
        for meter in node["meters"]:
            lines.append(f"  - {meter['device']} ({meter['component']}, {meter['source']}): "
                         f"{meter['detail']}")
    lines += ["", "## Uncertainty", ""]
    lines += [f"- {key}: {text}" for key, text in report["uncertainty"].items()]
    if report["ledger_lines_cut"]:
        lines.append(f"- {report['ledger_lines_cut']} ledger line(s) cut by a crash were skipped.")
    return "\n".join(lines) + "\n"


def render_chart(scan: LedgerScan, max_points: int = 2000) -> bytes:
    """PNG: power over time by stage, one panel per node (at most ``max_points`` per node:
    a week of minute lines is averaged into bins)."""
    import matplotlib
    import numpy as np

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    hostnames = {s["meter"]["node"]: s["meter"]["hostname"] for s in scan.sessions}
    nodes = sorted(scan.series)
    start = scan.start or 0.0
    figure, axes = plt.subplots(len(nodes) or 1, 1, figsize=(9, 2.8 * max(1, len(nodes))),
                                squeeze=False)
    for ax, node in zip(axes[:, 0], nodes):
        series = scan.series[node]
        order = np.argsort(np.frombuffer(series.times))
        times = np.frombuffer(series.times)[order] - start
        watts = {stage: np.frombuffer(series.watts[stage])[order] for stage in STAGES}
        if len(times) > max_points:  # equal-count bins: means of consecutive lines
            bins = np.array_split(np.arange(len(times)), max_points)
            times = np.array([times[b].mean() for b in bins])
            watts = {stage: np.array([w[b].mean() for b in bins]) for stage, w in watts.items()}
        ax.stackplot(times, *watts.values(), labels=STAGES, step="mid")
        ax.set_title(f"node {hostnames.get(node, node)} ({node[:12]})", fontsize=9)
        ax.set_ylabel("power (W)")
        ax.legend(loc="upper right", fontsize=8)
    axes[-1, 0].set_xlabel("seconds since the run's first interval")
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    plt.close(figure)
    return buffer.getvalue()


def write_report(run_uri: str, options: StorageOptions | None = None, out: str | None = None,
                 log: Callable[[str], None] = print) -> dict:
    """Read RUN_DIR's ledger and write the three report files to ``out`` (default RUN_DIR)."""
    scan = read_ledger(run_uri, options)
    report = build_report(scan)
    out = out or run_uri
    fs, root = open_filesystem(out, options)
    storage_call(out, options, fs.makedirs, root, exist_ok=True)
    files = {"json": json.dumps(report, indent=2).encode(),
             "md": render_markdown(report).encode(), "png": render_chart(scan)}
    for suffix, data in files.items():
        storage_call(out, options, fs.pipe_file, posixpath.join(root, f"{REPORT_NAME}.{suffix}"),
                     data)
    sci = report["sci"]
    log(f"energy of run {report['run']}: {_kj(report['energy_joules']['total_it'])} kJ IT "
        f"({', '.join(report['sources'])}), {sci['E_kwh']:.6f} kWh with PUE "
        f"{report['pue']['value']}, {sci['O_g']:.3f} gCO2e; report in "
        f"{out.rstrip('/')}/{REPORT_NAME}.{{json,md,png}}")
    return report
