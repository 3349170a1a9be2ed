"""Patch-level masking for the masked branch: patchify, random masking by argsort of noise.

Owns the bookkeeping that lets the encoder see visible tokens only (``ids_keep``) and the decoder
put every token back in place (``ids_restore``). No Python loops over patches, no model code.
"""

from __future__ import annotations

import torch


def patchify(images_bchw: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Split images into flattened patches, (B, N, patch_size**2 * C), row-major over the grid."""
    b, c, h, w = images_bchw.shape
    gh, gw = h // patch_size, w // patch_size
    x = images_bchw.reshape(b, c, gh, patch_size, gw, patch_size)
    x = torch.einsum("bchpwq->bhwpqc", x)
    return x.reshape(b, gh * gw, patch_size * patch_size * c)


def unpatchify(patches_bnp: torch.Tensor, patch_size: int, channels: int = 3) -> torch.Tensor:
    """Inverse of :func:`patchify` for a square grid."""
    b, n, _ = patches_bnp.shape
    side = int(round(n**0.5))
    x = patches_bnp.reshape(b, side, side, patch_size, patch_size, channels)
    x = torch.einsum("bhwpqc->bchpwq", x)
    return x.reshape(b, channels, side * patch_size, side * patch_size)


def num_visible(num_patches: int, mask_ratio: float) -> int:
    """How many patches per image the encoder sees: round((1 - r) * N), at least one."""
    return max(1, round((1.0 - mask_ratio) * num_patches))


def random_masking(
    tokens_bnd: torch.Tensor, mask_ratio: float, ids_shuffle_bn: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keep a random subset of tokens per image: the first ones of ``ids_shuffle_bn``.

    ``ids_shuffle_bn`` (B, N) is each image's patch indices in random order (the argsort of
    uniform noise, as MAE draws it); the first round((1 - mask_ratio) * N) are kept. Returns
    ``(visible_bkd, mask_bn, ids_restore_bn)``: the kept tokens, a mask with 1 for masked
    (dropped) positions in the original order, and the permutation that undoes the shuffle.
    Passing the order (rather than drawing it here) lets N workers reproduce the masks of one
    worker holding the whole batch; passing integers rather than noise keeps a bf16 cast of the
    model's inputs from rounding the noise into ties.
    """
    b, n, d = tokens_bnd.shape
    keep = num_visible(n, mask_ratio)
    if ids_shuffle_bn is None:
        ids_shuffle_bn = mask_order(torch.rand(b, n, device=tokens_bnd.device))
    if ids_shuffle_bn.is_floating_point():
        raise TypeError("ids_shuffle_bn must be integer patch indices (masking.mask_order(noise)), "
                        f"got {ids_shuffle_bn.dtype}")
    ids_shuffle_bn = ids_shuffle_bn.to(tokens_bnd.device)
    ids_restore_bn = torch.argsort(ids_shuffle_bn, dim=1)
    ids_keep_bk = ids_shuffle_bn[:, :keep]
    visible_bkd = torch.gather(tokens_bnd, 1, ids_keep_bk.unsqueeze(-1).expand(-1, -1, d))
    mask_bn = torch.ones(b, n, device=tokens_bnd.device, dtype=tokens_bnd.dtype)
    mask_bn[:, :keep] = 0
    mask_bn = torch.gather(mask_bn, 1, ids_restore_bn)
    return visible_bkd, mask_bn, ids_restore_bn


def mask_order(noise_bn: torch.Tensor) -> torch.Tensor:
    """Patch indices by ascending noise, (B, N) int64: the order ``random_masking`` keeps them in."""
    return torch.argsort(noise_bn.float(), dim=1)
