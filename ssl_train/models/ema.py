"""EMA teachers: frozen copies of student modules, moved towards the student after each step.

A teacher is a deep copy of the student modules (the same initial weights, requires_grad off),
kept inside the objective that owns it, so that it is sharded like the student, saved in the
checkpoint and restored with it. ``ema_update_`` moves each teacher tensor towards its student
tensor, ``t <- m t + (1 - m) s``, in place. Under FSDP2 both sides are DTensors sharded the same
way (same shapes, same mesh, ``Shard(0)``), so the update zips the local shards with no
communication; ``check_aligned`` refuses pairs that are not.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn


def frozen_copy(module: nn.Module) -> nn.Module:
    """A copy of ``module`` that takes no gradient (its parameters are only ever EMA-updated)."""
    teacher = copy.deepcopy(module)
    for param in teacher.parameters():
        param.requires_grad_(False)
    return teacher


def cosine_momentum(step: int, total_steps: int, base: float) -> float:
    """BYOL's and DINO's schedule: ``1 - (1 - base) (cos(pi step / total) + 1) / 2``, from
    ``base`` at step 0 to 1 at ``total_steps`` (0-based step of the update)."""
    progress = min(max(step, 0), total_steps) / max(total_steps, 1)
    return 1 - (1 - base) * (math.cos(math.pi * progress) + 1) / 2


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor._local_tensor if hasattr(tensor, "_local_tensor") else tensor


def check_aligned(teacher: nn.Module, student: nn.Module) -> None:
    """Every teacher tensor has a student tensor of the same name, shape and sharding."""
    t_params = dict(teacher.named_parameters())
    s_params = dict(student.named_parameters())
    if t_params.keys() != s_params.keys():
        raise ValueError("teacher and student have different parameters: "
                         f"{sorted(t_params.keys() ^ s_params.keys())[:4]}")
    for name, t in t_params.items():
        s = s_params[name]
        if (t.shape != s.shape or _local(t).shape != _local(s).shape
                or getattr(t, "placements", None) != getattr(s, "placements", None)):
            raise ValueError(f"teacher and student {name} are not sharded alike: "
                             f"{tuple(_local(t).shape)} against {tuple(_local(s).shape)}")


@torch.no_grad()
def ema_update_(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """``teacher <- momentum * teacher + (1 - momentum) * student``, parameter by parameter, in
    place on the local shards (buffers, such as batch-norm statistics, are the teacher's own)."""
    t_params = [_local(p) for p in teacher.parameters()]
    s_params = [_local(p).to(t.dtype) for p, t in zip(student.parameters(), t_params)]
    if t_params:
        torch._foreach_lerp_(t_params, s_params, 1.0 - momentum)
