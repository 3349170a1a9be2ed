"""``ssl-pretrain energy-report RUN_DIR``: the run's energy and carbon, from its ledger alone.

Reads every ledger file under RUN_DIR/energy (one per node meter session; a line cut by a crash
is skipped and counted) and the run's ``metrics.jsonl`` (steps trained, the projection), and
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
from collections import defaultdict
from collections.abc import Callable

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


def read_ledger(run_uri: str, options: StorageOptions | None = None) -> dict:
    """{sessions: [{meter, intervals, stopped}], cut_lines, metrics: [records]}."""
    fs, root = open_filesystem(run_uri, options)
    pattern = posixpath.join(root, LEDGER_DIR, "ledger-*.jsonl")
    files = sorted(storage_call(run_uri, options, fs.glob, pattern))
    if not files:
        raise LedgerError(f"no energy ledger under {run_uri.rstrip('/')}/{LEDGER_DIR}: was the run "
                          "trained with energy.enabled?")
    def records(path: str) -> tuple[list[dict], int]:
        """The JSON lines of ``path``, and how many lines a crash cut (skipped)."""
        parsed, cut = [], 0
        for line in storage_call(run_uri, options, fs.cat_file, path).decode().splitlines():
            try:
                parsed.append(json.loads(line))
            except ValueError:
                cut += 1
        return parsed, cut

    sessions, cut = [], 0
    for path in files:
        session = {"file": posixpath.basename(path), "meter": None, "intervals": [],
                   "stopped": None}
        lines, cut_here = records(path)
        cut += cut_here
        for record in lines:
            kind = record.get("type")
            if kind == "meter":
                session["meter"] = record
            elif kind == "interval":
                session["intervals"].append(record)
            elif kind == "stopped":
                session["stopped"] = record["time"]
        if session["meter"] is not None:
            sessions.append(session)
    metrics_path = posixpath.join(root, "metrics.jsonl")
    metrics = (records(metrics_path)[0]
               if storage_call(run_uri, options, fs.exists, metrics_path) else [])
    return {"sessions": sessions, "cut_lines": cut, "metrics": metrics}


def build_report(ledger: dict) -> dict:
    """The report's content from a ledger (``read_ledger``)."""
    sessions = ledger["sessions"]
    by_stage: dict[str, float] = dict.fromkeys(STAGES, 0.0)
    by_node: dict[str, float] = defaultdict(float)
    by_device: dict[tuple, dict] = {}
    gpu_seconds = 0.0
    starts, ends, nodes = [], [], {}
    for session in sessions:
        meter = session["meter"]
        node = meter["node"]
        nodes.setdefault(node, {"node": node, "hostname": meter["hostname"],
                                **meter["inventory"], "meters": meter["meters"],
                                "sessions": 0})
        nodes[node]["sessions"] += 1
        for interval in session["intervals"]:
            starts.append(interval["t0"])
            ends.append(interval["t1"])
            for entry in interval["entries"]:
                key = (node, entry["device"], entry["component"], entry["source"])
                row = by_device.setdefault(key, {
                    "node": node, "device": entry["device"], "component": entry["component"],
                    "source": entry["source"], "interval_seconds": meter["interval_seconds"],
                    "joules": 0.0, "stages": dict.fromkeys(STAGES, 0.0)})
                row["joules"] += entry["joules"]
                by_node[node] += entry["joules"]
                for stage, joules in entry["stages"].items():
                    row["stages"][stage] += joules
                    by_stage[stage] += joules
                if entry["component"] == "gpu":
                    gpu_seconds += interval["t1"] - interval["t0"]
    latest = max(sessions, key=lambda s: s["meter"]["started"])["meter"]
    grid, pue = latest["grid_intensity"], latest["pue"]
    it_joules = sum(by_node.values())
    facility_joules = it_joules * pue["value"]
    steps = max((r["step"] for r in ledger["metrics"] if "loss" in r), default=0)
    images_per_step = latest.get("images_per_step", 0)
    images = steps * images_per_step
    operational = co2e_grams(it_joules, grid["g_per_kwh"], pue["value"])
    sources = sorted({row["source"] for row in by_device.values()})
    projections = [r for r in ledger["metrics"] if r.get("event") == "energy_projection"]
    return {
        "run": latest["run"],
        "start_utc": utc(min(starts)) if starts else None,
        "end_utc": utc(max(ends)) if ends else None,
        "duration_seconds": (max(ends) - min(starts)) if starts else 0.0,
        "complete": all(s["stopped"] for s in sessions),
        "meter_sessions": len(sessions),
        "ledger_lines_cut": ledger["cut_lines"],
        "hardware": sorted(nodes.values(), key=lambda n: n["hostname"]),
        "accelerator_hours": gpu_seconds / 3600,
        "energy_joules": {
            "total_it": it_joules,
            "by_stage": by_stage,
            "idle": by_stage["idle"],
            "by_node": dict(by_node),
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
        "projection": projections[-1] if projections else None,
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
        f"{'' if report['complete'] else '; the run did not stop cleanly: figures up to its last ledger line'})",
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


def render_chart(ledger: dict) -> bytes:
    """PNG: power over time by stage, one panel per node."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_node: dict[str, list] = defaultdict(list)
    hostnames = {}
    for session in ledger["sessions"]:
        by_node[session["meter"]["node"]].extend(session["intervals"])
        hostnames[session["meter"]["node"]] = session["meter"]["hostname"]
    start = min((i["t0"] for items in by_node.values() for i in items), default=0.0)
    figure, axes = plt.subplots(len(by_node) or 1, 1, figsize=(9, 2.8 * max(1, len(by_node))),
                                squeeze=False)
    for ax, (node, intervals) in zip(axes[:, 0], sorted(by_node.items())):
        intervals.sort(key=lambda i: i["t0"])
        times = [(i["t0"] + i["t1"]) / 2 - start for i in intervals]
        watts = {stage: [sum(e["stages"].get(stage, 0.0) for e in i["entries"])
                         / max(i["t1"] - i["t0"], 1e-9) for i in intervals] for stage in STAGES}
        ax.stackplot(times, *watts.values(), labels=STAGES, step="mid")
        ax.set_title(f"node {hostnames[node]} ({node[:12]})", fontsize=9)
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
    ledger = read_ledger(run_uri, options)
    report = build_report(ledger)
    out = out or run_uri
    fs, root = open_filesystem(out, options)
    storage_call(out, options, fs.makedirs, root, exist_ok=True)
    files = {"json": json.dumps(report, indent=2).encode(),
             "md": render_markdown(report).encode(), "png": render_chart(ledger)}
    for suffix, data in files.items():
        storage_call(out, options, fs.pipe_file, posixpath.join(root, f"{REPORT_NAME}.{suffix}"),
                     data)
    sci = report["sci"]
    log(f"energy of run {report['run']}: {_kj(report['energy_joules']['total_it'])} kJ IT "
        f"({', '.join(report['sources'])}), {sci['E_kwh']:.6f} kWh with PUE "
        f"{report['pue']['value']}, {sci['O_g']:.3f} gCO2e; report in "
        f"{out.rstrip('/')}/{REPORT_NAME}.{{json,md,png}}")
    return report
