"""SSLModel: one shared timm ViT encoder, the objectives trained on it, and the loss weighting.

Single-device model code: it knows nothing about FSDP, devices or precision (those are applied
from outside after it is built). Inputs are normalised float views (B, 3, H, W) by name, plus the
objectives' per-step inputs; the data stage's uint8 views are converted on the training worker.
The objectives (``ssl_train.objectives``) own their heads and losses; this module only runs them
in the configured order and adds their losses up.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ssl_train.config import PretrainConfig
from ssl_train.models.encoder import build_encoder, pooled_features
from ssl_train.models.weighting import LossWeighting
from ssl_train.objectives import StepContext, ViewSpec, objective_class


@dataclass
class ModelOutput:
    """What one forward computed: the total loss to back-propagate and everything worth logging."""

    loss: torch.Tensor
    losses: dict[str, torch.Tensor] = field(default_factory=dict)
    weights: dict[str, torch.Tensor] = field(default_factory=dict)
    embeddings: torch.Tensor | None = None  # detached, for the collapse monitor
    signals: dict[str, torch.Tensor] = field(default_factory=dict)  # the objectives' signals


class SSLModel(nn.Module):
    """The objectives of ``config.objectives``, in order, on one shared encoder."""

    def __init__(self, config: PretrainConfig):
        super().__init__()
        self.model_config = config.model
        self.encoder = build_encoder(config.model)
        self.objectives = nn.ModuleDict({
            entry.name: objective_class(entry.name)(entry, config) for entry in config.objectives})
        for objective in self.objectives.values():
            objective.attach(self.encoder)  # EMA teachers start as copies of the encoder
        names = tuple(name for objective in self.objectives.values()
                      for name in objective.loss_names)
        fixed = tuple(objective.config.weight for objective in self.objectives.values()
                      for _ in objective.loss_names)
        self.weighting = LossWeighting(names, config.weighting == "learned", fixed)

    def views(self) -> list[ViewSpec]:
        """The views the objectives read."""
        return [view for objective in self.objectives.values() for view in objective.views()]

    def encoders(self) -> list[nn.Module]:
        """The shared encoder, then the objectives' own (EMA teachers)."""
        return [self.encoder] + [encoder for objective in self.objectives.values()
                                 for encoder in objective.encoders()]

    def block_containers(self) -> list[nn.ModuleList]:
        """The repeated blocks, encoder then objectives: the units a parallelism wrapper shards."""
        containers = [encoder.blocks for encoder in self.encoders()]
        for objective in self.objectives.values():
            containers += objective.block_containers()
        return containers

    def transformer_blocks(self) -> list[nn.Module]:
        return [block for container in self.block_containers() for block in container]

    def step_inputs(self, context: StepContext) -> dict[str, torch.Tensor]:
        """Every objective's random inputs for this rank's rows at ``context.step``."""
        inputs: dict[str, torch.Tensor] = {}
        for objective in self.objectives.values():
            inputs |= objective.step_inputs(context)
        return inputs

    def start_step(self, step: int) -> None:
        """Where the objectives' schedules stand for step ``step`` (0-based)."""
        for objective in self.objectives.values():
            objective.start_step(step)

    def before_update(self) -> None:
        for objective in self.objectives.values():
            objective.before_update()

    def after_step(self, step: int) -> None:
        for objective in self.objectives.values():
            objective.after_step(step)

    def export_encoder(self) -> nn.Module:
        """The encoder to export and evaluate (an objective may name its own)."""
        for objective in self.objectives.values():
            chosen = objective.export_encoder(self.encoder)
            if chosen is not self.encoder:
                return chosen
        return self.encoder

    def encode(self, images_bchw: torch.Tensor) -> torch.Tensor:
        """Pooled encoder features of whole images, (B, D)."""
        return pooled_features(self.export_encoder(), images_bchw)

    def embed(self, images_bchw: torch.Tensor) -> torch.Tensor:
        """What the collapse monitor watches: the first objective's projection, or the pooled
        features when no objective projects."""
        features = pooled_features(self.encoder, images_bchw)
        for objective in self.objectives.values():
            projected = objective.project(features)
            if projected is not None:
                return projected
        return features

    def reconstruct(self, images_bchw: torch.Tensor, seed: int = 0
                    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The masked branch's (visible patches, reconstruction) of normalised images, or None
        when no objective reconstructs. The masking is drawn from ``seed``."""
        for objective in self.objectives.values():
            reconstruct = getattr(objective, "reconstruct", None)
            if reconstruct is not None:
                generator = torch.Generator().manual_seed(seed)
                return reconstruct(self.encoder, images_bchw, generator)
        return None

    def forward(self, views: dict[str, torch.Tensor],
                inputs: dict[str, torch.Tensor] | None = None) -> ModelOutput:
        """Every objective's losses on one micro-batch, weighted into one total.

        ``views`` holds the normalised views by name; ``inputs`` the objectives' step inputs
        (``step_inputs``), drawn here by each objective when omitted.
        """
        # Encoder passes go through ``pooled_features``/``encode_visible`` on the encoder's own
        # modules, never through ``encode``/``embed``: a parallelism wrapper may hook those as
        # entry points, and nested hooks would re-gather the root's parameters.
        inputs = inputs or {}
        losses: dict[str, torch.Tensor] = {}
        signals: dict[str, torch.Tensor] = {}
        embeddings = None
        for objective in self.objectives.values():
            out = objective(self.encoder, views, inputs)
            losses |= out.losses
            signals |= out.signals
            if embeddings is None and out.embeddings is not None:
                embeddings = out.embeddings
        total, weights = self.weighting(losses)
        return ModelOutput(loss=total,
                           losses={name: value.detach() for name, value in losses.items()},
                           weights=weights, embeddings=embeddings, signals=signals)
