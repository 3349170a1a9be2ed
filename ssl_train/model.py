"""HybridSSL: one timm ViT encoder shared by a contrastive branch and a masked branch.

Single-device model code: it knows nothing about FSDP, devices or precision (those are applied
from outside after it is built). Inputs are normalised float images (B, 3, H, W); the data stage's
uint8 views are converted on the training worker. Each step of the computation is a method named
for what it does, as in the MAE reference.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from ssl_train.config import LossConfig, ModelConfig
from ssl_train.decoder import MaskedDecoder, sincos_pos_embed
from ssl_train.heads import ProjectionHead
from ssl_train.losses import masked_reconstruction_loss, nt_xent_loss
from ssl_train.masking import patchify, random_masking
from ssl_train.weighting import LossWeighting, active_losses


def build_encoder(config: ModelConfig) -> VisionTransformer:
    """A timm VisionTransformer with no classifier, loadable later by ``timm.create_model``."""
    enc = config.encoder
    encoder = VisionTransformer(
        img_size=config.image_size,
        patch_size=enc.patch_size,
        embed_dim=enc.embed_dim,
        depth=enc.depth,
        num_heads=enc.num_heads,
        mlp_ratio=enc.mlp_ratio,
        num_classes=0,
        global_pool=enc.pool,
        class_token=True,
        pos_embed="learn",
        drop_path_rate=enc.drop_path_rate,
    )
    if enc.pos_embed == "sincos":
        # Kept as timm's `pos_embed` parameter (frozen) so the exported encoder is a plain timm ViT.
        grid = config.image_size // enc.patch_size
        with torch.no_grad():
            encoder.pos_embed.copy_(sincos_pos_embed(grid, enc.embed_dim))
        encoder.pos_embed.requires_grad_(False)
    return encoder


@dataclass
class HybridOutput:
    """What one forward computed: the total loss to back-propagate and everything worth logging."""

    loss: torch.Tensor
    losses: dict[str, torch.Tensor] = field(default_factory=dict)
    weights: dict[str, torch.Tensor] = field(default_factory=dict)
    embeddings: torch.Tensor | None = None  # detached, for the collapse monitor


class HybridSSL(nn.Module):
    """Contrastive (SimCLR) and masked (MAE) self-supervision on one shared ViT encoder."""

    def __init__(self, model_config: ModelConfig, loss_config: LossConfig):
        super().__init__()
        self.model_config = model_config
        self.loss_config = loss_config
        self.patch_size = model_config.encoder.patch_size
        self.encoder = build_encoder(model_config)
        names = active_losses(loss_config)
        self.projector = (
            ProjectionHead(
                model_config.encoder.embed_dim,
                model_config.projector.hidden_dim,
                model_config.projector.out_dim,
            )
            if "contrastive" in names
            else None
        )
        self.decoder = (
            MaskedDecoder(
                num_patches=model_config.num_patches,
                encoder_dim=model_config.encoder.embed_dim,
                patch_pixels=self.patch_size**2 * 3,
                config=model_config.decoder,
                pos_embed=model_config.encoder.pos_embed,
            )
            if "masked" in names
            else None
        )
        self.weighting = LossWeighting(loss_config)

    def transformer_blocks(self) -> list[nn.Module]:
        """The repeated blocks, encoder then decoder: the units a parallelism wrapper shards."""
        blocks = list(self.encoder.blocks)
        if self.decoder is not None:
            blocks += list(self.decoder.blocks)
        return blocks

    def encode(self, images_bchw: torch.Tensor) -> torch.Tensor:
        """Pooled encoder features of whole images, (B, D)."""
        return self._pooled_features(images_bchw)

    def embed(self, images_bchw: torch.Tensor) -> torch.Tensor:
        """What the collapse monitor watches: projections, or pooled features without a head."""
        features = self._pooled_features(images_bchw)
        return self.projector(features) if self.projector is not None else features

    def _pooled_features(self, images_bchw: torch.Tensor) -> torch.Tensor:
        # The one encoder path of encode, embed and forward. A parallelism wrapper may hook
        # encode and embed as entry points; forward must not go through them.
        tokens = self.encoder.forward_features(images_bchw)
        return self.encoder.forward_head(tokens, pre_logits=True)

    def forward_contrastive(
        self, view_a: torch.Tensor, view_b: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """NT-Xent between the projections of two views; returns (loss, projections of view a)."""
        n = view_a.shape[0]
        features = self._pooled_features(torch.cat([view_a, view_b], dim=0))
        z = self.projector(features)
        z_a, z_b = z[:n], z[n:]
        return nt_xent_loss(z_a, z_b, self.loss_config.temperature), z_a

    def forward_encoder(
        self, images_bchw: torch.Tensor, mask_ratio: float, mask_order: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Encode the visible patches only; mask tokens never enter the encoder."""
        enc = self.encoder
        tokens_bnd = enc.patch_embed(images_bchw)
        tokens_bnd = tokens_bnd + enc.pos_embed[:, enc.num_prefix_tokens :]
        visible_bkd, mask_bn, ids_restore_bn = random_masking(tokens_bnd, mask_ratio, mask_order)
        cls = (enc.cls_token + enc.pos_embed[:, :1]).expand(visible_bkd.shape[0], -1, -1)
        x = torch.cat([cls, visible_bkd], dim=1)
        x = enc.norm_pre(enc.pos_drop(x))
        x = enc.norm(enc.blocks(x))
        return x, mask_bn, ids_restore_bn

    def forward_decoder(self, latent_bkd: torch.Tensor, ids_restore_bn: torch.Tensor) -> torch.Tensor:
        """Predicted pixels of every patch, (B, N, patch_size**2 * 3)."""
        return self.decoder(latent_bkd, ids_restore_bn)

    def forward_loss(
        self, images_bchw: torch.Tensor, pred_bnp: torch.Tensor, mask_bn: torch.Tensor
    ) -> torch.Tensor:
        """MSE on the masked patches (per-patch normalised targets when configured)."""
        target_bnp = patchify(images_bchw, self.patch_size)
        return masked_reconstruction_loss(
            pred_bnp, target_bnp, mask_bn, norm_pix=self.loss_config.norm_pix_loss
        )

    def forward_masked(
        self, images_bchw: torch.Tensor, mask_order: torch.Tensor | None = None
    ) -> torch.Tensor:
        latent, mask_bn, ids_restore_bn = self.forward_encoder(
            images_bchw, self.loss_config.mask_ratio, mask_order
        )
        pred_bnp = self.forward_decoder(latent, ids_restore_bn)
        return self.forward_loss(images_bchw, pred_bnp, mask_bn)

    def forward(
        self,
        view_a: torch.Tensor | None = None,
        view_b: torch.Tensor | None = None,
        view_mae: torch.Tensor | None = None,
        mask_order: torch.Tensor | None = None,
    ) -> HybridOutput:
        """All active losses on one batch: two augmented views and one MAE view of each image.

        ``mask_order`` (B, N) int64 gives each image's patches in the order the masked branch
        keeps them (``masking.mask_order``); drawn here when omitted.
        """
        losses: dict[str, torch.Tensor] = {}
        embeddings = None
        if self.projector is not None:
            losses["contrastive"], z_a = self.forward_contrastive(view_a, view_b)
            embeddings = z_a.detach()
        if self.decoder is not None:
            losses["masked"] = self.forward_masked(view_mae, mask_order)
        total, weights = self.weighting(losses)
        return HybridOutput(
            loss=total,
            losses={name: value.detach() for name, value in losses.items()},
            weights=weights,
            embeddings=embeddings,
        )
