"""DINO (Caron et al., 2021): self-distillation with no labels. The student (the shared encoder
and a DINO head) matches, on every crop, the EMA teacher's centred and sharpened distribution on
the *other* global crops.

- Multi-crop: two global crops at the model's image size and ``local_crops`` smaller ones
  (``local_size``), all cut by the data stage; the teacher sees the global crops only.
- The teacher's momentum follows the cosine schedule from ``momentum`` to 1; its temperature
  warms up linearly from ``warmup_teacher_temperature`` to ``teacher_temperature`` over the first
  ``teacher_warmup_fraction`` of the run; the student's is ``student_temperature``.
- The center is an EMA (``center_momentum``) of the teacher's mean output over the global batch
  (all-reduced across workers), a buffer saved with the checkpoint.
- The prototypes (the head's last layer) are frozen over the first
  ``freeze_prototypes_fraction`` of the run, as DINO freezes its last layer for the first epoch.
- The teacher is what ``export`` and ``eval`` take, as DINO evaluates it.
- Signals: the teacher's entropy and the teacher-student KL (the loss is their sum). Early in a
  run centering flattens the teacher, so the entropy, and with it the loss, can rise while the
  student's part, the KL, falls.
"""

from __future__ import annotations

from typing import Annotated, Literal

import torch
import torch.distributed as dist
from pydantic import Field, model_validator

from pipelines.views.augment import CropConfig, ViewSpec
from ssl_train.distributed.collectives import world_size
from ssl_train.losses.dino import cross_entropy, student_log_probs, teacher_targets
from ssl_train.models.encoder import pooled_features
from ssl_train.models.flops import Part, encoder_flops, mlp_flops
from ssl_train.models.heads import DINOHead, DINOHeadConfig
from ssl_train.objectives import register
from ssl_train.objectives.base import ObjectiveOutput
from ssl_train.objectives.teacher import Momentum, TeacherConfig, TeacherObjective

Temperature = Annotated[float, Field(gt=0)]


class DINOConfig(TeacherConfig):
    name: Literal["dino"] = Field(
        "dino",
        description=("The objective: dino (self-distillation with centering and sharpening, "
        "multi-crop)."))
    momentum: Momentum = Field(
        0.996,
        description=("The EMA teacher's momentum at step 0; it rises to 1 at the last step on a "
        "cosine."))
    head: DINOHeadConfig = Field(
        DINOHeadConfig(),
        description="DINO's projection head and prototypes.")
    student_temperature: Temperature = Field(
        0.1,
        description="Temperature of the student's softmax.")
    teacher_temperature: Temperature = Field(
        0.07,
        description="Temperature of the teacher's softmax after its warm-up (sharpening).")
    warmup_teacher_temperature: Temperature = Field(
        0.04,
        description=("The teacher's temperature at step 0, raised linearly to "
        "teacher_temperature."))
    teacher_warmup_fraction: Annotated[float, Field(ge=0, le=1)] = Field(
        0.3,
        description="Share of the run over which the teacher's temperature warms up.")
    # DINO's freeze_last_layer: the prototypes take no update over the first part of the run
    # (one epoch of DINO's hundred), which its authors found steadies the start.
    freeze_prototypes_fraction: Annotated[float, Field(ge=0, le=1)] = Field(
        0.01,
        description=("Share of the run over which the prototypes take no update (DINO's "
        "freeze_last_layer)."))
    center_momentum: Momentum = Field(
        0.9,
        description="Momentum of the teacher outputs' running center (centering).")
    global_crop: CropConfig = Field(
        CropConfig(scale=(0.4, 1.0)),
        description="The random resized crop of the two global views.")
    local_crop: CropConfig = Field(
        CropConfig(scale=(0.05, 0.4)),
        description="The random resized crop of the local views.")
    local_crops: Annotated[int, Field(ge=0)] = Field(
        6,
        description="Local views an image (multi-crop); 0: global views only.")
    # Side of the local crops in pixels, a multiple of the patch size; unset: 96/224 of the
    # model's image size, rounded to whole patches.
    local_size: Annotated[int, Field(gt=0)] | None = Field(
        None,
        description=("Side of the local crops in pixels, a multiple of the patch size; null: "
        "96/224 of the model's image size, rounded to whole patches."))

    @model_validator(mode="after")
    def _crops_overlap_sensibly(self) -> "DINOConfig":
        if self.local_crops and self.local_crop.scale[0] > self.global_crop.scale[1]:
            raise ValueError("objectives.dino.local_crop.scale must not start above "
                             "objectives.dino.global_crop.scale")
        return self

    def views(self) -> list[ViewSpec]:
        # DINO's augmentation: global crop 1 always blurred, 2 rarely blurred and sometimes
        # solarised; local crops blurred half the time.
        globals_ = [ViewSpec(name=f"view_global_{index}", crop=self.global_crop, photometric=True,
                             photometric_overrides=overrides)
                    for index, overrides in enumerate(
                        ({"blur_p": 1.0, "solarize_p": 0.0}, {"blur_p": 0.1, "solarize_p": 0.2}),
                        start=1)]
        locals_ = [ViewSpec(name=f"view_local_{index}", crop=self.local_crop, photometric=True,
                            photometric_overrides={"blur_p": 0.5, "solarize_p": 0.0},
                            size=self.local_size)
                   for index in range(1, self.local_crops + 1)]
        return globals_ + locals_

    def flops(self, model) -> dict[str, Part]:
        head = self.head
        head_flops = (mlp_flops(model.encoder.embed_dim, head, out_dim=head.bottleneck_dim)
                      + 2 * head.bottleneck_dim * head.out_dim)
        crops = 2 + self.local_crops
        student = 2 * encoder_flops(model) + self.local_crops * encoder_flops(
            model, self.local_size or model.image_size)
        return {"encoder": Part(student), "head": Part(crops * head_flops),
                "teacher": Part(2 * (encoder_flops(model) + head_flops), backward=False)}

    def check(self, config) -> None:
        patch = config.model.encoder.patch_size
        if self.local_size is None:  # resolved here, so the run's config.yaml states it
            self.local_size = max(patch, round(config.model.image_size * 96 / 224 / patch) * patch)
        side = self.local_size
        if side % patch or side > config.model.image_size:
            raise ValueError(f"objectives.dino.local_size ({side}) must be a multiple of "
                             f"model.encoder.patch_size ({patch}) and at most model.image_size "
                             f"({config.model.image_size})")


@register
class DINO(TeacherObjective):
    config_class = DINOConfig
    loss_names = ("dino",)

    def __init__(self, config: DINOConfig, run):
        super().__init__(config, run)
        self.head = DINOHead(run.model.encoder.embed_dim, config.head)
        self.register_buffer("center", torch.zeros(1, config.head.out_dim))
        self.global_views = [f"view_global_{index}" for index in (1, 2)]
        self.local_views = [f"view_local_{index}" for index in range(1, config.local_crops + 1)]

    def student_heads(self):
        return {"head": self.head}

    def export_encoder(self, encoder):
        return self.teacher["encoder"]

    def project(self, features_nd: torch.Tensor) -> torch.Tensor:
        return self.head.bottleneck(features_nd)

    def teacher_temperature(self, step: int) -> float:
        """DINO's warm-up: linear from the warm-up temperature over the first part of the run."""
        config = self.config
        warmup = int(config.teacher_warmup_fraction * self.total_steps)
        if step >= warmup:
            return config.teacher_temperature
        start, end = config.warmup_teacher_temperature, config.teacher_temperature
        return start + (end - start) * step / max(warmup - 1, 1)

    def forward(self, encoder, views, inputs) -> ObjectiveOutput:
        n = views[self.global_views[0]].shape[0]
        globals_ = torch.cat([views[name] for name in self.global_views])
        student_features = [pooled_features(encoder, globals_)]
        if self.local_views:  # the local crops share one size: one pass
            locals_ = torch.cat([views[name] for name in self.local_views])
            student_features.append(pooled_features(encoder, locals_))
        bottleneck = self.head.bottleneck(torch.cat(student_features))
        config, temperature = self.config, self.teacher_temperature(self.step)
        # Each crop's distribution once; the loss pairs every teacher (global) crop with every
        # other student crop, as DINO does.
        student = student_log_probs(self.head.logits(bottleneck), config.student_temperature)
        student = student.chunk(2 + len(self.local_views))
        with torch.no_grad():
            teacher_logits = self.teacher["head"](pooled_features(self.teacher["encoder"],
                                                                  globals_))
            targets = teacher_targets(teacher_logits, self.center, temperature)
        teacher = targets.chunk(2)
        loss = torch.stack([cross_entropy(teacher[t], student[s])
                            for t in range(2) for s in range(len(student)) if s != t]).mean()
        # DINO's collapse signals (its section 5.3): each term is H(teacher) + KL(teacher ||
        # student); collapse to one prototype or to the uniform distribution both drive the KL
        # to 0, telling them apart is the entropy's job.
        entropy = cross_entropy(targets, torch.log(targets.clamp_min(1e-12)))
        self.update_center(teacher_logits)
        return ObjectiveOutput({"dino": loss}, embeddings=bottleneck[:n].detach(),
                               signals={"dino_teacher_entropy": entropy,
                                        "dino_kl": loss.detach() - entropy})

    def before_update(self) -> None:
        # DINO's cancel_gradients_last_layer: no gradient, so the optimiser skips the
        # prototypes (weight decay included) while they are frozen.
        if self.step < int(self.config.freeze_prototypes_fraction * self.total_steps):
            self.head.prototypes.grad = None

    @torch.no_grad()
    def update_center(self, teacher_logits: torch.Tensor) -> None:
        """EMA of the teacher's mean output over the global batch (all-reduced)."""
        batch_sum = teacher_logits.float().sum(dim=0, keepdim=True)
        if world_size() > 1:
            dist.all_reduce(batch_sum)
        batch_center = batch_sum / (teacher_logits.shape[0] * world_size())
        self.center.mul_(self.config.center_momentum).add_(
            batch_center, alpha=1 - self.config.center_momentum)
