"""Ingest at more than toy scale: planted duplicates among a few thousand distinct images, the
shuffle across the source, and ``--list``."""

from __future__ import annotations

import io
import json
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from pipelines.ingest import IngestConfig, ingest
from pipelines.sample_images import sample_photographs
from pipelines.storage.shards import iter_shard_samples
from pipelines.views.quality import QualityConfig, is_blank, perceptual_hash

DISTANCE = 6
FOLDERS = 20


def _png(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def _jpeg(image: Image.Image, quality: int) -> bytes:
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=quality)
    return out.getvalue()


@pytest.fixture(scope="module")
def planted_tree(tmp_path_factory):
    """About 2,000 distinct crops of scikit-image's photographs in 20 folders (no two within
    2 x DISTANCE bits), plus near copies (resized, re-encoded) at every distance 0..DISTANCE
    and exact copies. Returns (root, {copy key: original key}, {exact copy key: original key})."""
    rng = np.random.default_rng(0)
    photos = sample_photographs(min_side=128)
    distinct: list[tuple[str, Image.Image, int]] = []
    hashes = np.zeros(0, dtype=np.uint64)
    for attempt in range(6000):
        if len(distinct) >= 2000:
            break
        photo = photos[attempt % len(photos)]
        side = int(rng.integers(40, min(photo.size) // 2 + 41))
        left = int(rng.integers(0, photo.size[0] - side + 1))
        top = int(rng.integers(0, photo.size[1] - side + 1))
        image = photo.crop((left, top, left + side, top + side)).resize((96, 96), Image.BICUBIC)
        if rng.random() < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        if is_blank(image, QualityConfig()):
            continue  # a flat patch of sky is dropped as blank, not a distinct image
        value = np.uint64(perceptual_hash(image))
        if len(hashes) and np.bitwise_count(hashes ^ value).min() <= 2 * DISTANCE:
            continue
        hashes = np.append(hashes, value)
        distinct.append((f"f{len(distinct) % FOLDERS:02d}/img{len(distinct):05d}", image,
                         int(value)))
    assert len(distinct) >= 1500
    root = tmp_path_factory.mktemp("planted") / "raw"
    for key, image, _ in distinct:
        (root / key).parent.mkdir(parents=True, exist_ok=True)
        (root / f"{key}.png").write_bytes(_png(image))
    near, exact, by_distance = {}, {}, Counter()
    for key, image, value in distinct[:600]:
        # Smaller and re-encoded: a copy the original (larger) must win over.
        copy = image.resize((int(rng.integers(64, 90)),) * 2, Image.BICUBIC)
        data = _jpeg(copy, int(rng.integers(60, 95)))
        decoded = Image.open(io.BytesIO(data))
        distance = int(np.bitwise_count(np.uint64(value) ^ np.uint64(perceptual_hash(decoded))))
        if distance > DISTANCE or by_distance[distance] >= 40 or is_blank(decoded,
                                                                          QualityConfig()):
            continue
        by_distance[distance] += 1
        (root / "copies").mkdir(exist_ok=True)
        (root / f"copies/{key.replace('/', '_')}.jpg").write_bytes(data)
        near[f"copies/{key.replace('/', '_')}"] = key
    for key, _, _ in distinct[600:640]:
        (root / "exact").mkdir(exist_ok=True)
        (root / f"exact/{key.replace('/', '_')}.png").write_bytes((root / f"{key}.png").read_bytes())
        exact[f"exact/{key.replace('/', '_')}"] = key
    assert len(by_distance) >= 4 and len(near) >= 60  # copies at many distances up to DISTANCE
    return root, near, exact, len(distinct)


def test_planted_duplicates_are_all_found_and_no_distinct_image_is_dropped(
    planted_tree, tmp_path, ray_local
):
    root, near, exact, distinct = planted_tree
    config = IngestConfig(samples_per_shard=100, images_per_part=500,
                          quality={"min_side": 32, "near_duplicate_distance": DISTANCE})
    lines: list[str] = []
    manifest = ingest(str(root), str(tmp_path / "out"), config, log=lines.append)
    report = json.loads((tmp_path / "out" / "quality_report.json").read_text())
    assert report["input_images"] == distinct + len(near) + len(exact)
    assert report["dropped"]["near_duplicate"] == len(near)
    assert report["dropped"]["exact_duplicate"] == len(exact)
    assert report["kept_images"] == manifest["total_samples"] == distinct
    # Exact copies tie on size: the smaller key is kept.
    exact_drops = {max(pair): min(pair) for pair in exact.items()}
    for copy, original in report["duplicate_of"].items():
        assert {**near, **exact_drops}[copy] == original
    kept = set()
    for shard in manifest["shards"]:
        with open(tmp_path / "out" / shard["name"], "rb") as f:
            kept |= {sample.key for sample in iter_shard_samples(f)}
    assert not kept & (set(near) | set(exact_drops)) and len(kept) == distinct
    # The first shard draws from across the source, not from one folder.
    with open(tmp_path / "out" / manifest["shards"][0]["name"], "rb") as f:
        folders = {sample.key.split("/")[0] for sample in iter_shard_samples(f)}
    assert len(folders) >= 15
    assert not (tmp_path / "out" / "_ingest").exists()  # the work prefix is gone
    assert any("near duplicates:" in line for line in lines)


def test_a_list_file_replaces_listing_and_counts_objects_that_cannot_be_read(
    planted_tree, tmp_path, ray_local
):
    root, _, _, _ = planted_tree
    folder = sorted((root / "f03").iterdir())
    listing = tmp_path / "images.txt"
    listing.write_text("\n".join([*(str(p) for p in folder), str(root / "f03" / "gone.png")]))
    config = IngestConfig(samples_per_shard=1000, quality={"min_side": 32})
    manifest = ingest(str(root), str(tmp_path / "out"), config, log=lambda line: None,
                      list_file=str(listing))
    report = json.loads((tmp_path / "out" / "quality_report.json").read_text())
    assert report["input_images"] == len(folder) + 1
    assert report["dropped"]["read_failed"] == 1 and report["examples"]["read_failed"] == [
        "f03/gone"]
    assert manifest["total_samples"] == len(folder)
    # A Parquet list by key, as an S3 Inventory names objects, gives the same shards.
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"key": [f"f03/{p.name}" for p in folder]}),
                   tmp_path / "inventory.parquet")
    again = ingest(str(root), str(tmp_path / "again"), config, log=lambda line: None,
                   list_file=str(tmp_path / "inventory.parquet"))
    assert [s["sha256"] for s in again["shards"]] == [s["sha256"] for s in manifest["shards"]]
