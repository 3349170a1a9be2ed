"""Quality filtering: why an image is dropped, per sample and across a whole input.

Per-sample checks (unreadable, too large to decode safely, too small, extreme aspect ratio,
near-constant) run both at ingest and in the training stream; duplicate detection (exact content
hash, perceptual hash within a Hamming distance) runs at ingest, globally over the input. Every
drop has a reason from ``DROP_REASONS``; nothing is dropped silently. No I/O here.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from typing import Annotated

import numpy as np
from PIL import Image
from pydantic import Field

from pipelines.settings import StrictSection

UNREADABLE = "unreadable"
TOO_LARGE = "too_large"
TOO_SMALL = "too_small"
EXTREME_ASPECT_RATIO = "extreme_aspect_ratio"
BLANK = "blank"
EXACT_DUPLICATE = "exact_duplicate"
NEAR_DUPLICATE = "near_duplicate"
# Ingest only: the object could not be read at all (gone since listing, access denied); an
# outage (storage failing for everything) stops the ingest instead.
READ_FAILED = "read_failed"
DROP_REASONS = (
    UNREADABLE, TOO_LARGE, TOO_SMALL, EXTREME_ASPECT_RATIO, BLANK, EXACT_DUPLICATE,
    NEAR_DUPLICATE, READ_FAILED,
)


class QualityConfig(StrictSection):
    """Thresholds of the quality filters."""

    min_side: Annotated[int, Field(ge=1)] = Field(
        64,
        description="Images whose shorter side is smaller than this, in pixels, are dropped.")
    max_aspect_ratio: Annotated[float, Field(ge=1)] = Field(
        4.0,
        description=("Images longer than this many times their width (or wider than high) are "
        "dropped."))
    # Standard deviation of the grey levels (0-255) of a ~32 px thumbnail; below it, an image is
    # blank (a solid colour, an all-black frame, a placeholder).
    min_pixel_std: Annotated[float, Field(ge=0)] = Field(
        2.0,
        description=("Standard deviation of the grey levels (0-255) of a ~32 px thumbnail; below "
        "it an image is blank and dropped."))
    # Declared width x height above this is refused before decoding (decompression bombs).
    max_pixels: Annotated[int, Field(ge=1)] = Field(
        178_956_970,
        description=("Declared width x height above this is refused before decoding "
        "(decompression bombs)."))
    # Perceptual hashes (64 bits) at most this many bits apart are near duplicates (ingest only).
    near_duplicate_distance: Annotated[int, Field(ge=0, le=16)] = Field(
        6,
        description=("Perceptual hashes (64 bits) at most this many bits apart are near "
        "duplicates (ingest only)."))


def size_reason(width: int, height: int, config: QualityConfig) -> str | None:
    """The drop reason that the image's size alone decides, if any."""
    if width * height > config.max_pixels:
        return TOO_LARGE
    if min(width, height) < config.min_side:
        return TOO_SMALL
    if max(width, height) / max(1, min(width, height)) > config.max_aspect_ratio:
        return EXTREME_ASPECT_RATIO
    return None


def is_blank(image: Image.Image, config: QualityConfig) -> bool:
    """True for near-constant images (a ~32 px grey thumbnail with almost no variation)."""
    factor = max(1, min(image.size) // 32)
    thumbnail = (image.reduce(factor) if factor > 1 else image).convert("L")  # box-filtered
    return float(np.asarray(thumbnail, dtype=np.float32).std()) < config.min_pixel_std


def content_hash(data: bytes) -> str:
    """SHA-256 of the file's bytes: equal for exact copies."""
    return hashlib.sha256(data).hexdigest()


def perceptual_hash(image: Image.Image) -> int:
    """64-bit DCT perceptual hash: close in Hamming distance for resized or re-encoded copies."""
    import imagehash  # ingest's alone: the training side (and the GPU check) runs without it

    return int(str(imagehash.phash(image, hash_size=8)), 16)


def _popcount64(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.uint64)
    count = np.zeros(x.shape, dtype=np.int64)
    for shift in range(0, 64, 8):
        count += _BYTE_POPCOUNT[((x >> np.uint64(shift)) & np.uint64(0xFF)).astype(np.int64)]
    return count


_BYTE_POPCOUNT = np.array([bin(i).count("1") for i in range(256)], dtype=np.int64)


def near_duplicate_pairs(hashes: list[int], max_distance: int) -> list[tuple[int, int]]:
    """Index pairs (i < j) whose hashes are at most ``max_distance`` bits apart.

    Multi-index hashing: split the 64 bits into max_distance + 1 bands; two hashes that close
    must agree exactly on at least one band (pigeonhole), so only hashes sharing a band value are
    compared. Runs in about O(n log n) for natural images instead of O(n^2).
    """
    values = np.array(hashes, dtype=np.uint64)
    if len(values) < 2:
        return []
    bands = max_distance + 1
    edges = np.linspace(0, 64, bands + 1).astype(int)
    pairs: set[tuple[int, int]] = set()
    for lo, hi in zip(edges[:-1], edges[1:]):
        band = ((values >> np.uint64(lo)) & np.uint64((1 << (hi - lo)) - 1)).astype(np.int64)
        groups: dict[int, list[int]] = defaultdict(list)
        for index, value in enumerate(band.tolist()):
            groups[value].append(index)
        for members in groups.values():
            if len(members) < 2:
                continue
            idx = np.array(members)
            distances = _popcount64(values[idx][:, None] ^ values[idx][None, :])
            for a, b in zip(*np.nonzero(np.triu(distances <= max_distance, k=1))):
                pairs.add((int(idx[a]), int(idx[b])))
    return sorted(pairs)


def select_unique(
    content_hashes: list[str], phashes: list[int], priority: list[tuple], max_distance: int
) -> dict[int, tuple[str, int]]:
    """Which images to drop as duplicates: ``{index: (reason, index it duplicates)}``.

    Images are visited best first (``priority`` sorts ascending: put larger images first); an
    image is dropped if its bytes equal, or its perceptual hash is within ``max_distance`` of, an
    image already kept. Exact copies are reported as exact, not near, duplicates.
    """
    order = sorted(range(len(content_hashes)), key=lambda i: priority[i])
    neighbours: dict[int, list[int]] = defaultdict(list)
    for a, b in near_duplicate_pairs(phashes, max_distance):
        neighbours[a].append(b)
        neighbours[b].append(a)
    kept_by_content: dict[str, int] = {}
    kept: set[int] = set()
    dropped: dict[int, tuple[str, int]] = {}
    for index in order:
        original = kept_by_content.get(content_hashes[index])
        if original is not None:
            dropped[index] = (EXACT_DUPLICATE, original)
            continue
        match = next((n for n in neighbours[index] if n in kept), None)
        if match is not None:
            dropped[index] = (NEAR_DUPLICATE, match)
            continue
        kept.add(index)
        kept_by_content[content_hashes[index]] = index
    return dropped
