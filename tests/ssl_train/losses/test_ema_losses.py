"""The losses of BYOL, SimSiam, MoCo v3 and DINO against slow references of their papers'
formulas, and the EMA teacher's update and schedules against theirs."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from ssl_train.losses import byol_loss, dino_loss, moco_v3_loss, simsiam_loss
from ssl_train.models.ema import cosine_momentum, ema_update_, frozen_copy

SHAPES = [(1, 3), (5, 16), (12, 64)]


def _cos(u: torch.Tensor, v: torch.Tensor) -> float:
    u, v = u.double(), v.double()
    return float(u @ v) / math.sqrt(float(u @ u) * float(v @ v))


def byol_reference(p, z) -> float:
    """BYOL eq. 2: || p/||p|| - z/||z|| ||^2 per sample, averaged."""
    total = 0.0
    for p_i, z_i in zip(p.double(), z.double()):
        total += float(((p_i / p_i.norm() - z_i / z_i.norm()) ** 2).sum())
    return total / len(p)


def simsiam_reference(p, z) -> float:
    """SimSiam eq. 1: D(p, z) = - p/||p|| . z/||z||, averaged."""
    return -sum(_cos(p_i, z_i) for p_i, z_i in zip(p, z)) / len(p)


def moco_v3_reference(q, k, temperature) -> float:
    """MoCo v3 alg. 1: CE over q_i . k_j / T with positive j = i, times 2T."""
    total = 0.0
    for i in range(len(q)):
        logits = [_cos(q[i], k[j]) / temperature for j in range(len(k))]
        total += -(logits[i] - math.log(sum(math.exp(x) for x in logits)))
    return total / len(q) * 2 * temperature


def dino_reference(student, teacher, center, ts, tt) -> float:
    """DINO alg. 1: H(softmax((t - c) / tt), softmax(s / ts)) per sample, averaged."""
    total = 0.0
    for s_i, t_i in zip(student.double(), teacher.double()):
        t_exp = [math.exp((float(t) - float(c)) / tt) for t, c in zip(t_i, center[0].double())]
        s_exp = [math.exp(float(s) / ts) for s in s_i]
        t_sum, s_sum = sum(t_exp), sum(s_exp)
        total += -sum(te / t_sum * math.log(se / s_sum) for te, se in zip(t_exp, s_exp))
    return total / len(student)


@pytest.mark.parametrize("n,dim", SHAPES)
def test_byol_and_simsiam_losses_match_their_formulas(n, dim):
    p, z = torch.randn(n, dim), torch.randn(n, dim)
    assert float(byol_loss(p, z)) == pytest.approx(byol_reference(p, z), rel=1e-5, abs=1e-6)
    assert float(simsiam_loss(p, z)) == pytest.approx(simsiam_reference(p, z), rel=1e-5,
                                                      abs=1e-6)


@pytest.mark.parametrize("n,dim", SHAPES)
@pytest.mark.parametrize("temperature", [0.1, 0.2, 1.0])
def test_moco_v3_loss_matches_its_formula(n, dim, temperature):
    q, k = torch.randn(n, dim), torch.randn(n, dim)
    got = float(moco_v3_loss(q, k, temperature))
    assert got == pytest.approx(moco_v3_reference(q, k, temperature), rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("n,k", [(1, 4), (6, 32), (16, 256)])
@pytest.mark.parametrize("temperatures", [(0.1, 0.04), (0.1, 0.07), (0.5, 0.5)])
def test_dino_loss_matches_its_formula(n, k, temperatures):
    student, teacher, center = torch.randn(n, k), torch.randn(n, k), 0.3 * torch.randn(1, k)
    got = float(dino_loss(student, teacher, center, *temperatures))
    assert got == pytest.approx(dino_reference(student, teacher, center, *temperatures),
                                rel=1e-5)


def test_targets_carry_no_gradient():
    p, z = torch.randn(4, 8, requires_grad=True), torch.randn(4, 8, requires_grad=True)
    (byol_loss(p, z) + simsiam_loss(p, z) + moco_v3_loss(p, z, 0.2)).backward()
    assert p.grad.abs().sum() > 0 and z.grad is None
    s, t = torch.randn(4, 8, requires_grad=True), torch.randn(4, 8, requires_grad=True)
    dino_loss(s, t, torch.zeros(1, 8), 0.1, 0.04).backward()
    assert s.grad.abs().sum() > 0 and t.grad is None


def test_bad_shapes_and_temperatures_are_refused():
    with pytest.raises(ValueError, match="must both be"):
        byol_loss(torch.randn(4, 8), torch.randn(4, 9))
    with pytest.raises(ValueError, match="temperature"):
        moco_v3_loss(torch.randn(4, 8), torch.randn(4, 8), 0.0)
    with pytest.raises(ValueError, match="temperatures"):
        dino_loss(torch.randn(4, 8), torch.randn(4, 8), torch.zeros(1, 8), 0.1, -1.0)


def test_the_ema_update_is_the_formula_and_leaves_the_student_alone():
    student = nn.Sequential(nn.Linear(5, 7), nn.LayerNorm(7))
    teacher = frozen_copy(student)
    assert all(not p.requires_grad for p in teacher.parameters())
    with torch.no_grad():
        for p in student.parameters():
            p.add_(torch.randn_like(p))
    before_t = [p.clone() for p in teacher.parameters()]
    before_s = [p.clone() for p in student.parameters()]
    ema_update_(teacher, student, 0.9)
    for t, t0, s in zip(teacher.parameters(), before_t, before_s):
        assert torch.allclose(t, 0.9 * t0 + 0.1 * s, atol=1e-7)
    assert all(torch.equal(s, s0) for s, s0 in zip(student.parameters(), before_s))


def test_the_momentum_and_teacher_temperature_schedules_at_their_ends():
    from ssl_train.config import load_config
    from ssl_train.models.ssl_model import SSLModel
    from tests.conftest import TINY_OVERRIDES

    assert cosine_momentum(0, 100, 0.996) == pytest.approx(0.996)
    assert cosine_momentum(50, 100, 0.996) == pytest.approx(0.998)
    assert cosine_momentum(100, 100, 0.996) == 1.0
    assert cosine_momentum(150, 100, 0.996) == 1.0  # past the end: frozen
    config = load_config("tiny-cpu", [*TINY_OVERRIDES, "objectives=[dino]", "train.steps=100",
                                      "objectives.dino.head.out_dim=64"])
    dino = SSLModel(config).objectives["dino"]
    assert dino.teacher_temperature(0) == pytest.approx(0.04)
    assert dino.teacher_temperature(29) == pytest.approx(0.07)  # warm-up: 30% of the run
    assert dino.teacher_temperature(99) == pytest.approx(0.07)
    assert dino.momentum(0) == pytest.approx(0.996) and dino.momentum(100) == 1.0
