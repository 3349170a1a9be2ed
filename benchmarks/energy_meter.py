"""Cost of a node's energy meter: one sample (every device read, every registered process's CPU
time, one ledger line) with N registered processes.

    .venv/bin/python benchmarks/energy_meter.py --processes 16 --samples 500

At the default ``energy.interval_seconds`` of 1 s, the meter's share of one core is the printed
time per sample divided by 1 s.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

from ssl_train.energy.node import EnergySettings, NodeEnergy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, default=16)
    parser.add_argument("--samples", type=int, default=500)
    args = parser.parse_args()
    children = [subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
                for _ in range(args.processes)]
    try:
        with tempfile.TemporaryDirectory() as run_dir:
            settings = EnergySettings(run="bench", run_uri=run_dir, storage={},
                                      grid={"g_per_kwh": 475.0}, pue={"value": 1.0})
            node = NodeEnergy(settings, "bench-node")
            for index, child in enumerate(children):
                node.register(child.pid, "train" if index % 2 else "data")
            times = []
            for _ in range(args.samples):
                started = time.perf_counter()
                node.sample()
                times.append(time.perf_counter() - started)
            node.stop()
    finally:
        for child in children:
            child.kill()
    print(json.dumps({"processes": args.processes, "samples": args.samples,
                      "meters": [m.info().device for m in node.meters],
                      "median_ms_per_sample": round(statistics.median(times) * 1e3, 3),
                      "mean_ms_per_sample": round(statistics.mean(times) * 1e3, 3),
                      "cpu_count": os.cpu_count()}))


if __name__ == "__main__":
    main()
