"""Parallelism applied from outside the model: activation checkpointing, then FSDP2.

One function, ``apply_parallelism``, in torchtitan's fixed order: activation checkpointing of
each transformer block (optional), ``fully_shard`` of each block, then of the root module, with
bf16 mixed precision on GPUs (parameters and compute in bf16, gradient reduction in fp32). The
model code never sees any of it. FSDP1 is not an option: it breaks with several forwards a step.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

from ssl_train.model import HybridSSL


def apply_parallelism(
    model: HybridSSL,
    device: torch.device,
    mixed_precision: str = "bf16",
    activation_checkpointing: bool = False,
) -> nn.Module:
    """Shard ``model`` across the default process group (a no-op without one); returns it."""
    model.to(device)
    if activation_checkpointing:
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
            checkpoint_wrapper,
        )

        for container in (model.encoder.blocks, getattr(model.decoder, "blocks", None)):
            if container is None:
                continue
            for index, block in enumerate(container):
                container[index] = checkpoint_wrapper(block)
    if not (dist.is_available() and dist.is_initialized()):
        return model
    policy = MixedPrecisionPolicy()
    if device.type == "cuda" and mixed_precision == "bf16":
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for block in model.transformer_blocks():
        fully_shard(block, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    # Methods called instead of forward (the health monitor, evaluation) need FSDP's hooks too.
    for method in ("embed", "encode"):
        register_fsdp_forward_method(model, method)
    return model
