"""MAE's reconstruction loss: MSE on the masked patches only, per-patch normalised targets.

Computed in fp32 whatever the inputs' dtype (bf16 squared errors lose the small differences the
loss is made of).
"""

from __future__ import annotations

import torch


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
