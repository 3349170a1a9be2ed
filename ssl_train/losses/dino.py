"""DINO's self-distillation loss (Caron et al., 2021) for one student/teacher pair of views.

The teacher's logits are centred (``center``: a running mean of the teacher's outputs, kept by
the objective) and sharpened with a low temperature; the student's are softened with a higher
one; the loss is the cross entropy of the student's distribution under the teacher's,
``-sum_k softmax((t - c) / T_t)_k log softmax(s / T_s)_k``, averaged over the batch. The teacher
side carries no gradient. Computed in fp32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def teacher_targets(teacher_logits: torch.Tensor, center: torch.Tensor,
                    teacher_temperature: float) -> torch.Tensor:
    """The teacher's centred, sharpened distribution, fp32, no gradient; (N, K)."""
    return F.softmax((teacher_logits.detach().float() - center.float()) / teacher_temperature,
                     dim=-1)


def student_log_probs(student_logits: torch.Tensor, student_temperature: float) -> torch.Tensor:
    """The student's softened log-distribution, fp32; (N, K)."""
    return F.log_softmax(student_logits.float() / student_temperature, dim=-1)


def cross_entropy(targets: torch.Tensor, log_probs: torch.Tensor) -> torch.Tensor:
    """``-sum_k targets_k log_probs_k``, averaged over rows (with ``log(targets)``: the
    entropy)."""
    return -(targets * log_probs).sum(dim=-1).mean()


def dino_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, center: torch.Tensor,
              student_temperature: float, teacher_temperature: float) -> torch.Tensor:
    """Cross entropy of the student's softmax under the centred, sharpened teacher's; (N, K).

    An objective with several crops computes ``teacher_targets`` once per teacher crop and
    ``student_log_probs`` once per student crop, and pairs them with ``cross_entropy``.
    """
    if student_logits.shape != teacher_logits.shape or student_logits.dim() != 2:
        raise ValueError("student_logits and teacher_logits must both be (N, K), got "
                         f"{tuple(student_logits.shape)}, {tuple(teacher_logits.shape)}")
    if student_temperature <= 0 or teacher_temperature <= 0:
        raise ValueError("temperatures must be > 0, got "
                         f"{student_temperature} and {teacher_temperature}")
    return cross_entropy(teacher_targets(teacher_logits, center, teacher_temperature),
                         student_log_probs(student_logits, student_temperature))
