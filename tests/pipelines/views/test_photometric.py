"""Photometric augmentation: one set of parameters, the same result on the CPU and the device."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines.views.photometric import (
    IDENTITY,
    apply_photometric_pil,
    apply_photometric_torch,
    color_matrices,
)


def _params(**values):
    fields = ("brightness", "contrast", "saturation", "hue", "grayscale", "blur_sigma", "solarize")
    params = IDENTITY.copy()
    for name, value in values.items():
        params[fields.index(name)] = value
    return params


def _image():
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (48, 48, 3), dtype=np.uint8))


def test_identity_parameters_leave_the_image_unchanged():
    image = _image()
    assert np.array_equal(np.asarray(apply_photometric_pil(image, IDENTITY)), np.asarray(image))
    x = torch.from_numpy(np.asarray(image)).permute(2, 0, 1)[None].float() / 255
    torch.testing.assert_close(apply_photometric_torch(x, torch.from_numpy(IDENTITY)[None]), x)


def test_grayscale_and_zero_saturation_give_equal_channels():
    for params in (_params(grayscale=1.0), _params(saturation=0.0)):
        out = np.asarray(apply_photometric_pil(_image(), params)).astype(int)
        assert np.abs(out[..., 0] - out[..., 1]).max() <= 1
        assert np.abs(out[..., 1] - out[..., 2]).max() <= 1


def test_hue_rotation_keeps_luma_and_brightness_scales():
    luma = np.array([0.299, 0.587, 0.114])
    for hue in (-0.1, 0.05, 0.25):
        matrix = color_matrices(_params(hue=hue))[0]
        np.testing.assert_allclose(luma @ matrix, luma, atol=1e-9)
    np.testing.assert_allclose(color_matrices(_params(brightness=1.3))[0], 1.3 * np.eye(3), atol=1e-9)


def test_solarize_inverts_bright_pixels_only():
    image = Image.fromarray(np.array([[[10, 200, 128]]], dtype=np.uint8))
    out = np.asarray(apply_photometric_pil(image, _params(solarize=1.0)))
    assert out.tolist() == [[[10, 55, 127]]]
    x = torch.tensor([10, 200, 128], dtype=torch.float).view(1, 3, 1, 1) / 255
    y = apply_photometric_torch(x, torch.from_numpy(_params(solarize=1.0))[None])
    assert (y.flatten() * 255).round().tolist() == [10, 55, 127]


def test_photometric_on_device_matches_the_data_stage(photographs):
    """Same seed, same parameters: the device path reproduces the CPU path's images."""
    from pipelines.views.augment import AugmentConfig, make_views
    from pipelines.views.quality import QualityConfig

    photometric = {"jitter_p": 1.0, "grayscale_p": 0.3, "blur_p": 0.7, "solarize_p": 0.3}
    on_data = AugmentConfig.model_validate({"photometric": photometric, "photometric_on": "data"})
    on_device = AugmentConfig.model_validate({"photometric": photometric,
                                              "photometric_on": "device"})
    differences = []
    for i, photo in enumerate(photographs[:12]):
        buffer = io.BytesIO()
        photo.save(buffer, format="PNG")
        data = buffer.getvalue()
        cpu = make_views(data, np.random.default_rng(i), 96, on_data, QualityConfig())
        dev = make_views(data, np.random.default_rng(i), 96, on_device, QualityConfig())
        assert np.array_equal(cpu["view_mae"], dev["view_mae"])  # same crops
        for name in ("view_a", "view_b"):
            x = torch.from_numpy(dev[name]).permute(2, 0, 1).unsqueeze(0).float() / 255
            params = torch.from_numpy(dev[f"{name}_photometric"]).unsqueeze(0)
            y = apply_photometric_torch(x, params)[0].permute(1, 2, 0).numpy() * 255
            differences.append(np.abs(y - cpu[name].astype(np.float32)).mean())
    assert np.mean(differences) < 2.0 and np.max(differences) < 6.0


def test_photometric_parameters_follow_the_configured_distribution():
    from pipelines.views.photometric import PhotometricConfig, sample_photometric

    config = PhotometricConfig(jitter_p=0.8, grayscale_p=0.2, blur_p=0.5, solarize_p=0.1)
    rng = np.random.default_rng(0)
    params = np.stack([sample_photometric(rng, config, 224) for _ in range(4000)])
    jittered = params[:, 0] != 1.0
    assert jittered.mean() == pytest.approx(0.8, abs=0.03)
    assert params[jittered, 0].min() >= 0.6 and params[jittered, 0].max() <= 1.4
    assert np.abs(params[:, 3]).max() <= 0.1
    assert params[:, 4].mean() == pytest.approx(0.2, abs=0.03)
    blurred = params[:, 5] > 0
    assert blurred.mean() == pytest.approx(0.5, abs=0.03)
    assert params[blurred, 5].min() >= 0.1 and params[blurred, 5].max() <= 2.0
    assert params[:, 6].mean() == pytest.approx(0.1, abs=0.02)




def test_views_with_their_own_photometric_settings_get_them(photographs):
    """BYOL's asymmetric views and DINO's small local crops, cut by the data stage: view 1
    always blurred and never solarised, view 2 rarely blurred and sometimes solarised, the
    local crop at its own size."""
    from pipelines.views.augment import AugmentConfig, CropConfig, ViewSpec, make_views
    from pipelines.views.quality import QualityConfig
    from ssl_train.objectives.byol import asymmetric_views

    views = [*asymmetric_views(CropConfig()),
             ViewSpec(name="view_local_1", photometric=True, size=32,
                      photometric_overrides={"blur_p": 0.5})]
    augment = AugmentConfig(photometric_on="device")  # parameters travel with the views
    buffer = io.BytesIO()
    photographs[0].resize((128, 128)).save(buffer, format="PNG")
    rng = np.random.default_rng(0)
    rows = [make_views(buffer.getvalue(), rng, 64, augment, QualityConfig(min_side=16), views)
            for _ in range(400)]
    blurred = {name: np.mean([row[f"{name}_photometric"][5] > 0 for row in rows])
               for name in ("view_1", "view_2", "view_local_1")}
    solarised = {name: np.mean([row[f"{name}_photometric"][6] > 0 for row in rows])
                 for name in ("view_1", "view_2")}
    assert blurred["view_1"] == 1.0 and solarised["view_1"] == 0.0
    assert blurred["view_2"] == pytest.approx(0.1, abs=0.05)
    assert solarised["view_2"] == pytest.approx(0.2, abs=0.06)
    assert blurred["view_local_1"] == pytest.approx(0.5, abs=0.08)
    assert rows[0]["view_local_1"].shape == (32, 32, 3) and rows[0]["view_1"].shape == (64, 64, 3)
    with pytest.raises(ValueError, match="unknown fields blur"):
        ViewSpec(name="view_x", photometric=True, photometric_overrides={"blur": 1.0})
    with pytest.raises(ValueError, match="need photometric: true"):
        ViewSpec(name="view_x", photometric_overrides={"blur_p": 1.0})
