"""Joining or starting the Ray cluster that runs the data stage (and training).

``address=None`` joins the cluster named by RAY_ADDRESS if set, or starts a local one on this
machine; ``"auto"`` joins a running cluster (what a KubeRay job's entrypoint does).
"""

from __future__ import annotations

import logging
import os


def ensure_ray(address: str | None = None, num_cpus: int | None = None,
               metrics_port: int | None = None):
    """The ``ray`` module, initialised once per process.

    ``num_cpus`` and ``metrics_port`` (Ray's Prometheus port on this node) apply only when a
    local instance is started; a cluster's nodes were configured when they started.
    """
    import ray

    if not ray.is_initialized():
        address = address or os.environ.get("RAY_ADDRESS") or None
        local = {"num_cpus": num_cpus} if not address else {}
        if not address and metrics_port:
            local["_metrics_export_port"] = metrics_port
        ray.init(address=address, logging_level=logging.WARNING, configure_logging=True,
                 **local)
    return ray
