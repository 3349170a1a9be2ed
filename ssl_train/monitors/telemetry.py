"""Prometheus metrics of a run, exported the Ray-native way from every worker and actor.

Metrics are ``ray.util.metrics`` instruments, so each node's Ray metrics port (the port KubeRay
names ``metrics``) exposes the ones recorded on that node, and a cluster's Prometheus sees every
node. Ray prefixes application metrics with ``ray_`` on that port; the shipped scrape configs
(``infra/prometheus``, the PodMonitors) strip it, so series are stored as ``ssl_*``. Labels:
``run`` always, ``rank`` and ``node`` on per-worker series, ``component`` and ``reason`` where
they apply. Outside Ray (ingest on one machine, eval), ``serve_prometheus`` exposes the same
names with ``prometheus_client`` (``pipelines.ingest.IngestMetrics``). Object-store usage is Ray's own per-node series
(``ray_object_store_memory``), shown beside ours on the dashboard.
"""

from __future__ import annotations

import resource
import socket
from collections.abc import Mapping

import torch

from pipelines.stream.telemetry import DATA_COUNTERS

RANK_TAGS = ("run", "rank", "node")

# name -> (description, extra tag keys); every gauge a training worker sets.
TRAINING_GAUGES = {
    "ssl_step": ("Optimisation steps completed", ()),
    "ssl_images_per_second": ("Global images per second of the last step", ()),
    "ssl_step_seconds": ("Wall time of the last step, data wait included", ()),
    "ssl_data_wait_seconds": ("Time the last step waited for its batch", ()),
    "ssl_data_wait_share": ("Share of the last step spent waiting for data", ()),
    "ssl_loss": ("Loss of the last step by component (total, contrastive, masked)",
                 ("component",)),
    "ssl_loss_weight": ("Current weight of each loss component", ("component",)),
    "ssl_objective_signal": ("An objective's signal that is not a loss (e.g. DINO's teacher "
                             "entropy and teacher-student KL: collapse when the KL reaches 0)",
                             ("signal",)),
    "ssl_learning_rate": ("Learning rate of the last step", ()),
    "ssl_grad_norm": ("Gradient norm before clipping", ()),
    "ssl_peak_memory_bytes": ("Peak accelerator memory (GPU) or peak resident memory (CPU)",
                              ("device",)),
    "ssl_checkpoint_save_seconds": ("Duration of the last checkpoint save", ()),
    "ssl_checkpoint_bytes": ("Size of the last checkpoint, all ranks", ()),
    "ssl_embedding_std": ("Std of L2-normalised embeddings of the held batch (collapse: 0)", ()),
    "ssl_embedding_std_healthy": ("1/sqrt(dim): the embedding std of a healthy representation",
                                  ()),
    "ssl_effective_rank": ("RankMe effective rank of the held batch's embeddings", ()),
    "ssl_alignment": ("Alignment of the two views' embeddings (lower: closer)", ()),
    "ssl_uniformity": ("Uniformity of the embeddings (lower: more uniform)", ()),
    "ssl_knn_accuracy": ("kNN top-1 accuracy of frozen features on the monitor set", ()),
    "ssl_energy_projected_joules": ("The configured run's energy, projected from its first steps",
                                    ()),
    "ssl_co2e_projected_grams": ("The configured run's operational CO2e, projected", ()),
}
TRAINING_COUNTERS = {
    "ssl_restarts": ("Times the worker group (re)started from a checkpoint", ()),
}


# Counted by each node's energy meter (ssl_train.energy.node).
ENERGY_COUNTERS = {
    "ssl_energy_joules": ("Energy by stage, node, device, component and source",
                          ("stage", "node", "device", "component", "source")),
    "ssl_co2e_grams": ("Operational CO2e (PUE and grid intensity applied) by stage", ("stage",)),
}


def exported_names() -> set[str]:
    """Every series name as stored by Prometheus (counters get ``_total``)."""
    counters = (*TRAINING_COUNTERS, *DATA_COUNTERS, *ENERGY_COUNTERS)
    return set(TRAINING_GAUGES) | {f"{name}_total" for name in counters}


def peak_memory() -> tuple[str, float]:
    """(device, bytes): CUDA peak allocated memory, else this process's peak resident set."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return "cuda", float(torch.cuda.max_memory_allocated())
    return "cpu", float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)


class TrainingTelemetry:
    """The gauges and counters of one training worker."""

    def __init__(self, run: str, rank: int, node: str | None = None):
        from ray.util.metrics import Counter, Gauge

        self.tags = {"run": run, "rank": str(rank), "node": node or socket.gethostname()}
        self.gauges = {name: Gauge(name, description, tag_keys=RANK_TAGS + extra)
                       for name, (description, extra) in TRAINING_GAUGES.items()}
        self.counters = {name: Counter(name, description, tag_keys=RANK_TAGS + extra)
                         for name, (description, extra) in TRAINING_COUNTERS.items()}

    def _set(self, name: str, value: float, **extra: str) -> None:
        self.gauges[name].set(float(value), tags={**self.tags, **extra})

    def record_step(self, step: int, record: Mapping[str, float]) -> None:
        self._set("ssl_step", step)
        for key, name in (("images_per_second", "ssl_images_per_second"),
                          ("step_seconds", "ssl_step_seconds"),
                          ("data_wait_seconds", "ssl_data_wait_seconds"),
                          ("lr", "ssl_learning_rate"), ("grad_norm", "ssl_grad_norm")):
            if key in record:
                self._set(name, record[key])
        if record.get("step_seconds"):
            self._set("ssl_data_wait_share",
                      record.get("data_wait_seconds", 0.0) / record["step_seconds"])
        self._set("ssl_loss", record["loss"], component="total")
        for key, value in record.items():
            if key.startswith("loss_"):
                self._set("ssl_loss", value, component=key.removeprefix("loss_"))
            elif key.startswith("weight_"):
                self._set("ssl_loss_weight", value, component=key.removeprefix("weight_"))
            elif key.startswith("signal_"):
                self._set("ssl_objective_signal", value, signal=key.removeprefix("signal_"))
        device, peak = peak_memory()
        self._set("ssl_peak_memory_bytes", peak, device=device)

    def record_health(self, health: Mapping[str, float]) -> None:
        for key, value in health.items():
            name = f"ssl_{key}"
            if name in self.gauges:
                self._set(name, value)

    def record_checkpoint(self, seconds: float, size_bytes: int) -> None:
        self._set("ssl_checkpoint_save_seconds", seconds)
        self._set("ssl_checkpoint_bytes", size_bytes)

    def record_projection(self, estimate: Mapping[str, float]) -> None:
        self._set("ssl_energy_projected_joules", estimate["projected_joules"])
        self._set("ssl_co2e_projected_grams", estimate["projected_co2e_grams"])

    def record_restart(self) -> None:
        self.counters["ssl_restarts"].inc(1.0, tags=self.tags)
