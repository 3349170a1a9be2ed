"""SimSiam (Chen and He, 2021): a predictor on one view regresses the other view's projection
through a stop-gradient; no negatives, no EMA. Symmetrised as the mean of both orders."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from pipelines.views.augment import CropConfig, ViewSpec
from ssl_train.losses import simsiam_loss
from ssl_train.models.encoder import pooled_features
from ssl_train.models.flops import Part
from ssl_train.models.heads import ProjectorConfig
from ssl_train.objectives import register
from ssl_train.objectives.base import Objective, ObjectiveConfig, ObjectiveOutput
from ssl_train.objectives.predictor import PredictorHeads, PredictorHeadsConfig
from ssl_train.objectives.simclr import symmetric_views


class SimSiamConfig(PredictorHeadsConfig, ObjectiveConfig):
    name: Literal["simsiam"] = Field(
        "simsiam",
        description="The objective: simsiam (stop-gradient, no EMA, no negatives).")
    # SimSiam's projector: 3 layers with batch norm on every output (the last without affine);
    # its predictor: a 2-layer bottleneck.
    projector: ProjectorConfig = Field(
        ProjectorConfig(hidden_dim=2048, out_dim=2048, num_layers=3, last_bn=True),
        description="SimSiam's 3-layer projector, batch norm on every output.")
    predictor: ProjectorConfig = Field(
        ProjectorConfig(hidden_dim=512, out_dim=2048),
        description=("SimSiam's 2-layer bottleneck predictor; its out_dim must equal the "
        "projector's."))
    crop: CropConfig = Field(
        CropConfig(),
        description="The random resized crop of both views.")

    def flops(self, model) -> dict[str, Part]:
        return self.online_flops(model)

    def views(self) -> list[ViewSpec]:  # SimCLR's symmetric views (shared when both train)
        return symmetric_views(self.crop)

    def check(self, config) -> None:
        self.check_predictor()


@register
class SimSiam(PredictorHeads, Objective):
    config_class = SimSiamConfig
    loss_names = ("simsiam",)

    def __init__(self, config: SimSiamConfig, run):
        super().__init__(config, run)
        self.build_heads(run)

    def forward(self, encoder, views, inputs) -> ObjectiveOutput:
        n = views["view_a"].shape[0]
        z = self.projector(pooled_features(encoder, torch.cat([views["view_a"], views["view_b"]])))
        p = self.predictor(z)
        loss = 0.5 * (simsiam_loss(p[:n], z[n:]) + simsiam_loss(p[n:], z[:n]))
        return ObjectiveOutput({"simsiam": loss}, embeddings=z[:n].detach())
