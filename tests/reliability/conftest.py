"""Fixtures of the reliability suite: S3 behind the fault proxy, tiny runs, and the figures.

Tests put what they measured (faults injected, restarts, samples replayed) in ``figures``; the
session prints them at the end, which is where docs/reliability.md takes its numbers from.
"""

from __future__ import annotations

import json

import pytest
import s3fs

from tests.conftest import S3_CREDENTIALS, TINY_OVERRIDES
from tests.reliability.faultproxy import FaultProxy

_FIGURES: list[tuple[str, dict]] = []


@pytest.fixture
def figures(request):
    """``figures(**values)`` records this test's measured numbers for the session summary."""
    def record(**values):
        _FIGURES.append((request.node.name, values))
    return record


def pytest_terminal_summary(terminalreporter):
    if _FIGURES:
        terminalreporter.section("reliability figures")
        for name, values in _FIGURES:
            terminalreporter.write_line(f"{name}: {json.dumps(values, sort_keys=True)}")


@pytest.fixture
def faulty_s3(s3_server, monkeypatch):
    """S3 reached through a fault proxy: (proxy, bucket URL, a direct filesystem).

    The AWS variables point at the proxy, as a user's would point at their store; the direct
    filesystem talks to the server itself, for setting up and inspecting without faults.
    """
    import uuid

    with FaultProxy(s3_server) as proxy:
        for name, value in S3_CREDENTIALS.items():
            monkeypatch.setenv(name, value)
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        direct = s3fs.S3FileSystem(endpoint_url=s3_server, key=S3_CREDENTIALS["AWS_ACCESS_KEY_ID"],
                                   secret=S3_CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
                                   skip_instance_cache=True)
        bucket = f"faults-{uuid.uuid4().hex[:12]}"
        direct.mkdir(bucket)
        yield proxy, f"s3://{bucket}", direct


def tiny_overrides(*extra: str) -> list[str]:
    """The tests' small model on the tiny-cpu config, plus ``extra``."""
    return [*TINY_OVERRIDES, "train.log_every=100", *extra]
