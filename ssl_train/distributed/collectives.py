"""Every collective the project calls, each one a no-op without a process group.

For the losses and norms that must see the global batch: autograd functions over
``torch.distributed`` (any backend, gloo included), an all-gather whose backward sums each rank's
gradient contributions and returns this rank's slice, and an all-reduce (sum) whose backward is
again an all-reduce. For the loop and the monitors: averages of logged figures, gathers of rows
and of Python objects, and a broadcast from rank 0.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    """A default process group exists (of any size)."""
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def broadcast_object(value: Any) -> Any:
    """Rank 0's ``value`` on every rank."""
    if not is_distributed():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(value: Any) -> list[Any]:
    """Every rank's ``value``, in rank order, on every rank."""
    if world_size() == 1:
        return [value]
    everyone = [None] * world_size()
    dist.all_gather_object(everyone, value)
    return everyone


def gather_rows(x: torch.Tensor) -> torch.Tensor:
    """Every rank's rows of ``x`` concatenated in rank order (no gradient)."""
    if world_size() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


def gather_rows_to_first(x: torch.Tensor) -> torch.Tensor | None:
    """Every rank's rows of ``x`` (equal shapes) concatenated in rank order, on rank 0 only;
    None on the others (no gradient)."""
    if world_size() == 1:
        return x
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(world_size())] if dist.get_rank() == 0 else None
    dist.gather(x, parts, dst=0)
    return torch.cat(parts) if parts is not None else None


def average_over_ranks(record: dict[str, float]) -> dict[str, float]:
    """Metric values averaged over ranks (the global value for means over equal batches)."""
    if world_size() == 1:
        return record
    keys = sorted(record)
    values = torch.tensor([float(record[k]) for k in keys], dtype=torch.float64)
    dist.all_reduce(values)
    values /= world_size()
    return dict(zip(keys, values.tolist()))


class _AllGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return tuple(parts)

    @staticmethod
    def backward(ctx, *grads: torch.Tensor) -> torch.Tensor:
        stacked = torch.stack(grads)
        dist.all_reduce(stacked)  # every rank's loss depends on every rank's part
        return stacked[dist.get_rank()]


class _AllReduceSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        total = x.clone()
        dist.all_reduce(total)
        return total

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        total = grad.clone()
        dist.all_reduce(total)
        return total


def all_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """``x`` of every rank concatenated along dim 0 in rank order; differentiable."""
    if world_size() == 1:
        return x
    return torch.cat(_AllGather.apply(x), dim=0)


def all_reduce_sum_with_grad(x: torch.Tensor) -> torch.Tensor:
    """The sum of ``x`` over ranks; differentiable."""
    if world_size() == 1:
        return x
    return _AllReduceSum.apply(x)
