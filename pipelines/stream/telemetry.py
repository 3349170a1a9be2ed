"""The data stage's Prometheus counters (``ssl_data_*``), exported the Ray-native way.

Each reader and view-worker process records what it counted on its own series; Ray's metrics
agent sums a node's processes into one series per tag set (Ray 2.60 leaves out the worker id),
and nothing is sent to another process for them. See ``ssl_train.monitors.telemetry`` for the
naming and export conventions.
"""

from __future__ import annotations

from collections.abc import Mapping

DATA_COUNTERS = {
    "ssl_data_images_read": ("Images read from shards", ()),
    "ssl_data_bytes_read": ("Bytes of image data read from shards", ()),
    "ssl_data_images_dropped": ("Images dropped by the data stage, by reason", ("reason",)),
    "ssl_data_images_emitted": ("Images emitted as training views", ()),
    "ssl_data_shard_errors": ("Shards that could not be read to their end", ()),
    "ssl_data_shards_read": ("Shards read", ()),
}


class DataTelemetry:
    """The data stage's counters, fed with the deltas every reader and view worker reports."""

    def __init__(self, run: str):
        from ray.util.metrics import Counter

        self.tags = {"run": run}
        self.counters = {name: Counter(name, description, tag_keys=("run", *extra))
                         for name, (description, extra) in DATA_COUNTERS.items()}

    def record(self, delta: Mapping[str, int]) -> None:
        for key, value in delta.items():
            if not value:
                continue
            if key.startswith("dropped_"):
                self.counters["ssl_data_images_dropped"].inc(
                    float(value), tags={**self.tags, "reason": key.removeprefix("dropped_")})
            elif f"ssl_data_{key}" in self.counters:
                self.counters[f"ssl_data_{key}"].inc(float(value), tags=self.tags)
