"""BYOL (Grill et al., 2020): the online network predicts the EMA target's projection of the
other view; ``2 - 2 cos``, symmetrised (summed over both orders, as in the paper)."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from pipelines.views.augment import CropConfig, ViewSpec
from ssl_train.losses import byol_loss
from ssl_train.models.encoder import pooled_features
from ssl_train.models.flops import Part, encoder_flops, mlp_flops
from ssl_train.models.heads import ProjectorConfig
from ssl_train.objectives import register
from ssl_train.objectives.base import ObjectiveOutput
from ssl_train.objectives.predictor import PredictorHeads, PredictorHeadsConfig
from ssl_train.objectives.teacher import TeacherConfig, TeacherObjective

# BYOL's asymmetric augmentation (also MoCo v3's): one view always blurred and never solarised,
# the other rarely blurred and sometimes solarised.
ASYMMETRIC = ({"blur_p": 1.0, "solarize_p": 0.0}, {"blur_p": 0.1, "solarize_p": 0.2})


def asymmetric_views(crop: CropConfig) -> list[ViewSpec]:
    """``view_1`` and ``view_2``: two crops with BYOL's asymmetric photometric augmentation."""
    return [ViewSpec(name=f"view_{index}", crop=crop, photometric=True,
                     photometric_overrides=overrides)
            for index, overrides in enumerate(ASYMMETRIC, start=1)]


class BYOLConfig(PredictorHeadsConfig, TeacherConfig):
    name: Literal["byol"] = Field(
        "byol",
        description="The objective: byol (an EMA target and a predictor, no negatives).")
    projector: ProjectorConfig = Field(
        ProjectorConfig(hidden_dim=4096, out_dim=256),
        description="The projection head of the online network and its target.")
    predictor: ProjectorConfig = Field(
        ProjectorConfig(hidden_dim=4096, out_dim=256),
        description="The online network's predictor; its out_dim must equal the projector's.")
    crop: CropConfig = Field(
        CropConfig(),
        description=("The random resized crop of both views (BYOL's asymmetric photometric "
        "settings apply per view)."))

    def flops(self, model) -> dict[str, Part]:
        teacher = encoder_flops(model) + mlp_flops(model.encoder.embed_dim, self.projector)
        return {**self.online_flops(model), "teacher": Part(2 * teacher, backward=False)}

    def views(self) -> list[ViewSpec]:
        return asymmetric_views(self.crop)

    def check(self, config) -> None:
        self.check_predictor()


@register
class BYOL(PredictorHeads, TeacherObjective):
    """The online encoder, projector and predictor against the EMA target's projection (MoCo v3
    has the same structure with another loss, and subclasses this)."""

    config_class = BYOLConfig
    loss_names = ("byol",)

    def __init__(self, config: BYOLConfig, run):
        super().__init__(config, run)
        self.build_heads(run)

    def student_heads(self):
        return {"projector": self.projector}

    def symmetric_loss(self, p_1: torch.Tensor, p_2: torch.Tensor, target_1: torch.Tensor,
                       target_2: torch.Tensor) -> torch.Tensor:
        """Each view's prediction against the teacher's projection of the other view."""
        return byol_loss(p_1, target_2) + byol_loss(p_2, target_1)

    def forward(self, encoder, views, inputs) -> ObjectiveOutput:
        both = torch.cat([views["view_1"], views["view_2"]], dim=0)
        z = self.projector(pooled_features(encoder, both))
        with torch.no_grad():
            target = self.teacher["projector"](pooled_features(self.teacher["encoder"], both))
        loss = self.symmetric_loss(*self.predictor(z).chunk(2), *target.chunk(2))
        return ObjectiveOutput({self.loss_names[0]: loss},
                               embeddings=z[:len(views["view_1"])].detach())
