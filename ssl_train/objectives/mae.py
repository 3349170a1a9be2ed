"""MAE: the encoder sees a random 25% of the patches; a light decoder predicts the rest."""

from __future__ import annotations

from typing import Annotated, Literal

import torch
from pydantic import Field

from pipelines.views.augment import CropConfig, ViewSpec
from ssl_train.losses import masked_reconstruction_loss
from ssl_train.models.decoder import DecoderConfig, MaskedDecoder
from ssl_train.models.encoder import encode_visible
from ssl_train.models.flops import Part, blocks_forward_flops
from ssl_train.models.masking import mask_order, num_visible, patchify, unpatchify
from ssl_train.objectives import register
from ssl_train.objectives.base import Objective, ObjectiveConfig, ObjectiveOutput, StepContext


class MAEConfig(ObjectiveConfig):
    name: Literal["mae"] = Field(
        "mae",
        description="The objective: mae (masked patches reconstructed by a light decoder).")
    mask_ratio: Annotated[float, Field(gt=0, lt=1)] = Field(
        0.75,
        description="Share of the patches masked; the encoder sees only the others.")
    norm_pix_loss: bool = Field(
        True,
        description=("Reconstruct each patch's pixels normalised by its own mean and variance "
        "(MAE's better target)."))
    decoder: DecoderConfig = Field(
        DecoderConfig(),
        description="The lightweight transformer decoder.")
    crop: CropConfig = Field(
        CropConfig(scale=(0.2, 1.0)),
        description="The random resized crop of the masked view.")

    def views(self) -> list[ViewSpec]:
        return [ViewSpec(name="view_mae", crop=self.crop)]

    def flops(self, model) -> dict[str, Part]:
        enc, dec = model.encoder, self.decoder
        patches, patch_pixels = model.num_patches, 3 * enc.patch_size**2
        visible = num_visible(patches, self.mask_ratio) + 1
        return {"patch_embed": Part(2 * patches * patch_pixels * enc.embed_dim),
                "encoder_visible": Part(blocks_forward_flops(visible, enc.embed_dim, enc.depth,
                                                             enc.mlp_ratio)),
                "decoder": Part(2 * visible * enc.embed_dim * dec.embed_dim
                                + blocks_forward_flops(patches + 1, dec.embed_dim, dec.depth,
                                                       dec.mlp_ratio)
                                + 2 * (patches + 1) * dec.embed_dim * patch_pixels)}

    def check(self, config) -> None:
        # The decoder exists to be thrown away; a decoder as large as the encoder would take over
        # the reconstruction work that the encoder is supposed to learn.
        encoder = config.model.encoder
        for key in ("embed_dim", "depth"):
            mine, theirs = getattr(self.decoder, key), getattr(encoder, key)
            if mine > theirs:
                raise ValueError(
                    f"objectives.mae.decoder.{key} ({mine}) must not exceed "
                    f"model.encoder.{key} ({theirs}): the decoder is the lightweight part")


@register
class MAE(Objective):
    """Masked autoencoding of one unaugmented crop, per-patch normalised pixel targets."""

    config_class = MAEConfig
    loss_names = ("masked",)

    def __init__(self, config: MAEConfig, run):
        super().__init__(config, run)
        model_config = run.model
        self.patch_size = model_config.encoder.patch_size
        self.decoder = MaskedDecoder(
            num_patches=model_config.num_patches,
            encoder_dim=model_config.encoder.embed_dim,
            patch_pixels=self.patch_size**2 * 3,
            config=config.decoder,
            pos_embed=model_config.encoder.pos_embed,
        )

    def step_inputs(self, context: StepContext) -> dict[str, torch.Tensor]:
        """The masking order of this rank's rows, drawn for the global batch: 1 worker and N
        workers mask the same patches."""
        noise = torch.rand(context.global_batch_size, self.model_config.num_patches,
                           generator=context.generator(1))
        return {"mask_order": mask_order(noise[context.rows])}

    def block_containers(self):
        return [self.decoder.blocks]

    @torch.no_grad()
    def reconstruct(self, encoder, images_bchw: torch.Tensor,
                    generator: torch.Generator | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(the visible patches alone, the visible patches with the decoder's prediction in the
        masked ones) of normalised images, as MAE shows its reconstructions. With per-patch
        normalised targets the prediction is put back in each patch's own mean and spread."""
        b = images_bchw.shape[0]
        noise = torch.rand(b, self.model_config.num_patches, generator=generator)
        latent, mask_bn, ids_restore_bn = encode_visible(
            encoder, images_bchw, self.config.mask_ratio, mask_order(noise))
        pred_bnp = self.decoder(latent, ids_restore_bn).float()
        target_bnp = patchify(images_bchw.float(), self.patch_size)
        if self.config.norm_pix_loss:
            mean = target_bnp.mean(dim=-1, keepdim=True)
            std = (target_bnp.var(dim=-1, keepdim=True) + 1e-6) ** 0.5
            pred_bnp = pred_bnp * std + mean
        hidden = mask_bn.unsqueeze(-1).float()
        visible = unpatchify(target_bnp * (1 - hidden), self.patch_size)
        pasted = unpatchify(target_bnp * (1 - hidden) + pred_bnp * hidden, self.patch_size)
        return visible, pasted

    def forward(self, encoder, views, inputs) -> ObjectiveOutput:
        images = views["view_mae"]
        latent, mask_bn, ids_restore_bn = encode_visible(
            encoder, images, self.config.mask_ratio, inputs.get("mask_order"))
        pred_bnp = self.decoder(latent, ids_restore_bn)
        loss = masked_reconstruction_loss(pred_bnp, patchify(images, self.patch_size), mask_bn,
                                          norm_pix=self.config.norm_pix_loss)
        return ObjectiveOutput({"masked": loss})
