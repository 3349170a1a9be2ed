"""The two predictive losses: a predictor's output regressed onto a stop-gradient target.

BYOL (Grill et al., 2020) regresses onto an EMA target network's projection with the normalised
squared error, ``2 - 2 cos``; SimSiam (Chen and He, 2021) onto the same network's projection with
the negative cosine, and shows the stop-gradient is what keeps it from collapsing. Both detach the
target here, so a caller cannot forget to. Computed in fp32 whatever the inputs' dtype; per-sample
terms are averaged over this rank's rows (the average over ranks is the global mean).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _check(p: torch.Tensor, z: torch.Tensor) -> None:
    if p.shape != z.shape or p.dim() != 2:
        raise ValueError(f"p and z must both be (N, D), got {tuple(p.shape)}, {tuple(z.shape)}")


def byol_loss(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """BYOL's ``|| p/|p| - z/|z| ||^2 = 2 - 2 cos(p, z)``, ``z`` detached, averaged over rows."""
    _check(p, z)
    cosine = F.cosine_similarity(p.float(), z.detach().float(), dim=1)
    return (2 - 2 * cosine).mean()


def simsiam_loss(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """SimSiam's ``D(p, stopgrad(z)) = -cos(p, z)``, averaged over rows."""
    _check(p, z)
    return -F.cosine_similarity(p.float(), z.detach().float(), dim=1).mean()
