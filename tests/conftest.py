"""Shared fixtures: real images from scikit-image, small configs."""

from __future__ import annotations

import pytest
import torch

from pipelines.sample_images import sample_photographs
from ssl_train.config import load_config


@pytest.fixture(scope="session")
def photographs():
    """scikit-image's sample photographs (RGB), at least 64 px on the short side."""
    images = sample_photographs(min_side=64)
    assert len(images) >= 20, "scikit-image's sample photographs are missing"
    return images


@pytest.fixture
def tiny_config():
    return load_config("tiny-cpu")


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)
