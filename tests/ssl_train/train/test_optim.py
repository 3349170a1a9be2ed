"""Optimiser groups and the learning-rate schedule."""

from __future__ import annotations

import pytest

from ssl_train.models.ssl_model import SSLModel
from ssl_train.train.optim import build_optimizer, build_scheduler, cosine_with_warmup


def test_learning_rate_scales_with_global_batch(tiny_config):
    tiny_config.optim.base_lr = 1e-3
    tiny_config.train.global_batch_size = 512
    model = SSLModel(tiny_config)
    assert build_optimizer(model, tiny_config).param_groups[0]["lr"] == pytest.approx(2e-3)


def test_norms_tokens_and_loss_log_variances_are_not_decayed(tiny_config):
    model = SSLModel(tiny_config)
    decayed, undecayed = build_optimizer(model, tiny_config).param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    undecayed_names = {names[id(p)] for p in undecayed["params"]}
    assert {"weighting.log_vars", "encoder.cls_token", "objectives.mae.decoder.mask_token"} <= undecayed_names
    assert all(p.ndim >= 2 for p in decayed["params"]) and decayed["weight_decay"] > 0
    assert undecayed["weight_decay"] == 0
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert {id(p) for p in decayed["params"] + undecayed["params"]} == trainable
    assert id(model.encoder.pos_embed) not in trainable  # sine-cosine: fixed


def test_schedule_warms_up_then_decays_to_the_floor(tiny_config):
    tiny_config.train.steps = 100
    tiny_config.optim.warmup_steps = 10
    tiny_config.optim.min_lr_ratio = 0.1
    model = SSLModel(tiny_config)
    optimizer = build_optimizer(model, tiny_config)
    scheduler = build_scheduler(optimizer, tiny_config)
    peak = tiny_config.learning_rate
    lrs = []
    for _ in range(100):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs[0] == pytest.approx(peak / 10)
    assert lrs[9] == pytest.approx(peak)
    assert all(a <= b for a, b in zip(lrs[:10], lrs[1:10]))
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert lrs[-1] == pytest.approx(peak * 0.1, rel=0.01)
    assert cosine_with_warmup(55, 100, 10, 0.0) == pytest.approx(0.5)
