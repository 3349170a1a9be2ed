"""SimSiam (Chen and He, 2021): a predictor on one view regresses the other view's projection
through a stop-gradient; no negatives, no EMA. Symmetrised as the mean of both orders."""

from __future__ import annotations

from typing import Literal

import torch

from pipelines.views.augment import CropConfig, ViewSpec
from ssl_train.losses import simsiam_loss
from ssl_train.models.encoder import pooled_features
from ssl_train.models.flops import Part, encoder_flops, mlp_flops
from ssl_train.models.heads import ProjectionHead, ProjectorConfig
from ssl_train.objectives import register
from ssl_train.objectives.base import Objective, ObjectiveConfig, ObjectiveOutput


class SimSiamConfig(ObjectiveConfig):
    name: Literal["simsiam"] = "simsiam"
    # SimSiam's projector: 3 layers with batch norm on every output (the last without affine);
    # its predictor: a 2-layer bottleneck.
    projector: ProjectorConfig = ProjectorConfig(hidden_dim=2048, out_dim=2048, num_layers=3,
                                                 last_bn=True)
    predictor: ProjectorConfig = ProjectorConfig(hidden_dim=512, out_dim=2048)
    crop: CropConfig = CropConfig()

    def flops(self, model) -> dict[str, Part]:
        width, proj = model.encoder.embed_dim, self.projector
        parts = {"encoder": Part(2 * encoder_flops(model)),
                 "heads": Part(2 * (mlp_flops(width, proj) + mlp_flops(proj.out_dim,
                                                                         self.predictor)))}
        return parts

    def views(self) -> list[ViewSpec]:  # SimCLR's symmetric views (shared when both train)
        return [ViewSpec(name=name, crop=self.crop, photometric=True)
                for name in ("view_a", "view_b")]

    def check(self, config) -> None:
        if self.predictor.out_dim != self.projector.out_dim:
            raise ValueError(f"objectives.simsiam.predictor.out_dim ({self.predictor.out_dim}) "
                             f"must equal objectives.simsiam.projector.out_dim "
                             f"({self.projector.out_dim}): the predictor regresses the projection")


@register
class SimSiam(Objective):
    config_class = SimSiamConfig
    loss_names = ("simsiam",)

    def __init__(self, config: SimSiamConfig, run):
        super().__init__(config, run)
        width = run.model.encoder.embed_dim
        self.projector = ProjectionHead.from_config(width, config.projector)
        self.predictor = ProjectionHead.from_config(config.projector.out_dim, config.predictor)

    def project(self, features_nd: torch.Tensor) -> torch.Tensor:
        return self.projector(features_nd)

    def forward(self, encoder, views, inputs) -> ObjectiveOutput:
        n = views["view_a"].shape[0]
        z = self.projector(pooled_features(encoder, torch.cat([views["view_a"], views["view_b"]])))
        p = self.predictor(z)
        loss = 0.5 * (simsiam_loss(p[:n], z[n:]) + simsiam_loss(p[n:], z[:n]))
        return ObjectiveOutput({"simsiam": loss}, embeddings=z[:n].detach())
