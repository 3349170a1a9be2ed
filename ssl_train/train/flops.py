"""What one training step costs in floating-point operations, for MFU.

Counted analytically from the config, as MFU is by convention: each objective counts the passes
its step makes (``ObjectiveConfig.flops``, from ``ssl_train.models.flops``): encoder passes on
each view, heads, decoders, EMA teachers. Backward costs twice the forward for what is
back-propagated, nothing for a teacher's forward. Pure arithmetic: no model, no device.
"""

from __future__ import annotations

from ssl_train.config import PretrainConfig
from ssl_train.models.flops import blocks_forward_flops

__all__ = ["blocks_forward_flops", "step_flops"]


def step_flops(config: PretrainConfig, images: int) -> dict[str, float]:
    """Forward FLOPs of each part of a step on ``images`` images (``<objective>_<part>``),
    ``forward`` (their sum) and ``total`` (forward and backward)."""
    out: dict[str, float] = {}
    total = 0.0
    for objective in config.objectives:
        for part, (flops, backward) in objective.flops(config.model).items():
            out[f"{objective.name}_{part}"] = flops * images
            total += flops * images * (3 if backward else 1)
    out["forward"] = sum(out.values())
    out["total"] = total
    return out
