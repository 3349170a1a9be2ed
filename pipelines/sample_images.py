"""The embedded default data: the photographs that ship inside scikit-image, and the labelled
digits that ship inside scikit-learn (for monitoring and evaluation).

Lets a new user (and the tests) train on real images with no download and no object storage.
Views are cut by the data stage's own ``make_views``, so the embedded run sees the same
augmentation as a run on shards.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image

from pipelines.views.augment import HYBRID_VIEWS, AugmentConfig, ViewSpec, make_views
from pipelines.views.quality import QualityConfig

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def sample_photograph_dir() -> Path:
    """Where scikit-image keeps its sample images (installed with the ``demo`` extra)."""
    try:
        import skimage.data
    except ImportError as err:  # the demo extra is missing
        raise RuntimeError(
            "the embedded sample images need scikit-image: pip install 'ray-ssl-pretrain[demo]'"
        ) from err
    return Path(skimage.data.data_dir)


def sample_photographs(min_side: int = 64) -> list[Image.Image]:
    """Every sample image at least ``min_side`` pixels on its short side, as RGB."""
    images = []
    for path in sorted(sample_photograph_dir().iterdir()):
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        with Image.open(path) as image:
            image.load()
            if min(image.size) >= min_side:
                images.append(image.convert("RGB"))
    return images


def random_view_batches(
    images: list[Image.Image],
    image_size: int,
    batch_size: int,
    seed: int = 0,
    augment: AugmentConfig | None = None,
    views: tuple[ViewSpec, ...] | list[ViewSpec] = HYBRID_VIEWS,
) -> Iterator[dict[str, np.ndarray]]:
    """Endless batches of ``views`` (by default the hybrid's), uint8 (B, H, W, 3) each."""
    if not images:
        raise ValueError("no images to draw views from")
    augment = augment or AugmentConfig()
    quality = QualityConfig(min_side=1, min_pixel_std=0)
    encoded = []
    for image in images:
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=95)  # decodes fast, at reduced size when it can
        encoded.append(buffer.getvalue())
    rng = np.random.default_rng(seed)
    while True:
        picks = rng.integers(0, len(encoded), batch_size)
        rows = [make_views(encoded[i], rng, image_size, augment, quality, views) for i in picks]
        yield {key: np.stack([row[key] for row in rows]) for key in rows[0]}


def digits_images(image_size: int) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 1,797 labelled 8x8 digits as uint8 RGB (N, size, size, 3), and labels."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:
        raise RuntimeError(
            "the digits need scikit-learn: pip install 'ray-ssl-pretrain[demo]'"
        ) from err
    digits = load_digits()
    images = []
    for pixels in digits.images:  # values 0..16
        grey = Image.fromarray((pixels * (255 / 16)).astype(np.uint8), mode="L")
        images.append(np.asarray(grey.resize((image_size, image_size), Image.BILINEAR)
                                 .convert("RGB"), dtype=np.uint8))
    return np.stack(images), digits.target.astype(np.int64)
