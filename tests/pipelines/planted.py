"""A raw-image folder of real photographs plus planted bad files whose drop reasons are known."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from pipelines.sample_images import sample_photograph_dir

# scikit-image's natural photographs: none of them is a duplicate of another or fails a filter.
PHOTOGRAPHS = (
    "astronaut.png", "brick.png", "camera.png", "cell.png", "chelsea.png", "clock_motion.png",
    "coffee.png", "coins.png", "color.png", "grass.png", "gravel.png", "hubble_deep_field.jpg",
    "ihc.png", "moon.png", "motorcycle_left.png", "page.png", "retina.jpg", "rocket.jpg",
    "text.png",
)

# What each planted file must be dropped as.
PLANTED = {
    "planted/zero_bytes.jpg": "unreadable",
    "planted/truncated.jpg": "unreadable",
    "planted/tiny.png": "too_small",
    "planted/blank.png": "blank",
    "planted/astronaut_copy.png": "exact_duplicate",
    "planted/coffee_small.png": "near_duplicate",
}


def _png(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def raw_image_files() -> dict[str, bytes]:
    """Relative path -> bytes: the photographs under photos/, the planted files under planted/."""
    source = sample_photograph_dir()
    files = {f"photos/{name}": (source / name).read_bytes() for name in PHOTOGRAPHS}
    rocket = (source / "rocket.jpg").read_bytes()
    coffee = Image.open(source / "coffee.png").convert("RGB")
    rng = np.random.default_rng(0)
    blank = np.full((256, 256, 3), 128, dtype=np.uint8) + rng.integers(0, 2, (256, 256, 3),
                                                                           dtype=np.uint8)
    files.update({
        "planted/zero_bytes.jpg": b"",
        "planted/truncated.jpg": rocket[: len(rocket) // 2],
        "planted/tiny.png": _png(coffee.crop((0, 0, 24, 24))),
        "planted/blank.png": _png(Image.fromarray(blank)),
        "planted/astronaut_copy.png": files["photos/astronaut.png"],
        "planted/coffee_small.png": _png(coffee.resize((300, 200), Image.BICUBIC)),
        "notes/readme.txt": b"not an image, not listed",
    })
    return files


def write_tree(root: Path, files: dict[str, bytes]) -> Path:
    for relative, data in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return root
