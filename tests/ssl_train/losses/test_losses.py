"""The two losses against slow loop-by-loop references of their formulas."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from ssl_train.losses import masked_reconstruction_loss, nt_xent_loss


def nt_xent_reference(z_a: torch.Tensor, z_b: torch.Tensor, temperature: float) -> float:
    """SimCLR's loss written out: for each of the 2N anchors, -log softmax of its positive."""
    z = [F.normalize(v, dim=0) for v in torch.cat([z_a, z_b]).double()]
    n = z_a.shape[0]
    total = 0.0
    for i in range(2 * n):
        positive = (i + n) % (2 * n)
        denominator = sum(
            math.exp(float(z[i] @ z[k]) / temperature) for k in range(2 * n) if k != i
        )
        total += -math.log(math.exp(float(z[i] @ z[positive]) / temperature) / denominator)
    return total / (2 * n)


def masked_mse_reference(pred, target, mask, norm_pix):
    """MSE per masked patch, averaged over masked patches, one patch at a time."""
    total, count = 0.0, 0
    for b in range(pred.shape[0]):
        for p in range(pred.shape[1]):
            if mask[b, p] == 0:
                continue
            t = target[b, p].double()
            if norm_pix:
                t = (t - t.mean()) / math.sqrt(float(t.var()) + 1e-6)
            total += float(((pred[b, p].double() - t) ** 2).mean())
            count += 1
    return total / count


@pytest.mark.parametrize("n,dim", [(2, 4), (5, 16), (16, 128)])
@pytest.mark.parametrize("temperature", [0.07, 0.2, 1.0])
def test_nt_xent_matches_reference(n, dim, temperature):
    z_a, z_b = torch.randn(n, dim), torch.randn(n, dim)
    got = float(nt_xent_loss(z_a, z_b, temperature))
    assert got == pytest.approx(nt_xent_reference(z_a, z_b, temperature), rel=1e-5, abs=1e-5)


def test_nt_xent_is_low_for_matching_views_and_high_for_swapped_pairs():
    z = torch.randn(8, 32)
    aligned = nt_xent_loss(z, z + 0.01 * torch.randn(8, 32), 0.1)
    shuffled = nt_xent_loss(z, z[torch.randperm(8)] + 0.01 * torch.randn(8, 32), 0.1)
    assert aligned < 0.1 < shuffled


def test_nt_xent_gradients_reach_both_views():
    z_a = torch.randn(6, 8, requires_grad=True)
    z_b = torch.randn(6, 8, requires_grad=True)
    nt_xent_loss(z_a, z_b, 0.2).backward()
    assert z_a.grad.abs().sum() > 0 and z_b.grad.abs().sum() > 0


def test_nt_xent_rejects_mismatched_views_and_bad_temperature():
    with pytest.raises(ValueError, match="must both be"):
        nt_xent_loss(torch.randn(4, 8), torch.randn(5, 8), 0.2)
    with pytest.raises(ValueError, match="temperature"):
        nt_xent_loss(torch.randn(4, 8), torch.randn(4, 8), 0.0)


@pytest.mark.parametrize("b,n,p", [(1, 4, 12), (3, 16, 48), (2, 64, 192)])
@pytest.mark.parametrize("norm_pix", [True, False])
def test_masked_loss_matches_reference(b, n, p, norm_pix):
    pred, target = torch.randn(b, n, p), torch.rand(b, n, p)
    mask = (torch.rand(b, n) < 0.75).float()
    mask[:, 0] = 1  # at least one masked patch per image
    got = float(masked_reconstruction_loss(pred, target, mask, norm_pix=norm_pix))
    assert got == pytest.approx(masked_mse_reference(pred, target, mask, norm_pix), rel=1e-5)


def test_masked_loss_ignores_visible_patches():
    pred, target = torch.randn(2, 16, 12), torch.rand(2, 16, 12)
    mask = torch.zeros(2, 16)
    mask[:, ::2] = 1  # even patches hidden
    base = masked_reconstruction_loss(pred, target, mask)
    changed_visible = pred.clone()
    changed_visible[:, 1::2] += 100.0
    assert masked_reconstruction_loss(changed_visible, target, mask) == pytest.approx(float(base))
    changed_masked = pred.clone()
    changed_masked[:, 0] += 1.0
    assert masked_reconstruction_loss(changed_masked, target, mask) != pytest.approx(float(base))


def test_masked_loss_gradient_is_zero_on_visible_patches():
    pred = torch.randn(2, 8, 12, requires_grad=True)
    mask = torch.tensor([[1, 0] * 4, [0, 1] * 4], dtype=torch.float)
    masked_reconstruction_loss(pred, torch.rand(2, 8, 12), mask).backward()
    assert torch.all(pred.grad[mask == 0] == 0)
    assert torch.all(pred.grad[mask == 1].abs().sum(-1) > 0)
