"""The two self-supervised losses, usable on their own.

``nt_xent_loss`` is SimCLR's normalised-temperature cross entropy; when ``torch.distributed`` is
initialised it gathers projections from every rank with gradients, so negatives come from the
global batch and callers cannot forget to do so. ``masked_reconstruction_loss`` is MAE's MSE on
masked patches only. Both compute in fp32 whatever their inputs' dtype (bf16 similarities or
squared errors lose the small differences the losses are made of). Neither knows about models,
optimisers or weighting.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ssl_train.collectives import all_gather_with_grad, rank


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


def normalize_patches(patches_bnp: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Per-patch normalised pixels (zero mean, unit variance within each patch), MAE's target."""
    mean = patches_bnp.mean(dim=-1, keepdim=True)
    var = patches_bnp.var(dim=-1, keepdim=True)
    return (patches_bnp - mean) / (var + eps) ** 0.5


def masked_reconstruction_loss(
    pred_bnp: torch.Tensor,
    target_patches_bnp: torch.Tensor,
    mask_bn: torch.Tensor,
    norm_pix: bool = True,
) -> torch.Tensor:
    """Mean squared error over the masked patches only (``mask_bn`` is 1 where a patch was hidden).

    Visible patches are excluded: the encoder saw them, so reconstructing them teaches nothing.
    """
    if pred_bnp.shape != target_patches_bnp.shape:
        raise ValueError(
            f"pred {tuple(pred_bnp.shape)} and target {tuple(target_patches_bnp.shape)} differ"
        )
    target = target_patches_bnp.float()
    target = normalize_patches(target) if norm_pix else target
    per_patch_bn = ((pred_bnp.float() - target) ** 2).mean(dim=-1)
    mask_bn = mask_bn.to(per_patch_bn.dtype)
    return (per_patch_bn * mask_bn).sum() / mask_bn.sum().clamp_min(1.0)
