"""Shared fixtures: real images from scikit-image, small configs, a real S3 endpoint, Ray."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Tests never look for credentials outside this machine: no instance metadata service, no
# user-level AWS files. Each test that needs credentials gets the moto server's.
os.environ["AWS_EC2_METADATA_DISABLED"] = "true"
os.environ["AWS_SHARED_CREDENTIALS_FILE"] = os.devnull
os.environ["AWS_CONFIG_FILE"] = os.devnull
for _name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
              "AWS_ENDPOINT_URL", "AWS_PROFILE"):
    os.environ.pop(_name, None)

from pipelines.sample_images import sample_photographs
from ssl_train.config import load_config


def pytest_addoption(parser):
    parser.addoption("--full", action="store_true",
                     help="also run the long variants of the reliability suite (marked full)")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--full"):
        return
    skip = pytest.mark.skip(reason="a long variant: run with --full (make reliability)")
    for item in items:
        if "full" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def photographs():
    """scikit-image's sample photographs (RGB), at least 64 px on the short side."""
    images = sample_photographs(min_side=64)
    assert len(images) >= 20, "scikit-image's sample photographs are missing"
    return images


@pytest.fixture
def tiny_config():
    return load_config("tiny-cpu")


@pytest.fixture(scope="session")
def sample_shards(tmp_path_factory, ray_local):
    """``seed(output_dir, min_side=32)``: the embedded default's shards (scikit-image's
    photographs, as ``train`` ingests them into OUTPUT_DIR/sample-shards) copied into
    ``output_dir``, ingested once a session for each quality.min_side. Tests of something else
    than the first ingest skip it (it is the same ingest each time)."""
    import shutil

    from pipelines.storage.access import StorageOptions
    from ssl_train.runtime.launcher import SAMPLE_SHARDS, ensure_sample_shards

    made: dict[int, Path] = {}

    def seed(output_dir, min_side: int = 32) -> str:
        if min_side not in made:
            root = tmp_path_factory.mktemp(f"sample-shards-{min_side}")
            config = load_config("tiny-cpu", [f"run.output_dir={root}",
                                              f"data.quality.min_side={min_side}"])
            made[min_side] = Path(ensure_sample_shards(config, StorageOptions(), print))
        dest = Path(output_dir) / SAMPLE_SHARDS
        shutil.copytree(made[min_side], dest)
        return str(dest)

    return seed


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def s3_server():
    """A moto S3 server on 127.0.0.1: a real HTTP endpoint for s3fs. Yields its endpoint URL."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


S3_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing-key", "AWS_SECRET_ACCESS_KEY": "testing-secret",
                  "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    """Credentials and endpoint in the usual AWS environment variables, as a user would set them."""
    for name, value in S3_CREDENTIALS.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server)
    return s3_server


@pytest.fixture
def s3_bucket(s3_env, request):
    """A fresh bucket for one test; returns its s3:// URL."""
    import uuid

    import s3fs

    name = f"test-{uuid.uuid4().hex[:12]}"
    s3fs.S3FileSystem(endpoint_url=s3_env, key="testing-key", secret="testing-secret").mkdir(name)
    return f"s3://{name}"


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def close_process_group() -> None:
    """End a spawned rank's process group. Modules and optimisers left in reference cycles can
    hold gloo work whose tensors, freed at interpreter shutdown, abort the process ("terminate
    called without an active exception", pytorch #179291): collect them while Python is alive."""
    import gc

    import torch.distributed as dist

    gc.collect()
    dist.destroy_process_group()


# A model small enough for multi-worker runs in tests, on the tiny-cpu config.
TINY_OVERRIDES = [
    "model.image_size=32", "model.encoder.depth=2", "model.encoder.embed_dim=96",
    "model.encoder.num_heads=2", "objectives.mae.decoder.depth=1", "objectives.mae.decoder.embed_dim=64",
    "objectives.mae.decoder.num_heads=2", "objectives.simclr.projector.hidden_dim=128", "objectives.simclr.projector.out_dim=64",
    "train.global_batch_size=8", "train.log_every=1", "data.quality.min_side=32",
]

RAY_METRICS_PORT = free_port()


@pytest.fixture(scope="session")
def ray_local():
    """A local Ray instance shared by the tests that need one.

    4 logical CPUs on this 2-core machine: 2 training workers and the data stage's actors.
    Its metrics endpoint is on RAY_METRICS_PORT, refreshed every second. With its dashboard, as
    the command's own cluster and a cluster on Kubernetes have: Ray Train's detached
    ``PlacementGroupCleaner`` asks the dashboard's state API whether its run's controller is
    alive; without it, the cleaner of a run whose driver was killed never learns that it ended
    and asked every second for the rest of the session (a few % of a core each).
    """
    import ray

    # Ray's workers have the environment of their node, as pods have their Secret's variables.
    ray.init(num_cpus=4, _metrics_export_port=RAY_METRICS_PORT,
             _system_config={"metrics_report_interval_ms": 1000}, include_dashboard=True,
             logging_level="WARNING",
             runtime_env={"env_vars": {"AWS_EC2_METADATA_DISABLED": "true", **S3_CREDENTIALS}})
    yield ray
    ray.shutdown()
