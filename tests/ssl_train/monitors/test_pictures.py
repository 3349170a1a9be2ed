"""The pictures beside the numbers: MAE's reconstructions and the views given."""

from __future__ import annotations

import torch

from ssl_train.config import load_config
from ssl_train.models.masking import patchify
from ssl_train.models.ssl_model import SSLModel
from ssl_train.monitors.pictures import ROWS, training_pictures
from tests.conftest import TINY_OVERRIDES


def test_a_reconstruction_keeps_the_visible_patches_and_fills_the_masked_ones():
    config = load_config("tiny-cpu", TINY_OVERRIDES)
    model = SSLModel(config).eval()
    size, patch = config.model.image_size, config.model.encoder.patch_size
    images = torch.randn(3, 3, size, size)
    visible, pasted = model.reconstruct(images, seed=0)
    original_p, visible_p, pasted_p = (patchify(x, patch) for x in (images, visible, pasted))
    hidden = (visible_p == 0).all(dim=-1)  # the masked patches are blank in the first picture
    ratio = config.objective("mae").mask_ratio
    assert hidden.float().mean().item() == round(ratio * hidden.shape[1]) / hidden.shape[1]
    # The visible patches are the image's own, in both pictures; the masked ones are predicted.
    assert torch.equal(visible_p[~hidden], original_p[~hidden])
    assert torch.equal(pasted_p[~hidden], original_p[~hidden])
    assert not torch.allclose(pasted_p[hidden], original_p[hidden])
    again, _ = model.reconstruct(images, seed=0)
    assert torch.equal(again, visible)  # the same masks for the same seed


def test_pictures_show_each_view_and_only_reconstruct_when_an_objective_does():
    for objectives, expected in (("[simclr, mae]", {"mae/reconstructions", "views/given"}),
                                 ("[simclr]", {"views/given"})):
        config = load_config("tiny-cpu", [*TINY_OVERRIDES, f"objectives={objectives}"])
        model = SSLModel(config)
        size = config.model.image_size
        held = {view.name: torch.randn(6, 3, view.size or size, view.size or size)
                for view in model.views()}
        pictures = training_pictures(model, held, seed=0)
        assert set(pictures) == expected
        views = pictures["views/given"]
        # One row an image, one column a view, 2 px apart, in [0, 1].
        assert views.shape[1] == ROWS * size + (ROWS + 1) * 2
        assert views.shape[2] == len(held) * size + (len(held) + 1) * 2
        assert 0 <= views.min() and views.max() <= 1
        assert model.training  # left as it was
