"""Cheap signals of representation health, computed from embeddings a step already produced.

Self-supervised losses can look fine while the representation collapses to a point; the standard
deviation of L2-normalised embeddings is about 1/sqrt(dim) when healthy and 0 when collapsed.
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
