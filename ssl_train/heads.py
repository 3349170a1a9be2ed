"""The contrastive branch's projection head and the batch norm it needs across workers.

SimCLR normalises the projection head over the global batch: with per-worker statistics, each
worker's batch could be told apart by its statistics alone, and a 2-worker run would not compute
the same loss as a 1-worker run on the same images. ``torch.nn.SyncBatchNorm`` does this on GPUs
only; ``GlobalBatchNorm1d`` does it on any ``torch.distributed`` backend (gloo included).
"""

from __future__ import annotations

import torch
from torch import nn

from ssl_train.collectives import all_reduce_sum_with_grad, world_size


class GlobalBatchNorm1d(nn.BatchNorm1d):
    """BatchNorm1d whose training statistics are those of the batch across all ranks."""

    def forward(self, x_nd: torch.Tensor) -> torch.Tensor:
        if not (self.training and world_size() > 1):
            return super().forward(x_nd)
        count = torch.tensor([float(x_nd.shape[0])], device=x_nd.device, dtype=x_nd.dtype)
        stats = torch.cat([count, x_nd.sum(0), (x_nd * x_nd).sum(0)])
        stats = all_reduce_sum_with_grad(stats)
        total = stats[0]
        mean_d = stats[1 : 1 + x_nd.shape[1]] / total
        var_d = (stats[1 + x_nd.shape[1] :] / total - mean_d * mean_d).clamp_min(0.0)
        if self.track_running_stats and self.running_mean is not None:
            with torch.no_grad():
                unbiased_d = var_d * total / (total - 1).clamp_min(1.0)
                self.running_mean.lerp_(mean_d.detach(), self.momentum)
                self.running_var.lerp_(unbiased_d.detach(), self.momentum)
                self.num_batches_tracked += 1
        x_nd = (x_nd - mean_d) / torch.sqrt(var_d + self.eps)
        if self.affine:
            x_nd = x_nd * self.weight + self.bias
        return x_nd


class ProjectionHead(nn.Module):
    """SimCLR's MLP projection: Linear - BN - ReLU - Linear."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(in_dim, hidden_dim, bias=False),
            GlobalBatchNorm1d(hidden_dim),
            nn.ReLU(inplace=True),
            nn.Linear(hidden_dim, out_dim),
        )

    def forward(self, features_nd: torch.Tensor) -> torch.Tensor:
        return self.layers(features_nd)
