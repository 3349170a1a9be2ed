"""Energy accounting: meters at the device boundary (fake RAPL folders and a fake NVML library with
known counters), attribution by stage, a real two-worker run on one node, and the report."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path

import pytest

from ssl_train.config import ConfigError, load_config
from ssl_train.energy.meters import (
    ESTIMATED,
    MEASURED,
    SAMPLED,
    load_nvml,
    node_meters,
    nvml_gpus,
    rapl_zones,
)
from ssl_train.energy.node import EnergySettings, NodeEnergy
from ssl_train.energy.report import read_ledger, write_report


def write_counter(path: Path, microjoules: int) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(f"{microjoules}\n")
    os.replace(tmp, path)  # a reader never sees a half-written counter


def fake_powercap(root: Path, max_range_uj: int) -> dict[str, Path]:
    """A powercap folder as the kernel lays it out: a package, its core subzone, its DRAM."""
    zones = {"package-0": root / "intel-rapl:0", "core": root / "intel-rapl:0" / "intel-rapl:0:0",
             "dram": root / "intel-rapl:0" / "intel-rapl:0:1"}
    for name, path in zones.items():
        path.mkdir(parents=True, exist_ok=True)
        (path / "name").write_text(f"{name}\n")
        (path / "max_energy_range_uj").write_text(f"{max_range_uj}\n")
        write_counter(path / "energy_uj", 0)
    # The kernel also links subzones at the top level.
    for sub in ("intel-rapl:0:0", "intel-rapl:0:1"):
        (root / sub).symlink_to(zones["core" if sub.endswith("0") else "dram"])
    return {"cpu": zones["package-0"] / "energy_uj", "dram": zones["dram"] / "energy_uj",
            "core": zones["core"] / "energy_uj"}


def test_rapl_counters_give_exact_joules_across_a_wraparound(tmp_path):
    counters = fake_powercap(tmp_path, max_range_uj=10_000_000)  # wraps at 10 J
    write_counter(counters["cpu"], 7_000_000)
    write_counter(counters["dram"], 1_000_000)
    zones = rapl_zones(tmp_path)
    assert sorted((z.component, z.device) for z in zones) == [("cpu", "package-0"),
                                                              ("dram", "dram-0")]
    write_counter(counters["cpu"], 9_500_000)  # +2.5 J
    write_counter(counters["core"], 9_000_000)  # part of the package: never counted again
    write_counter(counters["dram"], 1_250_000)
    assert [(r.device, r.source, r.joules) for r in (z.read() for z in zones)] == [
        ("package-0", MEASURED, 2.5), ("dram-0", MEASURED, 0.25)]
    write_counter(counters["cpu"], 1_500_000)  # passed 10 J: +0.5 J to the top, +1.5 J after
    assert zones[0].read().joules == pytest.approx(2.0)
    assert zones[0].read().joules == 0.0


class FakeNvml:
    """The NVML functions the meters call, with known counters: GPU 0 has the total-energy
    counter (mJ), GPU 1 only reports power (mW)."""

    class NVMLError(Exception):
        pass

    def __init__(self):
        self.energy_mj = [1_000_000, None]
        self.power_mw = [300_000, 150_000]

    def nvmlInit(self):
        pass

    def nvmlDeviceGetCount(self):
        return 2

    def nvmlDeviceGetHandleByIndex(self, index):
        return index

    def nvmlDeviceGetUUID(self, handle):
        return f"GPU-0000000{handle}-aaaa-bbbb-cccc-dddddddddddd"

    def nvmlDeviceGetName(self, handle):
        return b"Fake H100"

    def nvmlDeviceGetTotalEnergyConsumption(self, handle):
        if self.energy_mj[handle] is None:
            raise self.NVMLError("Not Supported")
        return self.energy_mj[handle]

    def nvmlDeviceGetPowerUsage(self, handle):
        return self.power_mw[handle]


def test_nvml_counter_gives_exact_joules_and_power_is_integrated_where_unsupported():
    nvml, now = FakeNvml(), [100.0]
    gpus = nvml_gpus(nvml)
    for gpu in gpus:
        gpu.clock = lambda: now[0]
        if gpu.source == SAMPLED:
            gpu.last_time = now[0]
    assert [g.source for g in gpus] == [MEASURED, SAMPLED]
    nvml.energy_mj[0] += 123_456  # 123.456 J
    now[0] += 2.0
    nvml.power_mw[1] = 250_000  # 150 W -> 250 W over 2 s: 400 J by the trapezoid rule
    readings = [g.read() for g in gpus]
    assert [(r.device, r.component, r.source) for r in readings] == [
        ("GPU-00000000-aaaa-bbbb-cccc-dddddddddddd", "gpu", MEASURED),
        ("GPU-00000001-aaaa-bbbb-cccc-dddddddddddd", "gpu", SAMPLED)]
    assert readings[0].joules == pytest.approx(123.456, abs=1e-9)
    assert readings[1].joules == pytest.approx(400.0)


def test_without_nvml_there_is_no_gpu_meter_and_no_gpu_estimate(tmp_path):
    nvml = load_nvml()
    if nvml is not None:
        try:
            nvml.nvmlInit()
            pytest.skip("this machine has NVML and a driver: the real GPU path applies")
        except nvml.NVMLError:
            pass
    meters = node_meters(tmp_path / "no-powercap", nvml)
    assert sorted((m.info().component, m.info().source) for m in meters) == [
        ("cpu", ESTIMATED), ("dram", ESTIMATED)]


def test_real_nvml_counts_up_on_a_gpu_machine():
    nvml = load_nvml()
    if nvml is None:
        pytest.skip("nvidia-ml-py is not installed")
    gpus = nvml_gpus(nvml)
    if not gpus:
        pytest.skip("no NVML driver or GPU on this machine")
    time.sleep(1.0)
    for reading in (g.read() for g in gpus):
        assert reading.source in (MEASURED, SAMPLED) and reading.joules > 0


def _busy(seconds: float) -> None:
    end = time.process_time() + seconds
    while time.process_time() < end:
        pass


def test_a_node_splits_each_reading_between_stages_and_idle(tmp_path):
    counters = fake_powercap(tmp_path / "powercap", max_range_uj=2**32)
    settings = EnergySettings(run="split", run_uri=str(tmp_path / "run"), storage={},
                              grid={"g_per_kwh": 400.0, "source": "test", "year": 2025},
                              pue={"value": 1.2, "source": "test"},
                              powercap_root=str(tmp_path / "powercap"))
    nvml = FakeNvml()
    node = NodeEnergy(settings, "node-a", nvml)
    data_worker = subprocess.Popen([sys.executable, "-c",
                                    "import time\nend=time.process_time()+1.0\n"
                                    "while time.process_time()<end: pass\ntime.sleep(30)"])
    try:
        node.register(os.getpid(), "train", ["00000000-aaaa-bbbb-cccc-dddddddddddd"])
        node.register(data_worker.pid, "data")
        _busy(0.5)
        time.sleep(1.5)
        write_counter(counters["cpu"], 40_000_000)
        write_counter(counters["dram"], 4_000_000)
        nvml.energy_mj[0] += 500_000
        record = node.sample()
    finally:
        data_worker.kill()
    by_device = {e["device"]: e for e in record["entries"]}
    assert set(by_device) == {"package-0", "dram-0", "GPU-00000000-aaaa-bbbb-cccc-dddddddddddd",
                              "GPU-00000001-aaaa-bbbb-cccc-dddddddddddd"}
    package = by_device["package-0"]
    assert package["joules"] == 40.0
    assert sum(package["stages"].values()) == pytest.approx(40.0)
    assert package["stages"]["train"] > 0 and package["stages"]["data"] > 0
    assert package["stages"]["idle"] > 0  # 2 s of a node's CPUs were not all busy
    # The training worker's GPU goes to train, the unused one to idle.
    assert by_device["GPU-00000000-aaaa-bbbb-cccc-dddddddddddd"]["stages"] == {"train": 500.0,
                                                                               "idle": 0.0}
    assert set(by_device["GPU-00000001-aaaa-bbbb-cccc-dddddddddddd"]["stages"]) == {"idle"}
    node.stop()
    report = write_report(str(tmp_path / "run"), log=lambda line: None)
    assert report["complete"]
    _, by_stage, by_component, _ = _ledger_sums(tmp_path / "run")
    assert report["energy_joules"]["total_it"] == pytest.approx(sum(by_component.values()))
    assert report["energy_joules"]["by_stage"]["train"] == pytest.approx(
        sum(j for (component, stage), j in by_stage.items() if stage == "train"))
    # CO2e = kWh x PUE x intensity, per stage.
    assert report["sci"]["O_g"] == pytest.approx(
        report["energy_joules"]["total_it"] / 3.6e6 * 1.2 * 400.0)


def test_the_ledger_rolls_into_parts_each_uploaded_once_holding_the_sums_of_its_samples(
        tmp_path, monkeypatch):
    """In an object store the ledger's upload volume stays linear in the run's length: each
    closed part goes up once and is never written again; its lines are exact sums of the 1-s
    samples, and the report streams over the parts to the same totals."""
    from fsspec.implementations.memory import MemoryFileSystem

    uploads: dict[str, int] = defaultdict(int)
    put_file = MemoryFileSystem.put_file

    def counted(self, lpath, rpath, *args, **kwargs):
        uploads[rpath] += 1
        return put_file(self, lpath, rpath, *args, **kwargs)

    monkeypatch.setattr(MemoryFileSystem, "put_file", counted)
    counters = fake_powercap(tmp_path / "powercap", max_range_uj=2**40)
    run_uri = f"memory://ledger-{tmp_path.name}/run"
    settings = EnergySettings(run="parts", run_uri=run_uri, storage={},
                              grid={"g_per_kwh": 100.0, "source": "test"},
                              pue={"value": 1.0, "source": "test"},
                              powercap_root=str(tmp_path / "powercap"),
                              record_every_seconds=0.1, upload_every_seconds=0.35)
    node = NodeEnergy(settings, "node-parts")
    # The header is in the store from the start, as a part of its own.
    assert [json.loads(line)["type"] for line in MemoryFileSystem().cat_file(
        next(iter(uploads))).splitlines()] == ["meter"]
    sampled, microjoules = 0.0, 0
    for _ in range(40):
        microjoules += 250_000
        write_counter(counters["cpu"], microjoules)
        time.sleep(0.02)
        sampled += sum(e["joules"] for e in node.sample()["entries"]
                       if e["component"] == "cpu")
    node.stop()
    fs = MemoryFileSystem()
    parts = sorted(fs.glob(f"/ledger-{tmp_path.name}/run/energy/ledger-*/part-*.jsonl"))
    assert len(parts) >= 3, parts
    assert set(uploads) == set(parts) and set(uploads.values()) == {1}, dict(uploads)
    lines = [json.loads(line) for part in parts for line in fs.cat_file(part).splitlines()]
    intervals = [line for line in lines if line["type"] == "interval"]
    assert 3 <= len(intervals) < 41  # summed: fewer lines than samples
    assert sum(line["samples"] for line in intervals) == 41  # the 40 and stop's last one
    cpu = sum(e["joules"] for line in intervals for e in line["entries"]
              if e["component"] == "cpu")
    assert cpu == pytest.approx(sampled, rel=1e-12) and cpu == pytest.approx(10.0)
    report = write_report(run_uri, log=lambda line: None)
    assert report["complete"] and report["ledger_parts"] == len(parts)
    assert report["ledger_lines"] == len(intervals)
    assert report["energy_joules"]["total_it"] == pytest.approx(
        sum(e["joules"] for line in intervals for e in line["entries"]))


def test_the_ledger_cadence_is_checked():
    with pytest.raises(ConfigError, match=r"energy.record_every_seconds \(600\) <= "
                                          r"energy.upload_every_seconds \(300\) must hold"):
        load_config("tiny-cpu", ["energy.record_every_seconds=600"])


def test_a_missing_grid_intensity_is_a_config_error():
    with pytest.raises(ConfigError, match="energy.grid_intensity is missing: set energy.region"):
        load_config("tiny-cpu", ["energy.region=null"])
    with pytest.raises(ConfigError, match="energy.region 'Atlantis' is not in the default table"):
        load_config("tiny-cpu", ["energy.region=Atlantis"])
    config = load_config("tiny-cpu", [
        "energy.region=null",
        "energy.grid_intensity={g_per_kwh: 31, source: supplier certificate 2025, year: 2025}"])
    assert config.energy.grid()["source"] == "supplier certificate 2025"
    assert load_config("tiny-cpu", ["energy.region=gcp:europe-west1"]).energy.grid()["g_per_kwh"] > 0


class FakeRapl(threading.Thread):
    """Counters of a package at ``package_watts`` and DRAM at ``dram_watts``, as functions of
    wall time, wrapping at ``max_range_uj`` like the kernel's."""

    def __init__(self, counters, package_watts, dram_watts, max_range_uj):
        super().__init__(daemon=True)
        self.counters, self.max_range = counters, max_range_uj
        self.watts = {"cpu": package_watts, "dram": dram_watts}
        self.start_time = time.time()
        self.stopped = threading.Event()

    def run(self):
        while not self.stopped.is_set():
            elapsed = time.time() - self.start_time
            for component, watts in self.watts.items():
                write_counter(self.counters[component],
                              int(watts * elapsed * 1e6) % self.max_range)
            time.sleep(0.01)


def _ledger_sums(run_dir: Path):
    """Joules by (component, stage) and by component, straight from the ledger's lines."""
    by_stage, by_component, windows = defaultdict(float), defaultdict(float), []
    headers = []
    for path in sorted((run_dir / "energy").glob("ledger-*/part-*.jsonl")):
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if record["type"] == "meter":
                headers.append(record)
            if record["type"] != "interval":
                continue
            windows.append((record["t0"], record["t1"]))
            for entry in record["entries"]:
                by_component[entry["component"]] += entry["joules"]
                for stage, joules in entry["stages"].items():
                    by_stage[(entry["component"], stage)] += joules
    return headers, by_stage, by_component, windows


def test_two_workers_and_the_data_stage_count_the_node_once_and_a_killed_run_reports(
        tmp_path, ray_local, sample_shards):
    """Two training workers and the data stage's processes on one node, a fake RAPL package at
    50 W and DRAM at 5 W wrapping every 1.2 s; the driver is killed mid-run."""
    sample_shards(tmp_path)
    counters = fake_powercap(tmp_path / "powercap", max_range_uj=60_000_000)
    rapl = FakeRapl(counters, package_watts=50.0, dram_watts=5.0, max_range_uj=60_000_000)
    rapl.start()
    executable = Path(sys.executable).parent / "ssl-pretrain"
    tiny = [
        "model.image_size=32", "model.encoder.depth=2", "model.encoder.embed_dim=96",
        "model.encoder.num_heads=2", "objectives.mae.decoder.depth=1", "objectives.mae.decoder.embed_dim=64",
        "objectives.mae.decoder.num_heads=2", "objectives.simclr.projector.hidden_dim=128", "objectives.simclr.projector.out_dim=64",
        "train.global_batch_size=8", "data.quality.min_side=32",
        f"run.output_dir={tmp_path}", "run.name=killed", "train.steps=400",
        "train.checkpoint_every=5", "energy.interval_seconds=0.25",
        "energy.record_every_seconds=0.5", "energy.upload_every_seconds=2",
        "energy.projection_after_steps=4", f"energy.powercap_root={tmp_path / 'powercap'}",
    ]
    address = ray_local.get_runtime_context().gcs_address
    driver = subprocess.Popen(
        [str(executable), "train", "--address", address,
         *[arg for item in tiny for arg in ("--set", item)]],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    run_dir = tmp_path / "killed"
    output: list[str] = []
    reader = threading.Thread(target=lambda: output.extend(driver.stdout), daemon=True)
    reader.start()
    try:
        deadline = time.time() + 300
        while time.time() < deadline and driver.poll() is None:
            metrics = run_dir / "metrics.jsonl"
            steps = [json.loads(line).get("step", 0) for line in metrics.read_text().splitlines()
                     if line.strip()] if metrics.exists() else []
            if max(steps, default=0) >= 12:
                break
            time.sleep(0.5)
        assert driver.poll() is None, "".join(output)[-3000:]
    finally:
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait(timeout=30)
        reader.join(timeout=30)  # what the driver printed before the kill, read to its end
        rapl.stopped.set()
    assert any("energy:" in line and "projected for 400 steps" in line for line in output), \
        "".join(line for line in output if "PlacementGroupCleaner" not in line)[-3000:]
    # The meter dies with the job that owned it: the ledger stops growing.
    sizes, deadline = [], time.time() + 60
    while time.time() < deadline and (len(sizes) < 3 or len(set(sizes[-3:])) > 1):
        sizes.append(sum(p.stat().st_size for p in (run_dir / "energy").glob("*/*.jsonl")))
        time.sleep(1.0)
    assert len(set(sizes[-3:])) == 1, sizes

    headers, by_stage, by_component, windows = _ledger_sums(run_dir)
    # One meter on the node, whatever the number of workers and actors there.
    assert len(headers) == 1
    assert {m["device"] for m in headers[0]["meters"]} == {"package-0", "dram-0"}
    assert {m["source"] for m in headers[0]["meters"]} == {MEASURED}
    # The stages add up to the node's meters.
    for component in ("cpu", "dram"):
        assert sum(by_stage[(component, s)] for s in ("train", "data", "idle")) == pytest.approx(
            by_component[component], rel=1e-9)
    assert by_stage[("cpu", "train")] > 0 and by_stage[("cpu", "data")] > 0
    # Counted once: the package's joules are 50 W over the metered window (wraparounds included).
    window = windows[-1][1] - windows[0][0]
    assert window > 5
    assert by_component["cpu"] == pytest.approx(50.0 * window, rel=0.03, abs=5.0)
    assert by_component["dram"] == pytest.approx(5.0 * window, rel=0.03, abs=1.0)

    result = subprocess.run([str(executable), "energy-report", str(run_dir)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    report = json.loads((run_dir / "energy_report.json").read_text())
    assert not report["complete"]
    assert report["energy_joules"]["total_it"] == pytest.approx(sum(by_component.values()))
    for stage in ("train", "data", "idle"):
        assert report["energy_joules"]["by_stage"][stage] == pytest.approx(
            by_stage[("cpu", stage)] + by_stage[("dram", stage)])
    assert report["steps"] >= 12 and report["images"] == report["steps"] * 8
    assert report["energy_per_image_joules"] == pytest.approx(
        report["energy_joules"]["total_it"] / report["images"])
    assert report["projection"]["steps"] == 400
    assert report["grid_intensity"]["source"].startswith("CodeCarbon")
    assert report["sources"] == [MEASURED]
    markdown = (run_dir / "energy_report.md").read_text()
    assert "did not stop cleanly" in markdown and "package-0" in markdown
    assert (run_dir / "energy_report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert read_ledger(str(run_dir)).sessions[0]["stopped"] is None


def test_energy_report_of_a_folder_without_a_ledger_is_a_usage_error(tmp_path):
    executable = Path(sys.executable).parent / "ssl-pretrain"
    result = subprocess.run([str(executable), "energy-report", str(tmp_path)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "no energy ledger under" in result.stderr
