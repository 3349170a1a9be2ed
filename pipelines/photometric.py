"""SimCLR's photometric augmentation, with parameters drawn once and applied in either place.

The parameters of every view are drawn in the data stage by ``sample_photometric`` (one float32
row per view, fields in ``PHOTOMETRIC_FIELDS``). They are then applied either there, on the CPU,
to PIL images (``apply_photometric_pil``), or later to a whole batch on the training worker's
device (``apply_photometric_torch``). Both apply the same operations in the same order to the
same parameters, so where augmentation runs changes the cost, not the distribution.

Order: colour jitter (brightness, contrast, saturation, hue; applied together with probability
``jitter_p``), grayscale, Gaussian blur, solarisation.
"""

from __future__ import annotations

from typing import Annotated

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageEnhance, ImageFilter, ImageOps
from pydantic import Field, model_validator

from pipelines.settings import StrictSection

PHOTOMETRIC_FIELDS = (
    "brightness", "contrast", "saturation", "hue", "grayscale", "blur_sigma", "solarize"
)
# Identity parameters: what a view gets when no photometric operation fires.
IDENTITY = np.array([1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0], dtype=np.float32)
_LUMA = (0.299, 0.587, 0.114)  # ITU-R 601, as PIL's convert("L")

Unit = Annotated[float, Field(ge=0, le=1)]


class PhotometricConfig(StrictSection):
    """Strengths and probabilities (SimCLR's defaults at colour strength 0.5, as in BYOL)."""

    jitter_p: Unit = 0.8
    brightness: Annotated[float, Field(ge=0, lt=1)] = 0.4
    contrast: Annotated[float, Field(ge=0, lt=1)] = 0.4
    saturation: Annotated[float, Field(ge=0, lt=1)] = 0.2
    hue: Annotated[float, Field(ge=0, le=0.5)] = 0.1
    grayscale_p: Unit = 0.2
    blur_p: Unit = 0.5
    # Standard deviation in pixels at 224 px; scaled with the training resolution.
    blur_sigma: tuple[Annotated[float, Field(gt=0)], Annotated[float, Field(gt=0)]] = (0.1, 2.0)
    solarize_p: Unit = 0.0
    solarize_threshold: Annotated[int, Field(ge=0, le=255)] = 128

    @model_validator(mode="after")
    def _ordered_sigma(self) -> "PhotometricConfig":
        if self.blur_sigma[0] > self.blur_sigma[1]:
            raise ValueError(f"blur_sigma {self.blur_sigma} must be (low, high)")
        return self


def sample_photometric(
    rng: np.random.Generator, config: PhotometricConfig, image_size: int
) -> np.ndarray:
    """One view's parameters, float32 in ``PHOTOMETRIC_FIELDS`` order."""
    params = IDENTITY.copy()
    if rng.random() < config.jitter_p:
        params[0] = rng.uniform(1 - config.brightness, 1 + config.brightness)
        params[1] = rng.uniform(1 - config.contrast, 1 + config.contrast)
        params[2] = rng.uniform(1 - config.saturation, 1 + config.saturation)
        params[3] = rng.uniform(-config.hue, config.hue)
    params[4] = float(rng.random() < config.grayscale_p)
    if rng.random() < config.blur_p:
        params[5] = rng.uniform(*config.blur_sigma) * image_size / 224.0
    params[6] = float(rng.random() < config.solarize_p)
    return params


def blur_kernel_size(image_size: int) -> int:
    """SimCLR's kernel: 10% of the image side, odd (23 at 224 px)."""
    return max(3, int(0.1 * image_size) // 2 * 2 + 1)


def apply_photometric_pil(image: Image.Image, params: np.ndarray, threshold: int = 128) -> Image.Image:
    """Apply one view's parameters to an RGB PIL image on the CPU."""
    brightness, contrast, saturation, hue, grayscale, sigma, solarize = params.tolist()
    if brightness != 1.0:
        image = ImageEnhance.Brightness(image).enhance(brightness)
    if contrast != 1.0:
        image = ImageEnhance.Contrast(image).enhance(contrast)
    if saturation != 1.0:
        image = ImageEnhance.Color(image).enhance(saturation)
    if hue != 0.0:
        h, s, v = image.convert("HSV").split()
        shifted = (np.asarray(h, dtype=np.int16) + int(round(hue * 255))) % 256
        image = Image.merge("HSV", (Image.fromarray(shifted.astype(np.uint8)), s, v))
        image = image.convert("RGB")
    if grayscale:
        image = image.convert("L").convert("RGB")
    if sigma > 0:
        image = image.filter(ImageFilter.GaussianBlur(radius=sigma))
    if solarize:
        image = ImageOps.solarize(image, threshold)
    return image


def _gray(x_bchw: torch.Tensor) -> torch.Tensor:
    weights = torch.tensor(_LUMA, device=x_bchw.device, dtype=x_bchw.dtype).view(1, 3, 1, 1)
    return (x_bchw * weights).sum(dim=1, keepdim=True)


def _rgb_to_hsv(x: torch.Tensor) -> torch.Tensor:
    r, g, b = x.unbind(dim=1)
    maxc, _ = x.max(dim=1)
    minc, _ = x.min(dim=1)
    delta = maxc - minc
    safe = torch.where(delta > 0, delta, torch.ones_like(delta))
    hr = ((g - b) / safe) % 6
    hg = (b - r) / safe + 2
    hb = (r - g) / safe + 4
    h = torch.where(maxc == r, hr, torch.where(maxc == g, hg, hb)) / 6.0
    h = torch.where(delta > 0, h, torch.zeros_like(h))
    s = torch.where(maxc > 0, delta / torch.where(maxc > 0, maxc, torch.ones_like(maxc)),
                    torch.zeros_like(maxc))
    return torch.stack([h % 1.0, s, maxc], dim=1)


def _hsv_to_rgb(x: torch.Tensor) -> torch.Tensor:
    h, s, v = x.unbind(dim=1)
    k = torch.stack([(5 + h * 6) % 6, (3 + h * 6) % 6, (1 + h * 6) % 6], dim=1)
    return v.unsqueeze(1) - (v * s).unsqueeze(1) * torch.clamp(torch.minimum(k, 4 - k), 0, 1)


def _gaussian_blur(x_bchw: torch.Tensor, sigma_b: torch.Tensor) -> torch.Tensor:
    b, c, h, w = x_bchw.shape
    size = blur_kernel_size(h)
    offsets = torch.arange(size, device=x_bchw.device, dtype=x_bchw.dtype) - size // 2
    sigma = sigma_b.clamp_min(1e-3).view(b, 1)
    kernel_bk = torch.exp(-0.5 * (offsets.view(1, -1) / sigma) ** 2)
    kernel_bk = kernel_bk / kernel_bk.sum(dim=1, keepdim=True)
    kernel = kernel_bk.repeat_interleave(c, dim=0)  # one kernel per (image, channel)
    flat = x_bchw.reshape(1, b * c, h, w)
    pad = size // 2
    flat = F.conv2d(F.pad(flat, (pad, pad, 0, 0), mode="reflect"), kernel.view(b * c, 1, 1, size),
                    groups=b * c)
    flat = F.conv2d(F.pad(flat, (0, 0, pad, pad), mode="reflect"), kernel.view(b * c, 1, size, 1),
                    groups=b * c)
    return flat.reshape(b, c, h, w)


def apply_photometric_torch(
    x_bchw: torch.Tensor, params_bp: torch.Tensor, threshold: int = 128
) -> torch.Tensor:
    """Apply each image's parameters to a float batch in [0, 1], on whatever device it is on."""
    p = params_bp.to(device=x_bchw.device, dtype=x_bchw.dtype)
    view = lambda column: p[:, column].view(-1, 1, 1, 1)  # noqa: E731
    x = (x_bchw * view(0)).clamp(0, 1)
    mean = _gray(x).mean(dim=(1, 2, 3), keepdim=True)
    x = ((x - mean) * view(1) + mean).clamp(0, 1)
    gray = _gray(x)
    x = ((x - gray) * view(2) + gray).clamp(0, 1)
    shift = p[:, 3]
    if bool((shift != 0).any()):
        hsv = _rgb_to_hsv(x)
        hue = (hsv[:, 0] + shift.view(-1, 1, 1)) % 1.0
        x = _hsv_to_rgb(torch.stack([hue, hsv[:, 1], hsv[:, 2]], dim=1))
    x = torch.where(view(4) > 0, _gray(x).expand_as(x), x)
    sigma = p[:, 5]
    blurred_rows = sigma > 0
    if bool(blurred_rows.any()):
        x = x.clone()
        x[blurred_rows] = _gaussian_blur(x[blurred_rows], sigma[blurred_rows])
    solarized = torch.where(x >= threshold / 255.0, 1.0 - x, x)
    return torch.where(view(6) > 0, solarized, x)

