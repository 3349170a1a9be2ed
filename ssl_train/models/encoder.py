"""The shared encoder: a timm VisionTransformer, and the two ways objectives run it.

``pooled_features`` encodes whole images, at the model's image size or at any multiple of the
patch size (multi-crop's small local crops: the positional embedding is resampled); ``encode_visible`` encodes only the patches a masking
order keeps (mask tokens never enter the encoder, as in MAE). Both go through the encoder's own
modules, so a parallelism wrapper that shards its blocks sees every pass.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from timm.layers import resample_abs_pos_embed
from timm.models.vision_transformer import VisionTransformer

from ssl_train.models.decoder import sincos_pos_embed
from ssl_train.models.masking import random_masking

if TYPE_CHECKING:  # the config imports the objectives, which import this module
    from ssl_train.config import ModelConfig


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
    encoder.patch_embed.strict_img_size = False  # any multiple of the patch size: local crops
    return encoder


def pooled_features(encoder: VisionTransformer, images_bchw: torch.Tensor) -> torch.Tensor:
    """Pooled features of whole images, (B, D); images smaller than the model's image size see
    the positional embedding resampled to their grid (bicubic, as DINO does)."""
    if tuple(images_bchw.shape[-2:]) == tuple(encoder.patch_embed.img_size):
        tokens = encoder.forward_features(images_bchw)
        return encoder.forward_head(tokens, pre_logits=True)
    tokens_bnd = encoder.patch_embed(images_bchw)
    patch = encoder.patch_embed.patch_size
    grid = (images_bchw.shape[-2] // patch[0], images_bchw.shape[-1] // patch[1])
    pos_embed = resample_abs_pos_embed(encoder.pos_embed, new_size=grid,
                                       old_size=encoder.patch_embed.grid_size,
                                       num_prefix_tokens=encoder.num_prefix_tokens)
    cls = encoder.cls_token.expand(tokens_bnd.shape[0], -1, -1)
    x = encoder.pos_drop(torch.cat([cls, tokens_bnd], dim=1) + pos_embed)
    x = encoder.norm(encoder.blocks(encoder.norm_pre(encoder.patch_drop(x))))
    return encoder.forward_head(x, pre_logits=True)


def encode_visible(
    encoder: VisionTransformer, images_bchw: torch.Tensor, mask_ratio: float,
    mask_order: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(class token + visible tokens (B, 1 + K, D), mask (B, N), ids_restore (B, N))."""
    tokens_bnd = encoder.patch_embed(images_bchw)
    tokens_bnd = tokens_bnd + encoder.pos_embed[:, encoder.num_prefix_tokens:]
    visible_bkd, mask_bn, ids_restore_bn = random_masking(tokens_bnd, mask_ratio, mask_order)
    cls = (encoder.cls_token + encoder.pos_embed[:, :1]).expand(visible_bkd.shape[0], -1, -1)
    x = torch.cat([cls, visible_bkd], dim=1)
    x = encoder.norm_pre(encoder.pos_drop(x))
    x = encoder.norm(encoder.blocks(x))
    return x, mask_bn, ids_restore_bn
