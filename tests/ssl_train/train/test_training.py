"""A short single-process run on real photographs learns and does not collapse."""

from __future__ import annotations

import json

import numpy as np
import torch

from pipelines.sample_images import random_view_batches
from ssl_train.monitors.health import embedding_std, healthy_embedding_std
from ssl_train.train.loop import train_in_process
from ssl_train.train.step import normalize_views


def _mean(records, key):
    return float(np.mean([r[key] for r in records]))


def test_fifty_steps_lower_both_losses_without_collapse(tmp_path, photographs, tiny_config):
    tiny_config.train.steps = 50
    batches = random_view_batches(photographs, 64, tiny_config.train.global_batch_size, seed=1)
    model = train_in_process(tiny_config, batches, tmp_path, log=lambda line: None)

    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 51))
    first, last = records[:5], records[-5:]
    for loss in ("loss_contrastive", "loss_masked"):
        assert _mean(last, loss) < 0.9 * _mean(first, loss), loss
    assert all(np.isfinite(r["loss"]) and r["images_per_second"] > 0 for r in records)

    # Collapse check on a held batch the run never saw: std of L2-normalised projections.
    held = normalize_views(next(random_view_batches(photographs, 64, 64, seed=99)))
    model.eval()
    with torch.no_grad():
        projections = model.embed(held["view_a"])
    dim = tiny_config.objective("simclr").projector.out_dim
    assert embedding_std(projections) > 0.5 * healthy_embedding_std(dim)


def test_collapsed_embeddings_are_detected():
    collapsed = torch.ones(64, 128) + 1e-4 * torch.randn(64, 128)
    spread = torch.randn(64, 128)
    assert embedding_std(collapsed) < 0.01 * healthy_embedding_std(128)
    assert embedding_std(spread) > 0.8 * healthy_embedding_std(128)
