"""Forward FLOPs of the model's parts, at 2 FLOPs per multiply-add (pure arithmetic: no model).

The matrix products (and the attention's two batched products) only; element-wise work (norms,
activations, softmax, the losses) is left out. The objectives add their parts up from these
(``ObjectiveConfig.flops``), ``ssl_train.train.flops`` sums the objectives'.
"""

from __future__ import annotations

from typing import NamedTuple


class Part(NamedTuple):
    """Forward FLOPs per image of one part of a step, and whether it is back-propagated (an EMA
    teacher's forward is not)."""

    flops: float
    backward: bool = True


def blocks_forward_flops(tokens: int, width: int, depth: int, mlp_ratio: float) -> float:
    """Forward FLOPs of ``depth`` pre-norm ViT blocks on one sequence of ``tokens`` tokens.

    Per block: qkv (6 T D^2), attention scores and values (2 x 2 T^2 D), output projection
    (2 T D^2) and the MLP (4 T D M), with M = mlp_ratio x D.
    """
    hidden = mlp_ratio * width
    per_block = 8 * tokens * width**2 + 4 * tokens * width * hidden + 4 * tokens**2 * width
    return depth * per_block


def encoder_flops(model, size: int | None = None) -> float:
    """One encoder pass on a whole image of side ``size`` (the model's image size by default):
    the patch embedding and the blocks on every patch and the class token."""
    enc = model.encoder
    patches = ((size or model.image_size) // enc.patch_size) ** 2
    embed = 2 * patches * 3 * enc.patch_size**2 * enc.embed_dim
    return embed + blocks_forward_flops(patches + 1, enc.embed_dim, enc.depth, enc.mlp_ratio)


def mlp_flops(in_dim: int, head, out_dim: int | None = None) -> float:
    """One pass of an MLP config's layers (``hidden_dim``, ``num_layers``), to ``out_dim`` (the
    config's own by default; DINO's head stops at its bottleneck)."""
    dims = [in_dim] + [head.hidden_dim] * (head.num_layers - 1) + [out_dim or head.out_dim]
    return sum(2 * a * b for a, b in zip(dims, dims[1:]))
