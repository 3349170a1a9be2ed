"""BYOL (Grill et al., 2020): the online network predicts the EMA target's projection of the
other view; ``2 - 2 cos``, symmetrised (summed over both orders, as in the paper)."""

from __future__ import annotations

from typing import Literal

import torch

from pipelines.views.augment import CropConfig, ViewSpec
from ssl_train.losses import byol_loss
from ssl_train.models.encoder import pooled_features
from ssl_train.models.heads import ProjectionHead, ProjectorConfig
from ssl_train.objectives import register
from ssl_train.objectives.base import ObjectiveOutput
from ssl_train.objectives.teacher import TeacherConfig, TeacherObjective

# BYOL's asymmetric augmentation (also MoCo v3's): one view always blurred and never solarised,
# the other rarely blurred and sometimes solarised.
ASYMMETRIC = ({"blur_p": 1.0, "solarize_p": 0.0}, {"blur_p": 0.1, "solarize_p": 0.2})


def asymmetric_views(crop: CropConfig) -> list[ViewSpec]:
    """``view_1`` and ``view_2``: two crops with BYOL's asymmetric photometric augmentation."""
    return [ViewSpec(name=f"view_{index}", crop=crop, photometric=True,
                     photometric_overrides=overrides)
            for index, overrides in enumerate(ASYMMETRIC, start=1)]


class BYOLConfig(TeacherConfig):
    name: Literal["byol"] = "byol"
    projector: ProjectorConfig = ProjectorConfig(hidden_dim=4096, out_dim=256)
    predictor: ProjectorConfig = ProjectorConfig(hidden_dim=4096, out_dim=256)
    crop: CropConfig = CropConfig()

    def views(self) -> list[ViewSpec]:
        return asymmetric_views(self.crop)


@register
class BYOL(TeacherObjective):
    config_class = BYOLConfig
    loss_names = ("byol",)

    def __init__(self, config: BYOLConfig, run):
        super().__init__(config, run)
        width = run.model.encoder.embed_dim
        self.projector = ProjectionHead.from_config(width, config.projector)
        self.predictor = ProjectionHead.from_config(config.projector.out_dim, config.predictor)

    def student_heads(self):
        return {"projector": self.projector}

    def project(self, features_nd: torch.Tensor) -> torch.Tensor:
        return self.projector(features_nd)

    def forward(self, encoder, views, inputs) -> ObjectiveOutput:
        both = torch.cat([views["view_1"], views["view_2"]], dim=0)
        n = views["view_1"].shape[0]
        z = self.projector(pooled_features(encoder, both))
        p = self.predictor(z)
        with torch.no_grad():
            target = self.teacher["projector"](pooled_features(self.teacher["encoder"], both))
        loss = byol_loss(p[:n], target[n:]) + byol_loss(p[n:], target[:n])
        return ObjectiveOutput({"byol": loss}, embeddings=z[:n].detach())
