"""What a person looks at beside the numbers: MAE's reconstructions and the views given.

Both are made from the held batch (the monitor's first batch, kept): a grid of its first images
as the masked branch sees them (original, visible patches, reconstruction) and a grid of the
views every objective read, one row an image. Making them runs the model, so every rank calls
``training_pictures`` (the model may be sharded); the grids are in [0, 1], CHW, for TensorBoard
and PNG files. This module does not write anything.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ssl_train.train.step import IMAGENET_MEAN, IMAGENET_STD

ROWS = 4  # images a grid shows


def _pixels(images_bchw: torch.Tensor) -> torch.Tensor:
    """Normalised images back to [0, 1]."""
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (images_bchw.float().cpu() * std + mean).clamp(0, 1)


def _grid(rows: list[list[torch.Tensor]]) -> torch.Tensor:
    """Rows of (3, H, W) images side by side, 2 px apart, as one (3, H', W') image."""
    from torchvision.utils import make_grid

    side = max(image.shape[-1] for row in rows for image in row)
    cells = [F.interpolate(image[None], size=(side, side), mode="nearest")[0]
             if image.shape[-1] != side else image for row in rows for image in row]
    return make_grid(cells, nrow=len(rows[0]), padding=2, pad_value=1.0)


@torch.no_grad()
def training_pictures(model, held: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """``{"mae/reconstructions": grid, "views/given": grid}`` of the held batch (the first
    only when an objective reconstructs). Collective: every rank calls it."""
    names = [view.name for view in model.views() if view.name in held]
    pictures: dict[str, torch.Tensor] = {}
    model.eval()
    try:
        source = held.get("view_mae")
        if source is not None:
            made = model.reconstruct(source[:ROWS], seed=seed)
            if made is not None:
                visible, pasted = made
                pictures["mae/reconstructions"] = _grid(
                    [[original, shown, rebuilt] for original, shown, rebuilt in
                     zip(_pixels(source[:ROWS]), _pixels(visible), _pixels(pasted))])
    finally:
        model.train()
    pictures["views/given"] = _grid([[_pixels(held[name][i:i + 1])[0] for name in names]
                                     for i in range(min(ROWS, len(held[names[0]])))])
    return pictures
