"""The contrastive branch's projection head and the batch norm it needs across workers.

SimCLR normalises the projection head over the global batch: with per-worker statistics, each
worker's batch could be told apart by its statistics alone, and a 2-worker run would not compute
the same loss as a 1-worker run on the same images. ``torch.nn.SyncBatchNorm`` does this on GPUs
only; ``GlobalBatchNorm1d`` does it on any ``torch.distributed`` backend (gloo included).
"""

from __future__ import annotations

from typing import Annotated

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from pipelines.settings import StrictSection
from ssl_train.distributed.collectives import all_gather_with_grad, world_size


class ProjectorConfig(StrictSection):
    """The contrastive branch's MLP head: Linear-BN-ReLU-Linear."""

    hidden_dim: Annotated[int, Field(gt=0)] = 2048
    out_dim: Annotated[int, Field(gt=0)] = 128


def _float(param: torch.Tensor | None) -> torch.Tensor | None:
    return None if param is None else param.float()


class GlobalBatchNorm1d(nn.BatchNorm1d):
    """BatchNorm1d whose training statistics are those of the batch across all ranks.

    Statistics, running statistics and the normalisation are fp32 whatever the input's dtype
    (under bf16 parameters, E[x^2] - E[x]^2 in bf16 loses much of the variance); the output is
    cast back to the input's dtype.
    """

    def forward(self, x_nd: torch.Tensor) -> torch.Tensor:
        x = x_nd.float()
        if not (self.training and world_size() > 1):
            out = F.batch_norm(x, self.running_mean, self.running_var, _float(self.weight),
                               _float(self.bias), self.training or not self.track_running_stats,
                               self._update_factor(), self.eps)
            return out.to(x_nd.dtype)
        # Each rank's count, mean and sum of squared deviations, combined exactly (Chan et al.):
        # no cancellation from subtracting two large sums.
        mean_d = x.mean(0)
        local = torch.cat([x.new_tensor([x.shape[0]]), mean_d, ((x - mean_d) ** 2).sum(0)])
        every_wk = all_gather_with_grad(local.unsqueeze(0))
        dim = x.shape[1]
        counts_w1, means_wd, m2_wd = every_wk[:, :1], every_wk[:, 1:1 + dim], every_wk[:, 1 + dim:]
        total = counts_w1.sum()
        mean_d = (counts_w1 * means_wd).sum(0) / total
        var_d = (m2_wd.sum(0) + (counts_w1 * (means_wd - mean_d) ** 2).sum(0)) / total
        if self.track_running_stats and self.running_mean is not None:
            factor = self._update_factor()
            with torch.no_grad():
                unbiased_d = var_d * total / (total - 1).clamp_min(1.0)
                self.running_mean.lerp_(mean_d.detach(), factor)
                self.running_var.lerp_(unbiased_d.detach(), factor)
        out = (x - mean_d) / torch.sqrt(var_d + self.eps)
        if self.affine:
            out = out * self.weight.float() + self.bias.float()
        return out.to(x_nd.dtype)

    def _update_factor(self) -> float:
        """The running statistics' update weight for this batch (counts it when training)."""
        if not (self.training and self.track_running_stats):
            return 0.0 if self.momentum is None else self.momentum
        self.num_batches_tracked.add_(1)
        return 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum


class ProjectionHead(nn.Module):
    """SimCLR's MLP projection: Linear - BN - ReLU - Linear."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(in_dim, hidden_dim, bias=False),
            GlobalBatchNorm1d(hidden_dim),
            nn.ReLU(),  # not in place: an in-place op on a hooked module's output is refused
            nn.Linear(hidden_dim, out_dim),
        )

    def forward(self, features_nd: torch.Tensor) -> torch.Tensor:
        return self.layers(features_nd)
