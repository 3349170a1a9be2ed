"""Joining or starting the Ray cluster that runs the data stage (and training).

``address=None`` joins the cluster named by RAY_ADDRESS if set, or starts a local one on this
machine; ``"auto"`` joins a running cluster (what a KubeRay job's entrypoint does).
"""

from __future__ import annotations

import logging
import os


def ensure_ray(address: str | None = None, num_cpus: int | None = None):
    """The ``ray`` module, initialised once per process."""
    import ray

    if not ray.is_initialized():
        ray.init(
            address=address or os.environ.get("RAY_ADDRESS"),
            num_cpus=num_cpus if not (address or os.environ.get("RAY_ADDRESS")) else None,
            logging_level=logging.WARNING,
            configure_logging=True,
        )
    return ray
