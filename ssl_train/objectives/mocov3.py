"""MoCo v3 (Chen, Xie and He, 2021): queries from the encoder, projector and predictor; keys
from the momentum encoder and projector, gathered from every worker; the symmetric InfoNCE with
the 2 * temperature scaling (``moco_v3_loss``, both orders summed as MoCo v3's code does).

The structure is BYOL's (online network with a predictor, EMA target of encoder and projector,
the asymmetric views), so the classes extend BYOL's; the loss and the heads' defaults differ.
"""

from __future__ import annotations

from typing import Annotated, Literal

import torch
from pydantic import Field

from ssl_train.losses import moco_v3_loss
from ssl_train.models.heads import ProjectorConfig
from ssl_train.objectives import register
from ssl_train.objectives.byol import BYOL, BYOLConfig
from ssl_train.objectives.teacher import Momentum


class MoCoV3Config(BYOLConfig):
    name: Literal["mocov3"] = Field(
        "mocov3",
        description=("The objective: mocov3 (a momentum encoder's keys, gathered from every "
        "worker)."))
    momentum: Momentum = Field(
        0.99,
        description=("The momentum encoder's momentum at step 0; it rises to 1 at the last step "
        "on a cosine."))
    temperature: Annotated[float, Field(gt=0)] = Field(
        0.2,
        description="The contrastive loss's temperature.")
    # MoCo v3's ViT heads: a 3-layer projector ending in an affine-free batch norm, a 2-layer
    # predictor.
    projector: ProjectorConfig = Field(
        ProjectorConfig(hidden_dim=4096, out_dim=256, num_layers=3, last_bn=True),
        description="MoCo v3's 3-layer projector, ending in an affine-free batch norm.")

    def check(self, config) -> None:
        super().check(config)
        if config.train.global_batch_size // config.optim.accumulation_steps < 2:
            raise ValueError("the mocov3 loss needs at least 2 images per micro-batch "
                             "(train.global_batch_size / optim.accumulation_steps)")


@register
class MoCoV3(BYOL):
    config_class = MoCoV3Config
    loss_names = ("mocov3",)

    def symmetric_loss(self, q_1: torch.Tensor, q_2: torch.Tensor, k_1: torch.Tensor,
                       k_2: torch.Tensor) -> torch.Tensor:
        t = self.config.temperature
        return moco_v3_loss(q_1, k_2, t) + moco_v3_loss(q_2, k_1, t)
