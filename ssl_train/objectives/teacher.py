"""What the objectives with an EMA teacher share (MoCo v3, BYOL, DINO): the teacher, its
momentum schedule and its update after every optimiser step.

The teacher is a frozen copy of the shared encoder and of the objective's own student heads,
made once the encoder is built (``attach``). It lives in the objective as ``teacher``, so FSDP2
shards it like the student (its blocks are groups of their own, see ``encoders``), the checkpoint
saves it and a resume restores it. After each step ``ema_update_`` moves it towards the student
with the momentum of ``cosine_momentum`` (from ``momentum`` to 1 over the run).
"""

from __future__ import annotations

from typing import Annotated

from pydantic import Field
from torch import nn

from ssl_train.models.ema import check_aligned, cosine_momentum, ema_update_, frozen_copy
from ssl_train.objectives.base import Objective, ObjectiveConfig

Momentum = Annotated[float, Field(ge=0, le=1)]


class TeacherConfig(ObjectiveConfig):
    """An objective with an EMA teacher: the teacher's momentum at step 0 (1 at the end)."""

    momentum: Momentum = Field(
        0.996,
        description=("The EMA teacher's momentum at step 0; it rises to 1 at the last step on a "
        "cosine."))


class TeacherObjective(Objective):
    """An objective whose targets come from an EMA teacher of the encoder and its heads."""

    def student_heads(self) -> dict[str, nn.Module]:
        """The objective's own modules the teacher copies (e.g. the projector), by name."""
        return {}

    def attach(self, encoder: nn.Module) -> None:
        self._student = {"encoder": encoder, **self.student_heads()}  # not registered twice
        self.teacher = nn.ModuleDict({name: frozen_copy(module)
                                      for name, module in self._student.items()})
        self._aligned = False

    def encoders(self) -> list[nn.Module]:
        return [self.teacher["encoder"]]

    def momentum(self, step: int) -> float:
        """The momentum of the update after step ``step`` (0-based)."""
        return cosine_momentum(step, self.total_steps, self.config.momentum)

    def after_step(self, step: int) -> None:
        super().after_step(step)
        momentum = self.momentum(step - 1)
        for name, student in self._student.items():
            if not self._aligned:
                check_aligned(self.teacher[name], student)
            ema_update_(self.teacher[name], student, momentum)
        self._aligned = True
