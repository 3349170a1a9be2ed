"""MoCo v3's contrastive loss (Chen, Xie and He, 2021): InfoNCE of queries against the keys of
the global batch, scaled by 2 * temperature.

Keys come from the momentum encoder and carry no gradient; under ``torch.distributed`` they are
gathered from every rank (as ``concat_all_gather`` does in MoCo v3's code), and each rank's
positives are offset by its place in the global batch. Computed in fp32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ssl_train.distributed.collectives import gather_rows, rank


def moco_v3_loss(q: torch.Tensor, k: torch.Tensor, temperature: float) -> torch.Tensor:
    """``CE(q k_all^T / T, positives) * 2T`` for this rank's queries; one direction.

    ``q[i]`` and ``k[i]`` are the query and key of two views of image i (MoCo v3 symmetrises by
    adding the loss with the views swapped). Every other image's key in the global batch is a
    negative. The ``2T`` factor makes the gradient's scale independent of the temperature.
    """
    if q.shape != k.shape or q.dim() != 2:
        raise ValueError(f"q and k must both be (N, D), got {tuple(q.shape)}, {tuple(k.shape)}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    q = F.normalize(q.float(), dim=1)
    keys = gather_rows(F.normalize(k.detach().float(), dim=1))
    logits = q @ keys.T / temperature
    positives = torch.arange(q.shape[0], device=q.device) + rank() * q.shape[0]
    return F.cross_entropy(logits, positives) * (2 * temperature)
