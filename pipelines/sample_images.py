"""The embedded default data: the photographs that ship inside scikit-image.

Lets a new user (and the tests) train on real images with no download and no object storage.
Views here are random resized crops and flips only; the full augmentation lives in the data stage.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image

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


def random_resized_crop(
    image: Image.Image, size: int, rng: random.Random, scale: tuple[float, float] = (0.2, 1.0)
) -> np.ndarray:
    """A crop of random area and aspect ratio (3/4 to 4/3), resized to size x size, maybe flipped."""
    width, height = image.size
    for _ in range(10):
        area = width * height * rng.uniform(*scale)
        aspect = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
        w, h = int(round((area * aspect) ** 0.5)), int(round((area / aspect) ** 0.5))
        if 0 < w <= width and 0 < h <= height:
            left, top = rng.randint(0, width - w), rng.randint(0, height - h)
            break
    else:  # fall back to the central square
        w = h = min(width, height)
        left, top = (width - w) // 2, (height - h) // 2
    crop = image.resize((size, size), Image.BILINEAR, box=(left, top, left + w, top + h))
    if rng.random() < 0.5:
        crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
    return np.asarray(crop, dtype=np.uint8)


def random_view_batches(
    images: list[Image.Image], image_size: int, batch_size: int, seed: int = 0
) -> Iterator[dict[str, np.ndarray]]:
    """Endless batches of two contrastive views and one MAE view, uint8 (B, H, W, 3) each."""
    if not images:
        raise ValueError("no images to draw views from")
    rng = random.Random(seed)
    while True:
        picks = [rng.choice(images) for _ in range(batch_size)]
        yield {
            key: np.stack([random_resized_crop(image, image_size, rng) for image in picks])
            for key in ("view_a", "view_b", "view_mae")
        }
