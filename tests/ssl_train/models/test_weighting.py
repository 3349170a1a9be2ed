"""Learned loss weighting: what it converges to, and that clipping leaves it out."""

from __future__ import annotations

import pytest
import torch

from pipelines.sample_images import random_view_batches
from ssl_train.models.masking import mask_order
from ssl_train.models.ssl_model import SSLModel
from ssl_train.models.weighting import LossWeighting
from ssl_train.train.optim import build_optimizer, build_scheduler
from ssl_train.train.step import normalize_views, train_step


def test_learned_weights_approach_one_over_each_loss_floor():
    # Two regression tasks on one shared layer, with noise floors 0.25 and 2.0 (their target
    # noise variances): at the optimum of s_i, exp(-s_i) = 1 / L_i.
    generator = torch.Generator().manual_seed(0)
    true_w = torch.randn(8, 2, generator=generator)
    shared = torch.nn.Linear(8, 8)
    heads = torch.nn.Linear(8, 2)
    weighting = LossWeighting(("contrastive", "masked"), learned=True)
    params = [*shared.parameters(), *heads.parameters(), *weighting.parameters()]
    optimizer = torch.optim.Adam(params, lr=0.02)
    noise_std = torch.tensor([0.5, 2.0**0.5])
    recent = []
    for step in range(1500):
        x = torch.randn(512, 8, generator=generator)
        y = x @ true_w + noise_std * torch.randn(512, 2, generator=generator)
        squared = (heads(shared(x)) - y) ** 2
        losses = {"contrastive": squared[:, 0].mean(), "masked": squared[:, 1].mean()}
        total, weights = weighting(losses)
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
        if step >= 1300:
            recent.append([float(losses["contrastive"].detach()), float(losses["masked"].detach())])
    floors = torch.tensor(recent).mean(0)
    assert floors.tolist() == pytest.approx([0.25, 2.0], rel=0.1)
    learned = weighting.weights()
    assert learned.tolist() == pytest.approx((1 / floors).tolist(), rel=0.05)
    # So the weights' ratio is the inverse ratio of the floors: here about 8 to 1.
    assert float(learned[0] / learned[1]) == pytest.approx(float(floors[1] / floors[0]), rel=0.07)


def test_gradient_clipping_leaves_the_loss_weighting_out(tiny_config, photographs):
    views = normalize_views(next(random_view_batches(photographs, 64, 16, seed=3)))
    order = mask_order(torch.rand(16, tiny_config.model.num_patches,
                                  generator=torch.Generator().manual_seed(1)))
    tiny_config.train.global_batch_size = 16

    def one_step(clip: float):
        torch.manual_seed(0)
        model = SSLModel(tiny_config).train()
        tiny_config.optim.grad_clip_norm = clip
        optimizer = build_optimizer(model, tiny_config)
        record = train_step(model, optimizer, build_scheduler(optimizer, tiny_config), views,
                            tiny_config, {"mask_order": order})
        network = [p.grad.clone() for name, p in model.named_parameters()
                   if p.grad is not None and "log_vars" not in name]
        return record, network, model.weighting.log_vars.grad.clone()

    record, unclipped, _ = one_step(1e9)
    norm = float(torch.linalg.vector_norm(torch.stack([g.norm() for g in unclipped])))
    # The logged norm is the network's alone.
    assert record["grad_norm"] == pytest.approx(norm, rel=1e-5)

    record, clipped, log_var_grads = one_step(norm / 2)
    for before, after in zip(unclipped, clipped):
        torch.testing.assert_close(after, before / 2, rtol=1e-4, atol=1e-7)
    # The log variances keep their own gradient, 1 - L_i at s_i = 0: not scaled by the clip.
    expected = torch.tensor([1 - record["loss_contrastive"], 1 - record["loss_masked"]])
    torch.testing.assert_close(log_var_grads, expected, rtol=1e-5, atol=1e-5)
