"""Bad image files are refused with a drop reason, never a crash: empty, truncated and
mislabelled files, decompression bombs, animated and multi-page files, unusual colour modes,
EXIF orientations (valid and broken), and random corruption. Every input is built with PIL from
scikit-image's sample photographs, so the pixels are real and nothing is downloaded.
"""

from __future__ import annotations

import functools
import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from pipelines.sample_images import sample_photograph_dir
from pipelines.views.augment import AugmentConfig, ViewSpec, make_views
from pipelines.views.decode import Rejected, decode_image, open_image
from pipelines.views.quality import DROP_REASONS, QualityConfig

pytestmark = pytest.mark.reliability

MAX_PIXELS = QualityConfig().max_pixels
ORIENTATION = 0x0112
# What PIL's exif_transpose does for each EXIF orientation that rotates.
UPRIGHT = {3: Image.Transpose.ROTATE_180, 6: Image.Transpose.ROTATE_270,
           8: Image.Transpose.ROTATE_90}


@functools.cache
def _file_bytes(name: str) -> bytes:
    return (sample_photograph_dir() / name).read_bytes()


def _photograph(name: str) -> Image.Image:
    with Image.open(io.BytesIO(_file_bytes(name))) as image:
        return image.convert("RGB")


def _encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def _reason(data: bytes, max_pixels: int = MAX_PIXELS) -> str:
    with pytest.raises(Rejected) as caught:
        decode_image(data, max_pixels)
    return caught.value.reason


def _pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.int32)


def _mean_abs_diff(a: Image.Image, b: Image.Image) -> float:
    assert a.size == b.size
    return float(np.abs(_pixels(a) - _pixels(b)).mean())


def _png_declaring(width: int, height: int) -> bytes:
    """astronaut.png with its IHDR rewritten to declare another size (the pixels stay small)."""
    data = bytearray(_file_bytes("astronaut.png"))
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def _jpeg_declaring(width: int, height: int) -> bytes:
    """rocket.jpg with its start-of-frame rewritten to declare another size."""
    data = bytearray(_file_bytes("rocket.jpg"))
    at = 2
    while data[at + 1] not in (0xC0, 0xC1, 0xC2):  # baseline, extended, progressive
        at += 2 + int.from_bytes(data[at + 2:at + 4], "big")
    data[at + 5:at + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def _with_app1(jpeg: bytes, payload: bytes) -> bytes:
    """``jpeg`` with an APP1 (EXIF) segment holding ``payload`` right after its SOI marker."""
    segment = b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload
    return jpeg[:2] + segment + jpeg[2:]


# --- unreadable files -------------------------------------------------------------------------


def test_zero_byte_file_is_rejected_as_unreadable():
    assert _reason(b"") == "unreadable"


@pytest.mark.parametrize("name", ["rocket.jpg", "astronaut.png"])
@pytest.mark.parametrize("keep", [0.1, 0.5, 0.95])
def test_truncated_file_is_rejected_as_unreadable(name, keep):
    data = _file_bytes(name)
    assert _reason(data[: int(len(data) * keep)]) == "unreadable"


@pytest.mark.parametrize("text", [
    b"<!DOCTYPE html><html><body><h1>404 Not Found</h1></body></html>",
    b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>AccessDenied</Code>'
    b"<Message>Access Denied</Message></Error>",
    "un fichier texte, pas une image\n".encode("utf-8"),
])
def test_text_or_html_saved_as_an_image_is_rejected_as_unreadable(text):
    assert _reason(text) == "unreadable"


def test_png_bytes_in_a_file_named_jpg_decode_by_content(tmp_path):
    source = _photograph("coffee.png")
    path = tmp_path / "coffee.jpg"
    path.write_bytes(_encode(source, "PNG"))
    image, size = decode_image(path.read_bytes(), MAX_PIXELS)
    assert size == source.size
    assert np.array_equal(_pixels(image), _pixels(source))  # lossless: read as PNG, not JPEG


# --- decompression bombs and size limits ------------------------------------------------------


@pytest.mark.parametrize("bomb", [
    pytest.param(lambda: _png_declaring(100_000, 100_000), id="png-100000x100000"),
    pytest.param(lambda: _jpeg_declaring(65_000, 65_000), id="jpeg-65000x65000"),
])
def test_small_file_declaring_a_huge_size_is_rejected_as_too_large(bomb):
    data = bomb()
    assert len(data) < 1_000_000  # the file is small; only its header claims billions of pixels
    assert _reason(data) == "too_large"
    with pytest.raises(Rejected) as caught:
        open_image(data, MAX_PIXELS)  # refused on the header alone, before any pixel is decoded
    assert caught.value.reason == "too_large"


def test_image_above_max_pixels_is_too_large_and_one_at_the_limit_decodes():
    data = _file_bytes("coffee.png")  # 600 x 400
    assert _reason(data, max_pixels=600 * 400 - 1) == "too_large"
    image, size = decode_image(data, max_pixels=600 * 400)
    assert image.size == size == (600, 400)


# --- animated and multi-page files ------------------------------------------------------------


@pytest.mark.parametrize("fmt, options, tolerance", [
    ("GIF", {"duration": 100, "loop": 0}, 12.0),  # 256-colour palette per frame
    ("TIFF", {}, 0.0),
    ("WEBP", {"lossless": True, "duration": 100}, 0.0),
])
def test_animated_or_multi_page_file_decodes_its_first_frame(fmt, options, tolerance):
    frames = [_photograph(name).resize((160, 120)) for name in
              ("astronaut.png", "coffee.png", "chelsea.png")]
    data = _encode(frames[0], fmt, save_all=True, append_images=frames[1:], **options)
    with Image.open(io.BytesIO(data)) as written:
        assert written.n_frames == 3
    image, size = decode_image(data, MAX_PIXELS)
    assert image.mode == "RGB" and image.size == size == (160, 120)
    distances = [_mean_abs_diff(image, frame) for frame in frames]
    assert distances[0] <= tolerance
    assert min(distances[1:]) > 30  # clearly not the second or third photograph


def test_multi_page_tiff_shipped_with_scikit_image_decodes_its_first_page():
    data = _file_bytes("multipage.tif")
    with Image.open(io.BytesIO(data)) as pages:
        assert pages.n_frames > 1
        first_page = pages.convert("RGB")
    image, _ = decode_image(data, MAX_PIXELS)
    assert np.array_equal(_pixels(image), _pixels(first_page))


# --- colour modes -----------------------------------------------------------------------------


def _astronaut_grey_16bit() -> Image.Image:
    grey = np.asarray(_photograph("astronaut.png").convert("L"), dtype=np.uint16)
    return Image.fromarray(grey * 64 + 1000)  # values 1000..17320: far outside 0..255


MODES = {
    # name: (how to build it from the RGB photograph, compared against, max mean |difference|)
    "cmyk-jpeg": (lambda rgb: _encode(rgb.convert("CMYK"), "JPEG", quality=95), "rgb", 3.0),
    "cmyk-tiff": (lambda rgb: _encode(rgb.convert("CMYK"), "TIFF"), "rgb", 1.0),
    "ycbcr-tiff": (lambda rgb: _encode(rgb.convert("YCbCr"), "TIFF"), "rgb", 2.0),
    "palette-png": (lambda rgb: _encode(rgb.convert("P", palette=Image.Palette.ADAPTIVE), "PNG"),
                    "rgb", 5.0),
    "grey-png": (lambda rgb: _encode(rgb.convert("L"), "PNG"), "grey", 0.0),
    "grey-alpha-png": (lambda rgb: _encode(rgb.convert("LA"), "PNG"), "grey", 0.0),
    "grey-16bit-png": (lambda rgb: _encode(_astronaut_grey_16bit(), "PNG"), "grey", 1.0),
    "grey-16bit-tiff": (lambda rgb: _encode(_astronaut_grey_16bit(), "TIFF"), "grey", 1.0),
    "grey-32bit-int-tiff": (lambda rgb: _encode(_astronaut_grey_16bit().convert("I"), "TIFF"),
                            "grey", 1.0),
    "grey-float-tiff": (lambda rgb: _encode(
        Image.fromarray(np.asarray(rgb.convert("L"), dtype=np.float32) / 255 - 0.5), "TIFF"),
        "grey", 1.0),
}


@pytest.mark.parametrize("mode", MODES)
def test_unusual_colour_mode_decodes_to_rgb_close_to_the_photograph(mode):
    build, reference, tolerance = MODES[mode]
    source = _photograph("astronaut.png")  # its grey levels span the full 0..255
    image, size = decode_image(build(source), MAX_PIXELS)
    pixels = np.asarray(image)
    assert image.mode == "RGB" and pixels.dtype == np.uint8
    assert image.size == size == source.size
    expected = source if reference == "rgb" else source.convert("L").convert("RGB")
    assert _mean_abs_diff(image, expected) <= tolerance


def test_16bit_greyscale_is_scaled_to_0_255_not_clipped():
    data = _encode(_astronaut_grey_16bit(), "PNG")
    with Image.open(io.BytesIO(data)) as written:
        assert written.mode == "I;16"
    pixels = np.asarray(decode_image(data, MAX_PIXELS)[0])
    # Clipping to 8 bits would leave a white image: every value is at least 1000.
    assert pixels.min() == 0 and pixels.max() == 255
    assert len(np.unique(pixels)) > 200


def test_transparent_pixels_become_white():
    source = _photograph("astronaut.png")
    rgba = np.asarray(source.convert("RGBA")).copy()
    rgba[:100, :150, 3] = 0  # a fully transparent corner
    image, _ = decode_image(_encode(Image.fromarray(rgba), "PNG"), MAX_PIXELS)
    pixels = _pixels(image)
    assert (pixels[:100, :150] == 255).all()
    assert np.array_equal(pixels[100:], _pixels(source)[100:])  # opaque pixels untouched


def test_grey_with_transparency_turns_transparent_pixels_white():
    grey_alpha = np.asarray(_photograph("astronaut.png").convert("LA")).copy()
    grey_alpha[-80:, -80:, 1] = 0
    image, _ = decode_image(_encode(Image.fromarray(grey_alpha), "PNG"), MAX_PIXELS)
    pixels = _pixels(image)
    assert (pixels[-80:, -80:] == 255).all()
    assert np.array_equal(pixels[0, :, 0], grey_alpha[0, :, 0])


def test_palette_transparency_becomes_white_and_other_colours_stay():
    palette = _photograph("astronaut.png").quantize(colors=255)  # index 255 left unused
    palette_image = palette.copy()
    palette_image.putpalette(palette.getpalette() + [0, 0, 0])  # index 255: black, then clear
    palette_image.paste(255, (0, 0, 64, 64))
    data = _encode(palette_image, "PNG", transparency=255)
    with Image.open(io.BytesIO(data)) as written:
        assert written.mode == "P" and "transparency" in written.info
    pixels = _pixels(decode_image(data, MAX_PIXELS)[0])
    assert (pixels[:64, :64] == 255).all()
    assert np.array_equal(pixels[64:], _pixels(palette.convert("RGB"))[64:])


# --- EXIF orientation -------------------------------------------------------------------------


def _with_orientation(image: Image.Image, fmt: str, orientation: int) -> bytes:
    exif = Image.Exif()
    exif[ORIENTATION] = orientation
    options = {"quality": 95} if fmt == "JPEG" else {}
    return _encode(image, fmt, exif=exif.tobytes(), **options)


@pytest.mark.parametrize("fmt, tolerance", [("JPEG", 3.0), ("PNG", 0.0), ("TIFF", 0.0)])
@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_exif_orientation_is_applied_and_the_reported_size_is_upright(fmt, tolerance, orientation):
    source = _photograph("rocket.jpg")  # 640 x 427: landscape
    upright = source.transpose(UPRIGHT[orientation])
    data = _with_orientation(source, fmt, orientation)
    image, size = decode_image(data, MAX_PIXELS)
    expected_size = (427, 640) if orientation in (6, 8) else (640, 427)
    assert image.size == size == expected_size
    assert open_image(data, MAX_PIXELS)[1] == expected_size  # what crops are planned on
    assert _mean_abs_diff(image, upright) <= tolerance


@pytest.mark.parametrize("orientation", [6, 8])
def test_reduced_jpeg_decode_of_a_rotated_photo_is_upright(orientation):
    source = _photograph("rocket.jpg")
    data = _with_orientation(source, "JPEG", orientation)
    image, size = decode_image(data, MAX_PIXELS, reduce_to=lambda full: (full[0] // 4,
                                                                         full[1] // 4))
    assert size == (427, 640)
    assert image.size == (107, 160)  # a quarter of the upright size, decoded at 1/4 scale
    expected = source.transpose(UPRIGHT[orientation]).resize(image.size, Image.Resampling.BOX)
    assert _mean_abs_diff(image, expected) <= 6.0


BROKEN_EXIF = {
    "garbage": b"Exif\0\0" + b"\xde\xad\xbe\xef" * 8,
    "cut-after-byte-order": b"Exif\0\0MM",
    "first-directory-past-the-end": b"Exif\0\0MM\0\x2a" + struct.pack(">I", 1_000_000),
    "entry-count-past-the-end": b"Exif\0\0MM\0\x2a" + struct.pack(">IH", 8, 0xFFFF) + b"\0" * 12,
    "orientation-as-text": b"Exif\0\0MM\0\x2a" + struct.pack(">IHHHII", 8, 1, ORIENTATION, 2, 4,
                                                             0x41424300) + b"\0" * 4,
    "orientation-99": b"Exif\0\0MM\0\x2a" + struct.pack(">IHHHIHH", 8, 1, ORIENTATION, 3, 1, 99,
                                                        0) + b"\0" * 4,
}


@pytest.mark.filterwarnings("ignore:Corrupt EXIF data")  # PIL says so, and goes on
@pytest.mark.parametrize("reduced", [False, True], ids=["full", "reduced"])
@pytest.mark.parametrize("broken", BROKEN_EXIF)
def test_broken_exif_block_does_not_stop_the_photo_from_decoding(broken, reduced):
    source = _photograph("rocket.jpg")
    data = _with_app1(_encode(source, "JPEG", quality=95), BROKEN_EXIF[broken])
    reduce_to = (lambda full: (full[0] // 2, full[1] // 2)) if reduced else None
    image, size = decode_image(data, MAX_PIXELS, reduce_to=reduce_to)
    assert size == (640, 427)  # no orientation applied
    expected = source.resize(image.size, Image.Resampling.BOX) if reduced else source
    assert _mean_abs_diff(image, expected) <= 6.0


# --- random corruption ------------------------------------------------------------------------


def _corrupted(data: bytes, rng: np.random.Generator) -> bytes:
    """``data`` with a few random bytes overwritten and, half the time, cut short."""
    damaged = bytearray(data)
    for at in rng.integers(0, len(damaged), int(rng.integers(1, 16))):
        damaged[at] = int(rng.integers(0, 256))
    if rng.random() < 0.5:
        damaged = damaged[: int(rng.integers(1, len(damaged)))]
    return bytes(damaged)


@pytest.mark.parametrize("name", ["rocket.jpg", "coffee.png"])
@pytest.mark.parametrize("seed", range(6))
def test_corrupted_bytes_decode_to_rgb_or_are_rejected_with_a_reason(name, seed):
    rng = np.random.default_rng(seed)
    quality = QualityConfig()
    for _ in range(5):
        data = _corrupted(_file_bytes(name), rng)
        try:
            image, _ = decode_image(data, MAX_PIXELS)
            assert image.mode == "RGB" and min(image.size) > 0
        except Rejected as rejected:
            assert rejected.reason in DROP_REASONS
        try:
            views = make_views(data, rng, 64, AugmentConfig(), quality)
            assert views["view_a"].shape == (64, 64, 3)
        except Rejected as rejected:
            assert rejected.reason in DROP_REASONS


# --- the training stream's view of bad files --------------------------------------------------


def _blank_photo() -> bytes:
    photo = np.asarray(_photograph("coffee.png"))
    return _encode(Image.fromarray(np.full_like(photo, photo[200, 300])), "PNG")


@pytest.mark.parametrize("build, reason", [
    pytest.param(lambda: b"", "unreadable", id="empty"),
    pytest.param(lambda: _file_bytes("rocket.jpg")[:5000], "unreadable", id="truncated-jpeg"),
    pytest.param(lambda: b"<html><body>Service Unavailable</body></html>", "unreadable",
                 id="html-error-page"),
    pytest.param(lambda: _png_declaring(100_000, 100_000), "too_large", id="bomb"),
    pytest.param(lambda: _encode(_photograph("rocket.jpg").resize((48, 32)), "JPEG"),
                 "too_small", id="thumbnail"),
    pytest.param(lambda: _encode(_photograph("rocket.jpg").crop((0, 0, 640, 100)), "JPEG"),
                 "extreme_aspect_ratio", id="strip"),
    pytest.param(_blank_photo, "blank", id="one-colour"),
])
def test_views_of_a_bad_file_are_refused_with_its_drop_reason(build, reason):
    with pytest.raises(Rejected) as caught:
        make_views(build(), np.random.default_rng(0), 64, AugmentConfig(), QualityConfig())
    assert caught.value.reason == reason


@pytest.mark.parametrize("fmt", ["JPEG", "TIFF"])
def test_views_of_a_rotated_photo_are_cut_from_the_upright_image(fmt):
    # Full-image crops with the upright aspect ratio: each view is the whole upright photo.
    full_crop = {"scale": (1.0, 1.0), "ratio": (427 / 640, 427 / 640), "flip_p": 0.0}
    augment = AugmentConfig(photometric_on="device")
    specs = [ViewSpec(name=name, crop=full_crop, photometric=name != "view_mae")
             for name in ("view_a", "view_b", "view_mae")]
    source = _photograph("rocket.jpg")
    data = _with_orientation(source, fmt, 6)
    views = make_views(data, np.random.default_rng(0), 64, augment, QualityConfig(), specs)
    expected = np.asarray(source.transpose(UPRIGHT[6]).resize((64, 64), Image.Resampling.BILINEAR),
                          dtype=np.int32)
    for name in ("view_a", "view_b", "view_mae"):
        assert np.abs(views[name].astype(np.int32) - expected).mean() <= 6.0
