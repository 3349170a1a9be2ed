"""The objective seam: an objective defined here alone (no edit elsewhere) configures, gets its
own views from the data path, trains on the shared encoder and is weighted with the others."""

from __future__ import annotations

import itertools
import json
from typing import Literal

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pipelines.sample_images import random_view_batches
from pipelines.views.augment import CropConfig, ViewSpec
from ssl_train.config import load_config
from ssl_train.models.encoder import pooled_features
from ssl_train.models.ssl_model import SSLModel
from ssl_train.objectives import (
    Objective,
    ObjectiveConfig,
    ObjectiveOutput,
    StepContext,
    register,
)
from ssl_train.train.loop import train_in_process


class RotationConfig(ObjectiveConfig):
    name: Literal["rotation"] = "rotation"
    crop: CropConfig = CropConfig(scale=(0.5, 1.0), flip_p=0.0)

    def views(self) -> list[ViewSpec]:
        return [ViewSpec(name="view_rot", crop=self.crop)]


@register
class Rotation(Objective):
    """RotNet (Gidaris et al., 2018): predict which of four rotations an image was given."""

    config_class = RotationConfig
    loss_names = ("rotation",)

    def __init__(self, config, run):
        super().__init__(config, run)
        self.classifier = nn.Linear(run.model.encoder.embed_dim, 4)
        self.steps_seen = 0

    def step_inputs(self, context: StepContext) -> dict[str, torch.Tensor]:
        turns = torch.randint(0, 4, (context.global_batch_size,), generator=context.generator(7))
        return {"rotation_turns": turns[context.rows]}

    def after_step(self, step: int) -> None:
        self.steps_seen = step

    def forward(self, encoder, views, inputs) -> ObjectiveOutput:
        images, turns = views["view_rot"], inputs["rotation_turns"]
        rotated = torch.stack([torch.rot90(image, int(k), dims=(1, 2))
                               for image, k in zip(images, turns)])
        logits = self.classifier(pooled_features(encoder, rotated))
        return ObjectiveOutput({"rotation": F.cross_entropy(logits.float(), turns)})


def _config(objectives: str, steps: int = 12):
    from tests.conftest import TINY_OVERRIDES

    return load_config("tiny-cpu", [*TINY_OVERRIDES, f"objectives={objectives}",
                                    f"train.steps={steps}", "optim.warmup_steps=0",
                                    "data.quality.min_side=16"])


def test_a_new_objective_is_configured_by_name_with_its_fields():
    config = _config("[{name: rotation, crop: {scale: [0.6, 1.0]}}]")
    assert config.objective_names == ["rotation"]
    assert config.objective("rotation").crop.scale == (0.6, 1.0)
    assert [view.name for view in config.views()] == ["view_rot"]
    with pytest.raises(Exception, match="unknown key objectives.rotation.angle"):
        _config("[{name: rotation, angle: 90}]")


def test_a_new_objective_trains_alone_and_beside_mae(tmp_path, photographs):
    config = _config("[rotation]", steps=12)
    config.optim.base_lr = 0.05
    batches = random_view_batches(photographs, config.model.image_size,
                                  config.train.global_batch_size, seed=3, views=config.views())
    first = next(batches)
    assert {key for key in first} == {"view_rot"}  # only the view it declared is cut
    torch.manual_seed(config.train.seed)  # as the loop builds it
    before = {name: p.detach().clone() for name, p in SSLModel(config).named_parameters()}
    model = train_in_process(config, itertools.repeat(first), tmp_path / "alone",
                             log=lambda line: None)
    after = dict(model.named_parameters())
    for name in ("encoder.blocks.0.attn.qkv.weight", "objectives.rotation.classifier.weight"):
        assert not torch.equal(before[name], after[name]), name
    records = [json.loads(line) for line in (tmp_path / "alone" / "metrics.jsonl").open()]
    assert len(records) == 12 and all("loss_rotation" in r for r in records)
    assert model.objectives["rotation"].steps_seen == 12  # the after-step hook ran every step
    assert sum(r["loss_rotation"] for r in records[-4:]) < sum(r["loss_rotation"]
                                                               for r in records[:4])

    hybrid = _config("[rotation, mae]", steps=3)
    batches = random_view_batches(photographs, hybrid.model.image_size,
                                  hybrid.train.global_batch_size, seed=3, views=hybrid.views())
    model = train_in_process(hybrid, batches, tmp_path / "hybrid", log=lambda line: None)
    last = [json.loads(line) for line in (tmp_path / "hybrid" / "metrics.jsonl").open()][-1]
    assert {"loss_rotation", "loss_masked", "weight_rotation", "weight_masked"} <= set(last)
    assert last["weight_rotation"] != 1.0  # learned weighting moved both weights
    assert model.weighting.names == ("rotation", "masked")
