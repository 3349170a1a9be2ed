"""Prometheus metrics of a real run, scraped over HTTP, and the shipped Prometheus/Grafana files."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from collections import defaultdict
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from pipelines.stream.stage import DataConfig, DataStage
from ssl_train.config import load_config
from ssl_train.monitors.telemetry import TRAINING_GAUGES, exported_names
from ssl_train.runtime.launcher import train
from tests.conftest import RAY_METRICS_PORT, TINY_OVERRIDES, free_port
from tests.pipelines.planted import PHOTOGRAPHS, raw_image_files

INFRA = Path(__file__).resolve().parents[3] / "infra"


def _get(url: str, attempts: int = 3) -> bytes:
    """GET with retries: on two busy cores an exporter can take seconds to answer."""
    for attempt in range(attempts):
        try:
            return urllib.request.urlopen(url, timeout=20).read()
        except OSError:
            if attempt == attempts - 1:
                raise
            time.sleep(1)


def scrape(port: int = RAY_METRICS_PORT) -> dict[str, list]:
    """Samples by name (Ray's ray_ prefix removed, as the shipped scrape config does)."""
    text = _get(f"http://127.0.0.1:{port}/metrics").decode()
    samples = defaultdict(list)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[sample.name.removeprefix("ray_")].append(sample)
    return samples


def _value(samples, name, **labels) -> float | None:
    matching = [s.value for s in samples.get(name, [])
                if all(s.labels.get(k) == v for k, v in labels.items())]
    return sum(matching) if matching else None


def test_data_stage_counters_are_exported_exactly(tmp_path, ray_local):
    files = raw_image_files()
    rows = [{"image": data} for name, data in files.items() if name.startswith("photos/")]
    rows.append({"image": files["planted/truncated.jpg"]})
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "part-0.parquet")
    config = DataConfig.model_validate({"source": {"url": str(tmp_path), "format": "parquet"},
                                        "epochs": 1})
    stage = DataStage(config, 32, run_name="telemetry-data")
    for _ in stage.iter_batches(8):
        pass
    counters = stage.counters()
    assert counters["dropped_unreadable"] == 1
    expected = {
        ("ssl_data_images_read_total", None): counters["images_read"],
        ("ssl_data_bytes_read_total", None): counters["bytes_read"],
        ("ssl_data_images_emitted_total", None): counters["images_emitted"],
        ("ssl_data_shards_read_total", None): counters["shards_read"],
        ("ssl_data_images_dropped_total", "unreadable"): counters["dropped_unreadable"],
    }
    deadline = time.time() + 60
    while True:
        samples = scrape()
        got = {key: _value(samples, key[0], run="telemetry-data",
                           **({"reason": key[1]} if key[1] else {})) for key in expected}
        if got == expected or time.time() > deadline:
            break
        time.sleep(1)
    assert got == expected
    assert counters["images_emitted"] == len(PHOTOGRAPHS)


def _prometheus(tmp_path: Path, port: int):
    """A real Prometheus server scraping the Ray metrics port with the shipped config."""
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip("Debian's prometheus binary is not installed (apt-get install prometheus)")
    config = yaml.safe_load((INFRA / "prometheus" / "prometheus.yml").read_text())
    # Ray's endpoint gets 10 s to answer, scraped every 10 s. Its answer slows as the suite's Ray
    # session gathers series: alone this run's scrapes took up to 0.6 s, at the end of the whole
    # suite up to 2.7 s. Prometheus drops a scrape that runs past its timeout (the interval, when
    # none is given), and a CI run scraping every 1 s stored nothing. The run ends at step 10 and
    # its gauges stay exported, so one scrape after it is enough.
    config["global"].update(scrape_interval="10s", scrape_timeout="10s")
    config["scrape_configs"][0]["static_configs"] = [{"targets": [f"127.0.0.1:{RAY_METRICS_PORT}"]}]
    shutil.copy(INFRA / "prometheus" / "alerts.yml", tmp_path / "alerts.yml")
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    return subprocess.Popen(
        [binary, f"--config.file={tmp_path / 'prometheus.yml'}",
         f"--web.listen-address=127.0.0.1:{port}", f"--storage.tsdb.path={tmp_path / 'tsdb'}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )


def _query(port: int, promql: str) -> list:
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
    body = json.loads(_get(url))
    assert body["status"] == "success"
    return body["data"]["result"]


def _targets(port: int) -> str:
    """What Prometheus says of its scrapes of Ray's endpoint: health, last error, duration."""
    url = f"http://127.0.0.1:{port}/api/v1/targets"
    targets = json.loads(_get(url))["data"]["activeTargets"]
    return "; ".join(f"{t['scrapePool']}: {t['health']}, {t['lastError']!r}, "
                     f"{t['lastScrapeDuration']:.2f} s" for t in targets)


def test_a_two_worker_run_exports_every_metric_family(tmp_path, ray_local, sample_shards):
    """Of the iBOT-like hybrid [dino, mae]: an EMA teacher sharded over two workers, DINO's
    signals, and the collapse monitor and kNN on the teacher DINO exports."""
    prometheus_port = free_port()
    server = _prometheus(tmp_path, prometheus_port)
    sample_shards(tmp_path)
    config = load_config("tiny-cpu", [*TINY_OVERRIDES, "objectives=[dino, mae]",
                                      "objectives.dino.head.out_dim=256",
                                      "objectives.dino.head.hidden_dim=128",
                                      "objectives.dino.local_crops=2",
                                      f"run.output_dir={tmp_path}",
                                      "run.name=telemetry", "train.steps=10",
                                      "train.checkpoint_every=5", "telemetry.health_every=5",
                                      "energy.projection_after_steps=6",
                                      "telemetry.knn_monitor=digits"])
    scrapes: list[dict] = []  # scraped while the run trains
    done = threading.Event()

    def watch():
        while not done.is_set():
            try:
                samples = scrape()
            except OSError:
                samples = None
            if samples is not None and not done.is_set():
                scrapes.append(samples)
            time.sleep(1.5)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        try:
            train(config, log=lambda line: None)
        finally:
            done.set()
            watcher.join(timeout=10)
        time.sleep(3)  # one more export interval after the last step
        final = scrape()
        # The step is exported while the run trains, never goes back, and ends at the last step.
        # How many distinct steps a 1.5 s scrape sees is up to how fast ten tiny steps run on
        # busy cores (the last CI saw only step 10), so no count of them is asserted.
        steps = [_value(s, "ssl_step", run="telemetry", rank="0") for s in scrapes]
        steps = [v for v in steps if v is not None]
        assert steps and steps == sorted(steps) and set(steps) <= set(range(11))
        assert _value(final, "ssl_step", run="telemetry", rank="0") == 10
        for name in TRAINING_GAUGES:
            assert _value(final, name, run="telemetry") is not None, name
        for rank in ("0", "1"):
            assert _value(final, "ssl_images_per_second", run="telemetry", rank=rank) > 0
        components = {s.labels["component"] for s in final["ssl_loss"]
                      if s.labels.get("run") == "telemetry"}
        assert components == {"total", "dino", "masked"}
        signals = {s.labels["signal"] for s in final["ssl_objective_signal"]
                   if s.labels.get("run") == "telemetry"}
        assert signals == {"dino_teacher_entropy", "dino_kl"}
        assert 0 < _value(final, "ssl_embedding_std", run="telemetry", rank="0") < 1
        assert _value(final, "ssl_checkpoint_bytes", run="telemetry", rank="0") > 0
        assert _value(final, "ssl_data_images_emitted_total", run="telemetry") >= 10 * 8
        # One energy series per stage, node, device, component and source; CO2e per stage.
        energy = [s for s in final["ssl_energy_joules_total"] if s.labels["run"] == "telemetry"]
        assert {s.labels["stage"] for s in energy} == {"train", "data", "idle"}
        assert {s.labels["source"] for s in energy} <= {"measured", "sampled", "estimated"}
        assert all(s.labels["node"] and s.labels["device"] for s in energy)
        assert _value(final, "ssl_co2e_grams_total", run="telemetry", stage="train") > 0
        # The real Prometheus scraped the run through the shipped config: ray_ prefix removed.
        deadline = time.time() + 60
        while True:
            result = _query(prometheus_port, 'max_over_time(ssl_step{run="telemetry"}[10m])')
            if result or time.time() > deadline:
                break
            time.sleep(1)
        assert result, _targets(prometheus_port)
        assert max(float(r["value"][1]) for r in result) >= 5
        # Over a window: a finished run's series go stale, and an instant query misses them.
        assert _query(prometheus_port,
                      'last_over_time(ssl_loss{run="telemetry",component="masked"}[10m])')
        assert _query(prometheus_port, 'last_over_time(ssl_energy_joules_total{run="telemetry",'
                                       'stage="train"}[10m])')
    finally:
        server.terminate()
        server.wait(timeout=30)


@pytest.mark.parametrize("check,path", [("config", "prometheus.yml"), ("rules", "alerts.yml")])
def test_promtool_accepts_the_shipped_files(check, path):
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("Debian's promtool is not installed (apt-get install prometheus)")
    result = subprocess.run([promtool, "check", check, str(INFRA / "prometheus" / path)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dashboard_queries_name_exported_metrics():
    dashboard = json.loads((INFRA / "grafana" / "ssl-pretrain-dashboard.json").read_text())
    exported = exported_names() | {"ray_object_store_memory"}  # Ray's own per-node series
    named = set()
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            names = set(re.findall(r"\b((?:ssl|ray)_[a-z0-9_]+)\b", target["expr"]))
            assert names, panel["title"]
            named |= names
    assert named <= exported, named - exported
    # Every training and data family has a panel.
    assert {n for n in exported if n.startswith("ssl_")} <= named


def test_alert_rules_use_exported_metrics():
    rules = yaml.safe_load((INFRA / "prometheus" / "alerts.yml").read_text())
    for rule in rules["groups"][0]["rules"]:
        names = set(re.findall(r"\b(ssl_[a-z0-9_]+)\b", rule["expr"]))
        assert names and names <= exported_names(), rule["alert"]
