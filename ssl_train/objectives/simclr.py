"""SimCLR: NT-Xent between the projections of two augmented views, over the global batch."""

from __future__ import annotations

from typing import Annotated, Literal

import torch
from pydantic import Field

from pipelines.views.augment import CropConfig, ViewSpec
from ssl_train.losses import nt_xent_loss
from ssl_train.models.encoder import pooled_features
from ssl_train.models.flops import Part, encoder_flops, mlp_flops
from ssl_train.models.heads import ProjectionHead, ProjectorConfig
from ssl_train.objectives import register
from ssl_train.objectives.base import Objective, ObjectiveConfig, ObjectiveOutput


def symmetric_views(crop: CropConfig) -> list[ViewSpec]:
    """``view_a`` and ``view_b``: two crops with the run's photometric augmentation."""
    return [ViewSpec(name=name, crop=crop, photometric=True) for name in ("view_a", "view_b")]


class SimCLRConfig(ObjectiveConfig):
    name: Literal["simclr"] = Field(
        "simclr",
        description="The objective: simclr (NT-Xent over the global batch).")
    temperature: Annotated[float, Field(gt=0)] = Field(
        0.2,
        description="NT-Xent's temperature.")
    projector: ProjectorConfig = Field(
        ProjectorConfig(),
        description="The projection head the loss is computed on.")
    crop: CropConfig = Field(
        CropConfig(),
        description="The random resized crop of both views.")

    def views(self) -> list[ViewSpec]:
        return symmetric_views(self.crop)

    def flops(self, model) -> dict[str, Part]:
        width = model.encoder.embed_dim
        return {"encoder": Part(2 * encoder_flops(model)),
                "projector": Part(2 * mlp_flops(width, self.projector))}

    def check(self, config) -> None:
        if config.train.global_batch_size // config.optim.accumulation_steps < 2:
            raise ValueError(
                "the contrastive loss needs at least 2 images per micro-batch "
                "(train.global_batch_size / optim.accumulation_steps)")


@register
class SimCLR(Objective):
    """Two photometrically augmented crops of each image; their projections attract, every
    other image's repel (negatives gathered from every worker)."""

    config_class = SimCLRConfig
    loss_names = ("contrastive",)

    def __init__(self, config: SimCLRConfig, run):
        super().__init__(config, run)
        self.projector = ProjectionHead.from_config(run.model.encoder.embed_dim, config.projector)

    def project(self, features_nd: torch.Tensor) -> torch.Tensor:
        return self.projector(features_nd)

    def forward(self, encoder, views, inputs) -> ObjectiveOutput:
        view_a, view_b = views["view_a"], views["view_b"]
        n = view_a.shape[0]
        z = self.projector(pooled_features(encoder, torch.cat([view_a, view_b], dim=0)))
        z_a, z_b = z[:n], z[n:]
        loss = nt_xent_loss(z_a, z_b, self.config.temperature)
        return ObjectiveOutput({"contrastive": loss}, embeddings=z_a.detach())
