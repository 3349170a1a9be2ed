"""Signals of representation health: what a self-supervised run shows instead of accuracy.

Self-supervised losses can look fine while the representation collapses. Computed on embeddings
of a small held batch:
- ``embedding_std``: std of L2-normalised embeddings, about 1/sqrt(dim) when healthy, 0 when
  collapsed to a point;
- ``effective_rank`` (RankMe, Garrido et al. 2023): exp of the entropy of the normalised singular
  values, 1 when collapsed to a line, up to min(N, dim) when spread;
- ``alignment`` and ``uniformity`` (Wang and Isola 2020) of the two views' embeddings;
- ``knn_accuracy``: weighted k-nearest-neighbour accuracy of frozen features on labelled data.
Pure functions of tensors; no I/O, no distribution.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def embedding_std(embeddings_nd: torch.Tensor) -> float:
    """Mean over dimensions of the per-dimension std of L2-normalised embeddings."""
    normalised = F.normalize(embeddings_nd.float(), dim=1)
    return float(normalised.std(dim=0).mean())


def healthy_embedding_std(dim: int) -> float:
    """The value ``embedding_std`` takes for embeddings spread uniformly on the sphere."""
    return dim**-0.5


def effective_rank(embeddings_nd: torch.Tensor, eps: float = 1e-7) -> float:
    """RankMe: exp(entropy) of the singular values normalised to sum to one."""
    singular = torch.linalg.svdvals(embeddings_nd.double())
    p = singular / (singular.sum() + eps) + eps
    return float(torch.exp(-(p * torch.log(p)).sum()))


def alignment(z_a: torch.Tensor, z_b: torch.Tensor, alpha: float = 2.0) -> float:
    """Mean distance**alpha between the normalised embeddings of two views of each image."""
    a, b = F.normalize(z_a.float(), dim=1), F.normalize(z_b.float(), dim=1)
    return float((a - b).norm(dim=1).pow(alpha).mean())


def uniformity(z: torch.Tensor, t: float = 2.0) -> float:
    """log E[exp(-t ||x - y||^2)] over pairs of normalised embeddings (lower: more uniform)."""
    x = F.normalize(z.float(), dim=1)
    return float(torch.pdist(x).pow(2).mul(-t).exp().mean().log())


def knn_accuracy(
    train_nd: torch.Tensor, train_labels: torch.Tensor, test_nd: torch.Tensor,
    test_labels: torch.Tensor, k: int = 20, temperature: float = 0.07,
) -> float:
    """Top-1 accuracy of cosine kNN with exp(sim / T) weighted votes (as in DINO)."""
    train = F.normalize(train_nd.float(), dim=1)
    test = F.normalize(test_nd.float(), dim=1)
    classes = int(max(train_labels.max(), test_labels.max())) + 1
    k = min(k, len(train))
    correct = 0
    for start in range(0, len(test), 256):
        similarity = test[start:start + 256] @ train.T
        top, index = similarity.topk(k, dim=1)
        weights = (top / temperature).exp()
        votes = torch.zeros(len(top), classes).scatter_add_(1, train_labels[index], weights)
        correct += int((votes.argmax(1) == test_labels[start:start + 256]).sum())
    return correct / len(test)
