"""MoCo v3 (Chen, Xie and He, 2021): queries from the encoder, projector and predictor; keys
from the momentum encoder and projector, gathered from every worker; the symmetric InfoNCE with
the 2 * temperature scaling (``moco_v3_loss``, both orders summed as MoCo v3's code does)."""

from __future__ import annotations

from typing import Annotated, Literal

import torch
from pydantic import Field

from pipelines.views.augment import CropConfig, ViewSpec
from ssl_train.losses import moco_v3_loss
from ssl_train.models.encoder import pooled_features
from ssl_train.models.heads import ProjectionHead, ProjectorConfig
from ssl_train.objectives import register
from ssl_train.objectives.base import ObjectiveOutput
from ssl_train.objectives.byol import asymmetric_views
from ssl_train.objectives.teacher import Momentum, TeacherConfig, TeacherObjective


class MoCoV3Config(TeacherConfig):
    name: Literal["mocov3"] = "mocov3"
    momentum: Momentum = 0.99
    temperature: Annotated[float, Field(gt=0)] = 0.2
    # MoCo v3's ViT heads: a 3-layer projector ending in an affine-free batch norm, a 2-layer
    # predictor.
    projector: ProjectorConfig = ProjectorConfig(hidden_dim=4096, out_dim=256, num_layers=3,
                                                 last_bn=True)
    predictor: ProjectorConfig = ProjectorConfig(hidden_dim=4096, out_dim=256)
    crop: CropConfig = CropConfig()

    def views(self) -> list[ViewSpec]:  # BYOL's asymmetric views, as MoCo v3 uses
        return asymmetric_views(self.crop)

    def check(self, config) -> None:
        if config.train.global_batch_size // config.optim.accumulation_steps < 2:
            raise ValueError("the mocov3 loss needs at least 2 images per micro-batch "
                             "(train.global_batch_size / optim.accumulation_steps)")


@register
class MoCoV3(TeacherObjective):
    config_class = MoCoV3Config
    loss_names = ("mocov3",)

    def __init__(self, config: MoCoV3Config, run):
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
        q = self.predictor(z)
        with torch.no_grad():
            k = self.teacher["projector"](pooled_features(self.teacher["encoder"], both))
        t = self.config.temperature
        loss = moco_v3_loss(q[:n], k[n:], t) + moco_v3_loss(q[n:], k[:n], t)
        return ObjectiveOutput({"mocov3": loss}, embeddings=z[:n].detach())
