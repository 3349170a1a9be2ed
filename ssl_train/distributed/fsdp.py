"""Parallelism applied from outside the model: activation checkpointing, compile, then FSDP2.

One function, ``apply_parallelism``, in torchtitan's fixed order: activation checkpointing of
each transformer block (optional), ``torch.compile`` of each block (optional), ``fully_shard``
of each block, then of the root module. The model code never sees any of it. FSDP1 is not an
option: it breaks with several forwards a step.

Precision. ``parallel.mixed_precision: bf16`` is FSDP2's policy: parameters all-gathered and
computed in bf16, gradients reduced in fp32, on any device (``auto``, the default, means bf16 on
GPUs and fp32 on CPUs, so CI can run the GPU policy by asking for it). What must stay fp32 does:
the root does not cast its inputs (the masked branch's pixel targets are the fp32 images; the
patch embedding, grouped with the first block, casts what the encoder sees), the loss weighting
is its own fp32 group, and the losses and batch-norm statistics upcast inside themselves.

Communication. The encoder runs several times a step (two contrastive views, the visible
patches), so by default every group keeps its parameters unsharded from its first forward to the
end of backward: one all-gather and one reduce-scatter per group a step, whatever the number of
encoder passes. ``reshard_after_forward`` trades that for memory (ZeRO-3: blocks are gathered
again for every pass and for backward).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.distributed.fsdp import (
    FSDPModule,
    MixedPrecisionPolicy,
    fully_shard,
    register_fsdp_forward_method,
)

from ssl_train.distributed.collectives import is_distributed
from ssl_train.models.ssl_model import SSLModel

_SHORT = {torch.bfloat16: "bf16", torch.float32: "fp32"}


@dataclass(frozen=True)
class Precision:
    """The dtypes a run computes in: parameters and compute, gradient reduction, losses."""

    param_dtype: torch.dtype = torch.float32
    reduce_dtype: torch.dtype = torch.float32
    loss_dtype: torch.dtype = torch.float32

    def as_record(self) -> dict[str, str]:
        """For metrics.jsonl: {"param_dtype": "bfloat16", ...}."""
        return {key: str(getattr(self, key)).removeprefix("torch.")
                for key in ("param_dtype", "reduce_dtype", "loss_dtype")}

    def describe(self) -> str:
        """One phrase for the terminal."""
        return (f"{_SHORT[self.param_dtype]} parameters and compute, "
                f"{_SHORT[self.reduce_dtype]} gradient reduction, "
                f"{_SHORT[self.loss_dtype]} losses")


def resolve_precision(device: torch.device, mixed_precision: str, sharded: bool = True) -> Precision:
    """What ``parallel.mixed_precision`` means on ``device`` (fp32 when nothing is sharded)."""
    wants_bf16 = mixed_precision == "bf16" or (mixed_precision == "auto" and device.type == "cuda")
    if wants_bf16 and sharded:
        return Precision(param_dtype=torch.bfloat16)
    return Precision()


def apply_parallelism(
    model: SSLModel,
    device: torch.device,
    mixed_precision: str = "auto",
    activation_checkpointing: bool = False,
    reshard_after_forward: bool = False,
    compile_blocks: bool = False,
) -> nn.Module:
    """Shard ``model`` across the default process group (a no-op without one); returns it."""
    model.to(device)
    containers = model.block_containers()
    if activation_checkpointing:
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
            checkpoint_wrapper,
        )

        for container in containers:
            for index, block in enumerate(container):
                container[index] = checkpoint_wrapper(block)
    if compile_blocks:
        for block in model.transformer_blocks():
            block.compile()  # in place: parameter names (and checkpoints) stay the same
    if not is_distributed():
        return model
    precision = resolve_precision(device, mixed_precision)
    policy = MixedPrecisionPolicy(param_dtype=precision.param_dtype,
                                  reduce_dtype=precision.reduce_dtype)
    # Each encoder's patch embedding (the shared one's and the EMA teachers') travels with its
    # first block: one group fewer, and it casts the images that encoder sees while the root
    # leaves them (and the pixel targets) fp32.
    patch_embeds = {id(encoder.blocks): encoder.patch_embed for encoder in model.encoders()}
    for container in containers:
        for index, block in enumerate(container):
            embed = patch_embeds.get(id(container)) if index == 0 else None
            group = [embed, block] if embed is not None else block
            fully_shard(group, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    if any(True for _ in model.weighting.parameters()):
        fully_shard(model.weighting, reshard_after_forward=False,
                    mp_policy=MixedPrecisionPolicy(param_dtype=torch.float32,
                                                   reduce_dtype=torch.float32))
    fully_shard(model, mp_policy=MixedPrecisionPolicy(
        param_dtype=precision.param_dtype, reduce_dtype=precision.reduce_dtype,
        cast_forward_inputs=False))
    # Methods called instead of forward (the health monitor, evaluation) need FSDP's hooks too.
    # Neither calls the other, nor does forward call them: nested hooks would re-gather the
    # root's parameters and reset FSDP's view of the step.
    for method in ("embed", "encode", "reconstruct"):
        register_fsdp_forward_method(model, method)
    return model


def reshard(model: nn.Module) -> None:
    """Free every group's gathered parameters (after a backward that kept them, before the
    optimizer changes the shards they were gathered from)."""
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()
