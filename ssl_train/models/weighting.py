"""How the objectives' losses are combined: learned (homoscedastic uncertainty) or fixed weights.

Learned weighting follows Kendall, Gal and Cipolla (2018): each loss L_i gets a learned log
variance s_i and the total is sum_i exp(-s_i) * L_i + s_i. The + s_i term keeps the weights from
collapsing to zero; the effective weight exp(-s_i) falls for the noisier loss. At the optimum of
s_i, d/ds_i = 1 - exp(-s_i) * L_i = 0, so each weight tends to 1 / L_i: the weights are set by
the floor each loss converges to. The sum is computed in fp32 whatever the losses' dtype.
"""

from __future__ import annotations

import torch
from torch import nn


class LossWeighting(nn.Module):
    """Combine named loss components into one scalar and report the weights used.

    ``learned`` with one component is plain 1 x L; ``fixed`` uses ``fixed`` (one weight per
    name; a lone component gets 1).
    """

    def __init__(self, names: tuple[str, ...], learned: bool, fixed: tuple[float, ...] = ()):
        super().__init__()
        self.names = tuple(names)
        self.learned = learned and len(self.names) > 1
        if self.learned:
            self.log_vars = nn.Parameter(torch.zeros(len(self.names)))
        else:
            weights = list(fixed) if len(self.names) > 1 else [1.0]
            self.register_buffer("fixed_weights", torch.tensor(weights), persistent=False)

    def weights(self) -> torch.Tensor:
        """The current multiplier of each loss, in ``self.names`` order."""
        return torch.exp(-self.log_vars) if self.learned else self.fixed_weights

    def forward(
        self, losses: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        stacked = torch.stack([losses[name].float() for name in self.names])
        if self.learned:
            log_vars = self.log_vars.float()
            total = (torch.exp(-log_vars) * stacked + log_vars).sum()
        else:
            total = (self.fixed_weights.float() * stacked).sum()
        weights = self.weights().detach()
        return total, dict(zip(self.names, weights))
