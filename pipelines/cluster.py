"""Joining or starting the Ray cluster that runs the data stage (and training).

``address=None`` joins the cluster named by RAY_ADDRESS if set, or starts a local one on this
machine; ``"auto"`` joins a running cluster (what a KubeRay job's entrypoint does).
"""

from __future__ import annotations

import logging
import os
import socket


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
            local["_metrics_export_port"] = _free_or_another(metrics_port)
        if not address:  # Ray's notice of its default, for a cluster this process owns
            _quiet_token_notice()
            # (Not on a cluster's job: a job submitted with a runtime environment keeps its own.)
            local["runtime_env"] = _quiet_ray_warnings()
        context = ray.init(address=address, logging_level=logging.WARNING,
                           configure_logging=True, **local)
        if not address:
            print(describe_local(context), flush=True)
    return ray


# Ray Train 2.60's DatasetManager builds Ray Data's ExecutionOptions with an option Ray itself
# deprecated: its RayDeprecationWarning reached the console from that actor on every run. Ray's
# own code, nothing a user can change; Ray's other warnings still show.
RAY_OWN_WARNINGS = ("ignore:`ExecutionOptions.exclude_resources` is deprecated"
                    ":DeprecationWarning",)


def _quiet_ray_warnings() -> dict:
    """The job's runtime environment: Ray's processes ignore ``RAY_OWN_WARNINGS`` (and keep
    any PYTHONWARNINGS of this environment)."""
    given = os.environ.get("PYTHONWARNINGS")
    return {"env_vars": {"PYTHONWARNINGS": ",".join([*RAY_OWN_WARNINGS, *([given] if given
                                                                         else [])])}}


def _free_or_another(port: int) -> int:
    """``port`` if nothing listens on it, else a free one, said on the console: a second local
    run beside the first must not die in Ray's start-up on the first's metrics port."""
    with socket.socket() as probe:
        try:
            probe.bind(("", port))
            return port
        except OSError:
            pass
    with socket.socket() as probe:
        probe.bind(("", 0))
        free = probe.getsockname()[1]
    print(f"metrics port {port} is taken (another local run?): this run's metrics are on port "
          f"{free}", flush=True)
    return free


def describe_local(context) -> str:
    """One line on the local cluster this process started: where it is and what it serves."""
    info = context.address_info
    dashboard = f"http://{context.dashboard_url}" if context.dashboard_url else "off"
    token = os.environ.get("RAY_AUTH_MODE", "token").lower() == "token"
    return (f"local Ray cluster at {info['address']} (dashboard {dashboard}, metrics port "
            f"{info.get('metrics_export_port')}, token authentication {'on' if token else 'off'};"
            f" it stops with this command)")


class _DropTokenNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Token authentication is enabled")


def _quiet_token_notice() -> None:
    """Ray enables token authentication for a local cluster and says so on every start, which
    ``describe_local`` already states; its other authentication messages stay."""
    logger = logging.getLogger("ray._private.authentication.authentication_token_setup")
    if not any(isinstance(f, _DropTokenNotice) for f in logger.filters):
        logger.addFilter(_DropTokenNotice())
