"""The masked branch's lightweight transformer decoder (MAE).

It receives the encoder's visible tokens, puts a shared learned mask token at every hidden
position, adds its own positional embeddings and predicts the pixels of every patch. It is
narrower and shallower than the encoder on purpose: it is discarded after pretraining, so the
representation work has to happen in the encoder.
"""

from __future__ import annotations

from typing import Annotated

import torch
from pydantic import Field, model_validator
from timm.layers.pos_embed_sincos import build_sincos2d_pos_embed
from timm.models.vision_transformer import Block
from torch import nn

from pipelines.settings import StrictSection

PositiveInt = Annotated[int, Field(gt=0)]
PositiveFloat = Annotated[float, Field(gt=0)]


def check_heads_divide_width(embed_dim: int, num_heads: int) -> None:
    """Attention splits the width evenly over the heads (the encoder's config checks it too)."""
    if embed_dim % num_heads:
        raise ValueError(f"embed_dim ({embed_dim}) must be a multiple of num_heads ({num_heads})")


class DecoderConfig(StrictSection):
    """The masked branch's lightweight transformer decoder."""

    embed_dim: PositiveInt = Field(
        256,
        description="Width of the decoder's tokens.")
    depth: PositiveInt = Field(
        4,
        description="Transformer blocks of the decoder.")
    num_heads: PositiveInt = Field(
        8,
        description="Attention heads of each decoder block; must divide embed_dim.")
    mlp_ratio: PositiveFloat = Field(
        4.0,
        description="Hidden width of each decoder block's MLP, as a multiple of embed_dim.")

    @model_validator(mode="after")
    def _heads_divide_width(self) -> "DecoderConfig":
        check_heads_divide_width(self.embed_dim, self.num_heads)
        return self


def sincos_pos_embed(grid_size: int, dim: int, num_prefix_tokens: int = 1) -> torch.Tensor:
    """Fixed 2-D sine-cosine positional embeddings, (1, prefix + grid**2, dim); prefix rows zero."""
    grid_nd = build_sincos2d_pos_embed([grid_size, grid_size], dim=dim)
    prefix = torch.zeros(num_prefix_tokens, dim)
    return torch.cat([prefix, grid_nd], dim=0).unsqueeze(0)


class MaskedDecoder(nn.Module):
    """Visible latents + mask tokens -> predicted pixels of every patch."""

    def __init__(
        self,
        num_patches: int,
        encoder_dim: int,
        patch_pixels: int,
        config: DecoderConfig,
        pos_embed: str = "sincos",
    ):
        super().__init__()
        dim = config.embed_dim
        self.embed = nn.Linear(encoder_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        grid = int(round(num_patches**0.5))
        learned = pos_embed == "learned"
        initial = torch.zeros(1, 1 + num_patches, dim) if learned else sincos_pos_embed(grid, dim)
        self.pos_embed = nn.Parameter(initial, requires_grad=learned)
        self.blocks = nn.ModuleList(
            Block(dim, config.num_heads, mlp_ratio=config.mlp_ratio, qkv_bias=True,
                  norm_layer=nn.LayerNorm)
            for _ in range(config.depth)
        )
        self.norm = nn.LayerNorm(dim)
        self.pred = nn.Linear(dim, patch_pixels)
        self._init_weights(learned)

    def _init_weights(self, learned_pos: bool) -> None:
        nn.init.normal_(self.mask_token, std=0.02)
        if learned_pos:
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def forward(self, latent_bkd: torch.Tensor, ids_restore_bn: torch.Tensor) -> torch.Tensor:
        """``latent_bkd`` is the class token then the visible tokens, as the encoder returned them."""
        x = self.embed(latent_bkd)
        b, n = ids_restore_bn.shape
        visible = x.shape[1] - 1
        mask_tokens = self.mask_token.expand(b, n - visible, -1)
        shuffled_bnd = torch.cat([x[:, 1:], mask_tokens], dim=1)
        unshuffled_bnd = torch.gather(
            shuffled_bnd, 1, ids_restore_bn.unsqueeze(-1).expand(-1, -1, x.shape[2])
        )
        x = torch.cat([x[:, :1], unshuffled_bnd], dim=1) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.pred(self.norm(x))[:, 1:]  # drop the class token: it has no pixels
