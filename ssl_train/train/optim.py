"""AdamW with decoupled weight decay, and a cosine learning-rate schedule with linear warmup.

The learning rate is scaled linearly by the global batch size (``PretrainConfig.learning_rate``).
Biases, norms, tokens, positional embeddings and the learned loss log-variances get no weight
decay: shrinking them towards zero regularises nothing and, for the log-variances, would bias the
loss weighting.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ssl_train.config import PretrainConfig

_NO_DECAY_NAMES = ("pos_embed", "cls_token", "mask_token", "log_vars")


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Trainable parameters split into a decayed group (matrices) and an undecayed one."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if param.ndim < 2 or any(key in name for key in _NO_DECAY_NAMES):
            no_decay.append(param)
        else:
            decay.append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(model: nn.Module, config: PretrainConfig) -> torch.optim.AdamW:
    """AdamW at the batch-scaled learning rate."""
    return torch.optim.AdamW(
        parameter_groups(model, config.optim.weight_decay),
        lr=config.learning_rate,
        betas=(config.optim.beta1, config.optim.beta2),
    )


def cosine_with_warmup(step: int, total_steps: int, warmup_steps: int, min_ratio: float) -> float:
    """Multiplier of the peak learning rate at ``step`` (0-based)."""
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(
    optimizer: torch.optim.Optimizer, config: PretrainConfig
) -> torch.optim.lr_scheduler.LambdaLR:
    """Warmup then cosine decay to ``min_lr_ratio`` of the peak over ``train.steps``."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: cosine_with_warmup(
            step, config.train.steps, config.optim.warmup_steps, config.optim.min_lr_ratio
        ),
    )
