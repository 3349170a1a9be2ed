"""SimCLR's normalised-temperature cross entropy (NT-Xent) over the global batch.

When ``torch.distributed`` is initialised it gathers projections from every rank with gradients,
so negatives come from the global batch and callers cannot forget to do so. Computed in fp32
whatever the inputs' dtype (bf16 similarities lose the small differences the loss is made of).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ssl_train.distributed.collectives import all_gather_with_grad, rank


def nt_xent_loss(z_a: torch.Tensor, z_b: torch.Tensor, temperature: float) -> torch.Tensor:
    """NT-Xent over the 2N samples of two views, averaged over all 2N anchors of the global batch.

    ``z_a[i]`` and ``z_b[i]`` are projections of two views of image i. Each anchor's positive is the
    other view of its image; the other 2N - 2 samples are its negatives. Under torch.distributed
    each rank returns the mean over its own anchors; the average over ranks (what gradient
    averaging computes) is the global mean.
    """
    if z_a.shape != z_b.shape or z_a.dim() != 2:
        raise ValueError(f"z_a and z_b must both be (N, D), got {tuple(z_a.shape)}, {tuple(z_b.shape)}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    n = z_a.shape[0]
    local_nd = F.normalize(torch.cat([z_a, z_b], dim=0).float(), dim=1)  # (2n, D): a then b
    # One gather of both views: rank r's rows are its n views a, then its n views b.
    every_w2nd = all_gather_with_grad(local_nd).reshape(-1, 2, n, local_nd.shape[1])
    global_n = every_w2nd.shape[0] * n
    candidates_md = every_w2nd.transpose(0, 1).reshape(2 * global_n, -1)  # all a, then all b

    logits = local_nd @ candidates_md.T / temperature  # (2n, 2N)
    first = rank() * n  # where this rank's images sit in the global batch
    local_idx = torch.arange(n, device=z_a.device) + first
    self_idx = torch.cat([local_idx, local_idx + global_n])
    positive_idx = torch.cat([local_idx + global_n, local_idx])
    is_self = F.one_hot(self_idx, 2 * global_n).bool()
    logits = logits.masked_fill(is_self, float("-inf"))  # an anchor is never its own negative
    return F.cross_entropy(logits, positive_idx)
