"""What BYOL, MoCo v3 and SimSiam share: a projector on the encoder's pooled features and a
predictor that regresses a projection (the other view's, or a teacher's), both MLPs with global
batch norm. Mixins: ``PredictorHeadsConfig`` for the config (``projector`` and ``predictor``
fields), ``PredictorHeads`` for the objective."""

from __future__ import annotations

import torch

from ssl_train.models.flops import Part, encoder_flops, mlp_flops
from ssl_train.models.heads import ProjectionHead


class PredictorHeadsConfig:
    """Mixin of an ``ObjectiveConfig`` with ``projector`` and ``predictor`` fields."""

    def check_predictor(self) -> None:
        """The predictor's output is compared with a projection: their widths must agree."""
        if self.predictor.out_dim != self.projector.out_dim:
            raise ValueError(f"objectives.{self.name}.predictor.out_dim ({self.predictor.out_dim}) "
                             f"must equal objectives.{self.name}.projector.out_dim "
                             f"({self.projector.out_dim}): the predictor regresses the projection")

    def online_flops(self, model) -> dict[str, Part]:
        """The encoder, projector and predictor on both views."""
        width, projector, predictor = model.encoder.embed_dim, self.projector, self.predictor
        return {"encoder": Part(2 * encoder_flops(model)),
                "heads": Part(2 * (mlp_flops(width, projector) + mlp_flops(projector.out_dim,
                                                                           predictor)))}


class PredictorHeads:
    """Mixin of an ``Objective`` whose config is a ``PredictorHeadsConfig``."""

    def build_heads(self, run) -> None:
        self.projector = ProjectionHead.from_config(run.model.encoder.embed_dim,
                                                    self.config.projector)
        self.predictor = ProjectionHead.from_config(self.config.projector.out_dim,
                                                    self.config.predictor)

    def project(self, features_nd: torch.Tensor) -> torch.Tensor:
        return self.projector(features_nd)
