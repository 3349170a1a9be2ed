"""The objectives' heads (MLP projectors and predictors, DINO's head) and the batch norm they
need across workers.

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
    """An MLP head: ``num_layers`` linear layers, batch norm and ReLU between them (SimCLR's
    Linear-BN-ReLU-Linear with the defaults); ``last_bn`` adds a batch norm without affine
    parameters after the last layer (MoCo v3's and SimSiam's projectors)."""

    hidden_dim: Annotated[int, Field(gt=0)] = Field(
        2048,
        description="Width of the MLP's hidden layers.")
    out_dim: Annotated[int, Field(gt=0)] = Field(
        128,
        description="Width of the MLP's output.")
    num_layers: Annotated[int, Field(ge=1)] = Field(
        2,
        description="Linear layers of the MLP, with batch norm and ReLU between them.")
    last_bn: bool = Field(
        False,
        description=("A batch norm without affine parameters after the last layer (MoCo v3's and "
        "SimSiam's projectors)."))


class DINOHeadConfig(StrictSection):
    """DINO's head: an MLP (GELU) to a bottleneck, L2-normalised, then a weight-normalised linear
    layer to ``out_dim`` prototypes."""

    hidden_dim: Annotated[int, Field(gt=0)] = Field(
        2048,
        description="Width of the head's hidden layers.")
    bottleneck_dim: Annotated[int, Field(gt=0)] = Field(
        256,
        description="Width of the L2-normalised bottleneck before the prototypes.")
    out_dim: Annotated[int, Field(gt=0)] = Field(
        65536,
        description="Prototypes: the width of the distributions the student and teacher compare.")
    num_layers: Annotated[int, Field(ge=1)] = Field(
        3,
        description="Linear layers of the MLP before the bottleneck.")


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
    """An MLP projector or predictor with global batch norm: (Linear - BN - ReLU) x
    (num_layers - 1), then Linear (with a bias unless followed by ``last_bn``), then optionally an
    affine-free BN. Linears followed by a batch norm have no bias (it would be cancelled)."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, num_layers: int = 2,
                 last_bn: bool = False):
        super().__init__()
        layers: list[nn.Module] = []
        for index in range(num_layers - 1):
            layers += [nn.Linear(in_dim if index == 0 else hidden_dim, hidden_dim, bias=False),
                       GlobalBatchNorm1d(hidden_dim),
                       nn.ReLU()]  # not in place: in-place ops on a hooked output are refused
        layers.append(nn.Linear(hidden_dim if num_layers > 1 else in_dim, out_dim,
                                bias=not last_bn))
        if last_bn:
            layers.append(GlobalBatchNorm1d(out_dim, affine=False))
        self.layers = nn.Sequential(*layers)

    @classmethod
    def from_config(cls, in_dim: int, config: ProjectorConfig) -> "ProjectionHead":
        return cls(in_dim, config.hidden_dim, config.out_dim, config.num_layers, config.last_bn)

    def forward(self, features_nd: torch.Tensor) -> torch.Tensor:
        return self.layers(features_nd)


class DINOHead(nn.Module):
    """DINO's projection head: MLP with GELU to a bottleneck, L2 normalisation, and a last layer
    whose weight rows are normalised to unit length (weight normalisation with the gain fixed at
    1, DINO's ``norm_last_layer``), computed in fp32 so prototypes stay unit-length under bf16."""

    def __init__(self, in_dim: int, config: DINOHeadConfig):
        super().__init__()
        layers: list[nn.Module] = []
        dim = in_dim
        for _ in range(config.num_layers - 1):
            layers += [nn.Linear(dim, config.hidden_dim), nn.GELU()]
            dim = config.hidden_dim
        layers.append(nn.Linear(dim, config.bottleneck_dim))
        self.mlp = nn.Sequential(*layers)
        for module in self.mlp:
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)
        self.prototypes = nn.Parameter(torch.empty(config.out_dim, config.bottleneck_dim))
        nn.init.trunc_normal_(self.prototypes, std=0.02)

    def bottleneck(self, features_nd: torch.Tensor) -> torch.Tensor:
        """The L2-normalised bottleneck features, (N, bottleneck_dim)."""
        return F.normalize(self.mlp(features_nd).float(), dim=-1)

    def logits(self, bottleneck_nd: torch.Tensor) -> torch.Tensor:
        """Logits over the prototypes of bottleneck features, (N, out_dim), fp32."""
        return F.linear(bottleneck_nd, F.normalize(self.prototypes.float(), dim=1))

    def forward(self, features_nd: torch.Tensor) -> torch.Tensor:
        return self.logits(self.bottleneck(features_nd))
