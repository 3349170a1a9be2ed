"""SimCLR's photometric augmentation, with parameters drawn once and applied in either place.

The parameters of every view are drawn in the data stage by ``sample_photometric`` (one float32
row per view, fields in ``PHOTOMETRIC_FIELDS``). They are then applied either there, on the CPU,
to PIL images (``apply_photometric_pil``), or later to a whole batch on the training worker's
device (``apply_photometric_torch``). Both apply the same operations in the same order to the
same parameters, so where augmentation runs changes the cost, not the distribution.

Order: colour jitter (brightness, contrast, saturation, hue; applied together with probability
``jitter_p``) and grayscale, composed into one affine colour map clamped once; then Gaussian blur,
then solarisation. Hue is a rotation of the YIQ chroma plane (angle 2*pi*hue), which keeps luma.
"""

from __future__ import annotations

from typing import Annotated

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageFilter, ImageOps, ImageStat
from pydantic import Field, model_validator

from pipelines.settings import StrictSection

PHOTOMETRIC_FIELDS = (
    "brightness", "contrast", "saturation", "hue", "grayscale", "blur_sigma", "solarize"
)
# Identity parameters: what a view gets when no photometric operation fires.
IDENTITY = np.array([1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0], dtype=np.float32)

Unit = Annotated[float, Field(ge=0, le=1)]


class PhotometricConfig(StrictSection):
    """Strengths and probabilities (SimCLR's defaults at colour strength 0.5, as in BYOL)."""

    jitter_p: Unit = Field(
        0.8,
        description=("Probability of colour jitter (brightness, contrast, saturation, hue in "
        "random order)."))
    brightness: Annotated[float, Field(ge=0, lt=1)] = Field(
        0.4,
        description="Colour jitter: the brightness factor is drawn from [1 - b, 1 + b].")
    contrast: Annotated[float, Field(ge=0, lt=1)] = Field(
        0.4,
        description="Colour jitter: the contrast factor is drawn from [1 - c, 1 + c].")
    saturation: Annotated[float, Field(ge=0, lt=1)] = Field(
        0.2,
        description="Colour jitter: the saturation factor is drawn from [1 - s, 1 + s].")
    hue: Annotated[float, Field(ge=0, le=0.5)] = Field(
        0.1,
        description=("Colour jitter: the hue shift is drawn from [-h, h] (a fraction of the "
        "colour circle)."))
    grayscale_p: Unit = Field(
        0.2,
        description="Probability of converting the view to grey levels.")
    blur_p: Unit = Field(
        0.5,
        description="Probability of a Gaussian blur.")
    # Standard deviation in pixels at 224 px; scaled with the training resolution.
    blur_sigma: tuple[Annotated[float, Field(gt=0)], Annotated[float, Field(gt=0)]] = Field(
        (0.1, 2.0),
        description=("Range of the blur's standard deviation in pixels at 224 px (scaled with the"
        " training resolution)."))
    solarize_p: Unit = Field(
        0.0,
        description="Probability of solarisation.")
    solarize_threshold: Annotated[int, Field(ge=0, le=255)] = Field(
        128,
        description="Solarisation inverts the pixel values above this (0-255).")

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


# RGB <-> YIQ: hue is rotated in the I-Q chroma plane, which keeps luma (Y) fixed.
_RGB_TO_YIQ = np.array([[0.299, 0.587, 0.114],
                        [0.596, -0.274, -0.322],
                        [0.211, -0.523, 0.312]])
_YIQ_TO_RGB = np.linalg.inv(_RGB_TO_YIQ)


def color_matrices(params_bp: np.ndarray) -> np.ndarray:
    """The colour jitter and grayscale of each view as one 3x3 matrix, (B, 3, 3) float64.

    Brightness b, contrast c, saturation s, hue h and grayscale g compose to
    ``x -> M x + (1 - c) * b * mean_luma``, where ``M = G H S c b`` (S blends with luma, H rotates
    chroma by 2*pi*h, G projects to luma). Computing one affine map, clamped once, is what lets
    both the CPU and the device apply the whole jitter in one pass over the pixels.
    """
    params_bp = np.atleast_2d(params_bp).astype(np.float64)
    b, c, s, h, g = (params_bp[:, i] for i in range(5))
    luma = _RGB_TO_YIQ[0]
    ones_luma = np.outer(np.ones(3), luma)
    eye = np.eye(3)
    saturation = s[:, None, None] * eye + (1 - s)[:, None, None] * ones_luma
    angle = 2 * np.pi * h
    rotation = np.zeros((len(h), 3, 3))
    rotation[:, 0, 0] = 1
    rotation[:, 1, 1] = rotation[:, 2, 2] = np.cos(angle)
    rotation[:, 1, 2] = -np.sin(angle)
    rotation[:, 2, 1] = np.sin(angle)
    hue = _YIQ_TO_RGB @ rotation @ _RGB_TO_YIQ
    gray = np.where(g[:, None, None] > 0, ones_luma, eye)
    return gray @ hue @ saturation * (c * b)[:, None, None]


def color_offsets(params_bp: np.ndarray, mean_luma_b: np.ndarray) -> np.ndarray:
    """The constant term of the colour map, per view (same units as ``mean_luma_b``)."""
    params_bp = np.atleast_2d(params_bp).astype(np.float64)
    return (1 - params_bp[:, 1]) * params_bp[:, 0] * mean_luma_b


def apply_photometric_pil(image: Image.Image, params: np.ndarray, threshold: int = 128) -> Image.Image:
    """Apply one view's parameters to an RGB PIL image on the CPU."""
    brightness, contrast, saturation, hue, grayscale, sigma, solarize = params.tolist()
    if (brightness, contrast, saturation, hue, grayscale) != (1.0, 1.0, 1.0, 0.0, 0.0):
        mean_rgb = np.array(ImageStat.Stat(image).mean)
        matrix = color_matrices(params)[0]
        offset = float(color_offsets(params, np.array([_RGB_TO_YIQ[0] @ mean_rgb]))[0])
        affine = np.concatenate([matrix, np.full((3, 1), offset)], axis=1)
        image = image.convert("RGB", tuple(affine.ravel().tolist()))  # clamps to 0..255
    if sigma > 0:
        image = image.filter(ImageFilter.GaussianBlur(radius=sigma))
    if solarize:
        image = ImageOps.solarize(image, threshold)
    return image


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
    params = np.asarray(params_bp.detach().cpu(), dtype=np.float64)
    luma = torch.tensor(_RGB_TO_YIQ[0], device=x_bchw.device, dtype=x_bchw.dtype)
    mean_luma = torch.einsum("c,bchw->b", luma, x_bchw) / (x_bchw.shape[2] * x_bchw.shape[3])
    matrix = torch.as_tensor(color_matrices(params), device=x_bchw.device, dtype=x_bchw.dtype)
    b, c = (torch.as_tensor(params[:, i], device=x_bchw.device, dtype=x_bchw.dtype)
            for i in (0, 1))
    offset = ((1 - c) * b * mean_luma).view(-1, 1, 1, 1)
    x = (torch.einsum("bij,bjhw->bihw", matrix, x_bchw) + offset).clamp(0, 1)
    sigma = torch.as_tensor(params[:, 5], device=x.device, dtype=x.dtype)
    blurred_rows = sigma > 0
    if bool(blurred_rows.any()):
        x = x.clone()
        x[blurred_rows] = _gaussian_blur(x[blurred_rows], sigma[blurred_rows])
    solarize = torch.as_tensor(params[:, 6], device=x.device).view(-1, 1, 1, 1) > 0
    return torch.where(solarize & (x >= threshold / 255.0), 1.0 - x, x)
