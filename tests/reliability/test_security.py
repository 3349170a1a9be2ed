"""Credentials never leave the options they were given in, and the metrics endpoint binds where it
is told to.

A run on S3 with distinctive credentials passed explicitly (the worst case: they travel to every
worker in the run's options) leaves no trace of them in the printed output, the run directory
(metrics, checkpoints, energy ledger and report), the Prometheus endpoint or Ray's logs; a URL
with credentials in it is refused before it can be printed or saved."""

from __future__ import annotations

import subprocess
import sys
import urllib.request
from pathlib import Path

import psutil
import pytest
import ray

from pipelines.storage.access import StorageOptions
from ssl_train.config import load_config
from ssl_train.runtime.launcher import train
from tests.conftest import RAY_METRICS_PORT, free_port
from tests.reliability.conftest import tiny_overrides

pytestmark = pytest.mark.reliability
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

CANARY_KEY = "AKIACANARY7Q2ZX4P9LM"
CANARY_SECRET = "canary/Secret+9f2b7e4d1c0a8b6e5f3d2c1b0a9e8d7c6b5a4f3e"


def _leaks(text: str) -> list[str]:
    return [value for value in (CANARY_KEY, CANARY_SECRET) if value in text]


def test_no_credential_reaches_output_run_files_metrics_or_ray_logs(s3_server, s3_bucket,
                                                                     tmp_path, ray_local,
                                                                     monkeypatch):
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name, raising=False)
    options = StorageOptions(endpoint_url=s3_server, key=CANARY_KEY, secret=CANARY_SECRET)
    config = load_config("tiny-cpu", tiny_overrides(
        f"run.output_dir={s3_bucket}/runs", "run.name=canary", "train.steps=2",
        "train.checkpoint_every=2", "train.log_every=1"))
    lines: list[str] = []
    run_uri = train(config, options=options, log=lines.append)

    assert _leaks("\n".join(lines)) == []
    import s3fs

    store = s3fs.S3FileSystem(endpoint_url=s3_server, key=CANARY_KEY, secret=CANARY_SECRET)
    files = store.find(run_uri[5:])
    assert any(f.endswith("train_state.json") for f in files)
    assert any(f.endswith("energy_report.json") for f in files)
    for path in files:
        assert _leaks(store.cat_file(path).decode("latin-1")) == [], path
    scrape = urllib.request.urlopen(f"http://127.0.0.1:{RAY_METRICS_PORT}/metrics").read()
    assert b"ssl_" in scrape and _leaks(scrape.decode()) == []
    logs = Path(ray_local._private.worker._global_node.get_session_dir_path()) / "logs"
    for path in logs.rglob("*"):
        if path.is_file():
            assert _leaks(path.read_text(errors="replace")) == [], path


@pytest.mark.parametrize("url_key", ["run.output_dir", "data.source.url"])
def test_a_url_with_credentials_is_refused_without_echoing_them(url_key):
    command = [str(Path(sys.executable).parent / "ssl-pretrain"), "train", "--print-config",
               "--set", f"{url_key}=s3://{CANARY_KEY}:{CANARY_SECRET}@bucket/runs"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert f"{url_key}: must not carry credentials" in result.stderr
    assert _leaks(result.stdout + result.stderr) == []


@pytest.mark.parametrize("address", ["127.0.0.1", "0.0.0.0"])
def test_the_ingest_metrics_endpoint_binds_to_the_configured_address(address):
    from pipelines.ingest import IngestMetrics

    port = free_port()
    metrics = IngestMetrics(port, address)
    try:
        bound = {c.laddr.ip for c in psutil.net_connections("tcp")
                 if c.status == psutil.CONN_LISTEN and c.laddr.port == port}
        assert bound == {address}
        scrape = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics").read().decode()
        assert "ssl_ingest_images" in scrape
    finally:
        metrics.server.shutdown()
