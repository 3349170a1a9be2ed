"""The analytic FLOP count behind MFU agrees with PyTorch's own count of the model's operations."""

from __future__ import annotations

import pytest
import torch
from timm.layers import set_fused_attn, use_fused_attn
from torch.utils.flop_counter import FlopCounterMode

from ssl_train.config import load_config
from ssl_train.models.ssl_model import SSLModel
from ssl_train.train.flops import step_flops


@pytest.fixture
def explicit_attention():
    """Attention as two batched products, which PyTorch's counter sees (its count of the CPU's
    fused attention kernel is missing)."""
    fused = use_fused_attn()
    set_fused_attn(False)
    yield
    set_fused_attn(fused)


@pytest.mark.parametrize("objectives", ["[simclr, mae]", "[simclr]", "[mae]", "[mocov3]",
                                        "[byol]", "[simsiam]", "[dino]"])
def test_step_flops_match_the_counted_forward_and_backward(objectives, explicit_attention):
    smaller = ["objectives.dino.local_crops=2", "objectives.dino.head.out_dim=4096"]
    config = load_config("tiny-cpu", [f"objectives={objectives}",
                                      *(smaller if "dino" in objectives else [])])
    images = 4
    model = SSLModel(config).train()
    views = {view.name: torch.randn(images, 3, view.size or config.model.image_size,
                                    view.size or config.model.image_size)
             for view in config.views()}
    counter = FlopCounterMode(display=False)
    with counter:
        output = model(views)
    forward = counter.get_total_flops()
    with counter:
        output.loss.backward()
    backward = counter.get_total_flops()
    estimate = step_flops(config, images)
    # The forward is counted exactly but for the losses' own small products (NT-Xent's logits);
    # an EMA teacher's forward has no backward.
    assert estimate["forward"] == pytest.approx(forward, rel=0.01)
    # Backward is twice the forward for matrix products (a little more for attention).
    assert estimate["total"] == pytest.approx(forward + backward, rel=0.03)
