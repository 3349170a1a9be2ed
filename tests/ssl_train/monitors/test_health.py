"""The collapse and representation monitors on embeddings with known answers."""

from __future__ import annotations

import pytest
import torch

from ssl_train.monitors.health import (
    alignment,
    effective_rank,
    embedding_std,
    healthy_embedding_std,
    knn_accuracy,
    uniformity,
)


def test_constant_embeddings_read_as_collapsed():
    collapsed = torch.ones(256, 64) * torch.randn(1, 64)
    assert embedding_std(collapsed) == pytest.approx(0.0, abs=1e-6)
    assert effective_rank(collapsed) == pytest.approx(1.0, abs=0.01)


def test_gaussian_embeddings_read_near_their_expectations():
    torch.manual_seed(0)
    z = torch.randn(4096, 64)
    assert embedding_std(z) == pytest.approx(healthy_embedding_std(64), rel=0.05)
    assert effective_rank(z) == pytest.approx(64, rel=0.05)  # N >> d: nearly flat spectrum
    # Independent points on the sphere: ||x - y||^2 = 2 - 2 cos with cos ~ N(0, 1/d), so
    # log E[exp(-2 ||x - y||^2)] = -4 + 8/d.
    assert uniformity(z[:1024]) == pytest.approx(-4.0 + 8 / 64, abs=0.03)
    # Two independent views: E||a - b||^2 = 2. The same view twice: 0.
    assert alignment(z[:512], z[512:1024]) == pytest.approx(2.0, rel=0.05)
    assert alignment(z, z) == pytest.approx(0.0, abs=1e-6)


def test_embeddings_on_a_low_dimensional_subspace_have_that_rank():
    torch.manual_seed(0)
    z = torch.randn(2048, 4) @ torch.randn(4, 64)
    assert 3.0 < effective_rank(z) <= 4.0


def test_knn_separates_clusters_and_is_at_chance_on_random_labels():
    torch.manual_seed(0)
    centres = torch.randn(5, 32) * 10
    labels = torch.arange(5).repeat_interleave(100)
    features = centres[labels] + torch.randn(500, 32)
    train, test = torch.arange(0, 500, 2), torch.arange(1, 500, 2)
    assert knn_accuracy(features[train], labels[train], features[test], labels[test]) > 0.99
    shuffled = labels[torch.randperm(500)]
    chance = knn_accuracy(features[train], shuffled[train], features[test], shuffled[test])
    assert chance == pytest.approx(0.2, abs=0.1)
