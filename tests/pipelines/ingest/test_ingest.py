"""Ingest on a real S3 endpoint: drops counted exactly by reason, manifest checksums true."""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import sys
from collections import Counter

import pytest
import s3fs

from pipelines.ingest import IngestConfig, ingest
from pipelines.storage.access import StorageError, StorageOptions
from pipelines.storage.shards import iter_shard_samples
from tests.pipelines.planted import PHOTOGRAPHS, PLANTED, raw_image_files, write_tree


def _fs(endpoint):
    return s3fs.S3FileSystem(endpoint_url=endpoint, key="testing-key", secret="testing-secret",
                             skip_instance_cache=True)


@pytest.fixture
def raw_on_s3(s3_bucket, s3_env):
    fs = _fs(s3_env)
    for relative, data in raw_image_files().items():
        fs.pipe(f"{s3_bucket[5:]}/raw/{relative}", data)
    return f"{s3_bucket}/raw"


def test_ingest_from_s3_counts_planted_drops_and_writes_true_checksums(
    raw_on_s3, s3_bucket, s3_env, ray_local
):
    dest = f"{s3_bucket}/shards"
    config = IngestConfig(samples_per_shard=5)
    manifest = ingest(raw_on_s3, dest, config, log=lambda line: None)

    fs = _fs(s3_env)
    report = json.loads(fs.cat_file(f"{dest[5:]}/quality_report.json"))
    expected = Counter(PLANTED.values())
    assert {k: v for k, v in report["dropped"].items() if v} == dict(expected)
    for path, reason in PLANTED.items():
        key = path.rsplit(".", 1)[0]
        assert key in report["examples"][reason]
    assert report["duplicate_of"] == {"planted/astronaut_copy": "photos/astronaut",
                                      "planted/coffee_small": "photos/coffee"}
    assert report["input_images"] == len(PHOTOGRAPHS) + len(PLANTED)
    assert report["kept_images"] == len(PHOTOGRAPHS)

    assert manifest == json.loads(fs.cat_file(f"{dest[5:]}/manifest.json"))
    assert manifest["total_samples"] == len(PHOTOGRAPHS)
    assert [s["samples"] for s in manifest["shards"]] == [5, 5, 5, 4]
    keys = []
    for shard in manifest["shards"]:
        data = fs.cat_file(f"{dest[5:]}/{shard['name']}")
        assert hashlib.sha256(data).hexdigest() == shard["sha256"]
        assert len(data) == shard["bytes"]
        samples = list(iter_shard_samples(io.BytesIO(data)))
        assert len(samples) == shard["samples"]
        for sample in samples:
            assert sample.image_bytes() is not None and "json" in sample.members
            assert json.loads(sample.members["json"])["key"] == sample.key
            keys.append(sample.key)
    assert sorted(keys) == sorted(f"photos/{p.rsplit('.', 1)[0]}" for p in PHOTOGRAPHS)


def test_ingest_by_bytes_and_reencoding(tmp_path, ray_local):
    src = write_tree(tmp_path / "raw", raw_image_files())
    config = IngestConfig(shard_bytes=2_000_000, reencode="jpeg", jpeg_quality=85, max_side=256)
    manifest = ingest(str(src), str(tmp_path / "out"), config, log=lambda line: None)
    assert len(manifest["shards"]) >= 1 and manifest["total_samples"] == len(PHOTOGRAPHS)
    for shard in manifest["shards"]:
        with open(tmp_path / "out" / shard["name"], "rb") as f:
            for sample in iter_shard_samples(f):
                ext, data = sample.image_bytes()
                assert ext == "jpg" and data[:2] == b"\xff\xd8"
                from PIL import Image

                assert max(Image.open(io.BytesIO(data)).size) <= 256


def test_ingest_serves_its_counts_on_a_prometheus_endpoint(tmp_path, ray_local):
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    from pipelines.ingest import IngestMetrics
    from tests.conftest import free_port

    port = free_port()
    src = write_tree(tmp_path / "raw", raw_image_files())
    manifest = ingest(str(src), str(tmp_path / "out"), IngestConfig(samples_per_shard=8),
                      log=lambda line: None, metrics=IngestMetrics(port))
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    values = {(s.name, s.labels.get("state") or s.labels.get("reason")): s.value
              for family in text_string_to_metric_families(text) for s in family.samples
              if s.name.startswith("ssl_ingest")}
    assert values[("ssl_ingest_images", "found")] == len(PHOTOGRAPHS) + len(PLANTED)
    assert values[("ssl_ingest_images", "kept")] == manifest["total_samples"]
    for reason, count in Counter(PLANTED.values()).items():
        assert values[("ssl_ingest_images_dropped", reason)] == count
    assert values[("ssl_ingest_shards_written", None)] == len(manifest["shards"]) == 3
    assert values[("ssl_ingest_bytes_written", None)] == manifest["total_bytes"]


def test_ingest_refuses_existing_shards_unless_overwrite(tmp_path, ray_local):
    src = write_tree(tmp_path / "raw", raw_image_files())
    dest = tmp_path / "out"
    ingest(str(src), str(dest), IngestConfig(samples_per_shard=100), log=lambda line: None)
    before = (dest / "manifest.json").read_text()
    with pytest.raises(StorageError, match="already holds shards.*--overwrite"):
        ingest(str(src), str(dest), IngestConfig(samples_per_shard=100), log=lambda line: None)
    assert (dest / "manifest.json").read_text() == before  # nothing lost
    manifest = ingest(str(src), str(dest), IngestConfig(samples_per_shard=7), overwrite=True,
                      log=lambda line: None)
    assert sorted(p.name for p in dest.glob("shard-*.tar")) == [s["name"] for s in manifest["shards"]]


def _ingest_cli(*args, env=None):
    import os

    return subprocess.run(
        [sys.executable, "-m", "ssl_train.cli", "ingest", *args],
        capture_output=True, text=True, timeout=300, env={**os.environ, **(env or {})},
    )


def test_ingest_cli_refuses_a_source_without_images(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    result = _ingest_cli(str(tmp_path / "empty"), str(tmp_path / "out"))
    assert result.returncode == 2
    assert "no images under" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_ingest_cli_names_missing_credentials(s3_bucket, s3_server):
    result = _ingest_cli(f"{s3_bucket}/raw", f"{s3_bucket}/out", "--endpoint-url", s3_server,
                         env={"AWS_ACCESS_KEY_ID": "", "AWS_SECRET_ACCESS_KEY": ""})
    assert result.returncode == 2
    assert "no credentials" in result.stderr and "AWS_ACCESS_KEY_ID" in result.stderr


def test_ingest_cli_names_unreachable_storage(tmp_path):
    result = _ingest_cli("s3://some-bucket/raw", str(tmp_path / "out"),
                         "--endpoint-url", "http://127.0.0.1:9", "--storage-attempts", "2",
                         env={"AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s"})
    assert result.returncode == 2
    assert "cannot reach storage" in result.stderr and "127.0.0.1:9" in result.stderr


def test_ingest_cli_rejects_bad_options_with_exit_2(tmp_path):
    result = _ingest_cli(str(tmp_path), str(tmp_path / "out"), "--jpeg-quality", "0",
                         "--reencode", "jpeg")
    assert result.returncode == 2 and "jpeg_quality" in result.stderr
    result = _ingest_cli(str(tmp_path), str(tmp_path / "out"), "--max-side", "256")
    assert result.returncode == 2 and "reencode" in result.stderr


def test_storage_messages_never_contain_secrets():
    options = StorageOptions(endpoint_url="http://127.0.0.1:9", key="AKIDSECRETKEY",
                             secret="verysecretvalue")
    assert "verysecret" not in repr(options) and "AKIDSECRET" not in repr(options)
    assert "verysecret" not in options.describe("s3://b/p")
