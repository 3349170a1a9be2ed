"""What one training step of the hybrid costs in floating-point operations, for MFU.

Counted analytically from the config, as MFU is by convention: the matrix products (and the
attention's two batched products) of every pass a step makes, at 2 FLOPs per multiply-add:
the encoder on both contrastive views (every patch and the class token), the encoder on the
visible patches of the masked view, the patch embedding of all three views, the projection head
and the decoder. Backward costs twice the forward, so a step is 3 x the forward. Element-wise work
(norms, activations, softmax, the losses) is left out. Pure arithmetic: no model, no device.
"""

from __future__ import annotations

from ssl_train.config import PretrainConfig
from ssl_train.models.masking import num_visible


def blocks_forward_flops(tokens: int, width: int, depth: int, mlp_ratio: float) -> float:
    """Forward FLOPs of ``depth`` pre-norm ViT blocks on one sequence of ``tokens`` tokens.

    Per block: qkv (6 T D^2), attention scores and values (2 x 2 T^2 D), output projection
    (2 T D^2) and the MLP (4 T D M), with M = mlp_ratio x D.
    """
    hidden = mlp_ratio * width
    per_block = 8 * tokens * width**2 + 4 * tokens * width * hidden + 4 * tokens**2 * width
    return depth * per_block


def step_flops(config: PretrainConfig, images: int) -> dict[str, float]:
    """Forward FLOPs of each part of a step on ``images`` images, and ``total`` (x3, fwd + bwd).

    Counts the two built-in objectives (simclr, mae); others are not counted.
    """
    model, enc = config.model, config.model.encoder
    patches = model.num_patches
    patch_pixels = 3 * enc.patch_size**2
    names = config.objective_names
    parts: dict[str, float] = {}
    views = 0
    if "simclr" in names:
        views += 2
        parts["encoder_contrastive"] = 2 * blocks_forward_flops(
            patches + 1, enc.embed_dim, enc.depth, enc.mlp_ratio)
        proj = config.objective("simclr").projector
        parts["projector"] = 2 * 2 * (enc.embed_dim * proj.hidden_dim
                                      + proj.hidden_dim * proj.out_dim)
    if "mae" in names:
        mae = config.objective("mae")
        dec = mae.decoder
        views += 1
        visible = num_visible(patches, mae.mask_ratio) + 1
        parts["encoder_visible"] = blocks_forward_flops(visible, enc.embed_dim, enc.depth,
                                                        enc.mlp_ratio)
        parts["decoder"] = (2 * visible * enc.embed_dim * dec.embed_dim
                            + blocks_forward_flops(patches + 1, dec.embed_dim, dec.depth,
                                                   dec.mlp_ratio)
                            + 2 * (patches + 1) * dec.embed_dim * patch_pixels)
    parts["patch_embed"] = views * 2 * patches * patch_pixels * enc.embed_dim
    out = {key: value * images for key, value in parts.items()}
    out["forward"] = sum(out.values())
    out["total"] = 3 * out["forward"]
    return out
