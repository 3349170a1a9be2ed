"""Hostile and damaged tar shards are read safely: members with absolute or climbing paths,
links, directories and devices, oversized members and samples without an image are skipped and
counted by reason; truncated, compressed-then-cut and garbage archives yield the samples before
the damage and then raise ``ShardError``; nothing is ever written to disk. Shards are built in
memory with ``tarfile`` around scikit-image's sample photographs.
"""

from __future__ import annotations

import bz2
import functools
import gzip
import io
import lzma
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipelines.sample_images import sample_photograph_dir
from pipelines.storage.access import StorageOptions
from pipelines.storage.shards import ReadStats, ShardError, iter_shard_samples
from pipelines.stream.sources import SourceConfig, list_shards, read_shard
from pipelines.views.decode import decode_image
from pipelines.views.quality import QualityConfig

pytestmark = pytest.mark.reliability

MiB = 1024 * 1024


@functools.cache
def _photo(name: str) -> bytes:
    return (sample_photograph_dir() / name).read_bytes()


def _file(name: str, data: bytes) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o644
    return info, data


def _special(name: str, kind: bytes, **fields) -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type = kind
    for field_name, value in fields.items():
        setattr(info, field_name, value)
    return info, None


def _tar(members: list[tuple[tarfile.TarInfo, bytes | None]]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.GNU_FORMAT) as archive:
        for info, data in members:
            archive.addfile(info, io.BytesIO(data) if data is not None else None)
    return buffer.getvalue()


def _read(shard: bytes, **options) -> tuple[dict[str, dict[str, bytes]], ReadStats]:
    """Every sample of ``shard`` as {key: {extension: bytes}}, and what was skipped."""
    stats = ReadStats()
    samples = {s.key: s.members for s in iter_shard_samples(io.BytesIO(shard), stats, **options)}
    return samples, stats


def _read_until_error(shard: bytes) -> tuple[list[str], ShardError | None]:
    """The keys yielded before the reader stopped, and the ShardError it stopped with, if any."""
    keys: list[str] = []
    try:
        for sample in iter_shard_samples(io.BytesIO(shard), ReadStats()):
            keys.append(sample.key)
    except ShardError as err:
        return keys, err
    return keys, None


def _three_samples() -> bytes:
    """Samples a, b, c: a photograph and its metadata each."""
    return _tar([
        _file("a.png", _photo("astronaut.png")), _file("a.json", b'{"label": "astronaut"}'),
        _file("b.jpg", _photo("rocket.jpg")), _file("b.json", b'{"label": "rocket"}'),
        _file("c.png", _photo("coffee.png")), _file("c.json", b'{"label": "coffee"}'),
    ])


def _member(shard: bytes, name: str) -> tarfile.TarInfo:
    with tarfile.open(fileobj=io.BytesIO(shard)) as archive:
        return archive.getmember(name)


# --- members that must never be trusted ---------------------------------------------------------


def _tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def test_absolute_and_climbing_member_paths_are_skipped_and_nothing_is_written(
    tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    before = _tree(tmp_path.parent)
    rocket = _photo("rocket.jpg")
    shard = _tar([
        _file("a.png", _photo("astronaut.png")),
        _file("/etc/evil.jpg", rocket),
        _file("../../escape.jpg", rocket),
        _file("a/../../escape.jpg", rocket),
        _file("c.png", _photo("coffee.png")),
    ])
    samples, stats = _read(shard)
    assert list(samples) == ["a", "c"]
    assert samples["a"] == {"png": _photo("astronaut.png")}
    assert stats.skipped_members == {"unsafe_path": 3}
    assert list(tmp_path.iterdir()) == []
    assert _tree(tmp_path.parent) == before
    assert not (tmp_path.parent.parent / "escape.jpg").exists()
    assert not Path("/etc/evil.jpg").exists()


def test_links_directories_and_devices_are_skipped_as_not_regular_files(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shard = _tar([
        _file("a.png", _photo("astronaut.png")),
        _special("passwd.jpg", tarfile.SYMTYPE, linkname="/etc/passwd"),
        _special("again.png", tarfile.LNKTYPE, linkname="a.png"),
        _special("folder.jpg", tarfile.DIRTYPE, mode=0o755),
        _special("tty.jpg", tarfile.CHRTYPE, devmajor=5, devminor=0),
        _special("disk.jpg", tarfile.BLKTYPE, devmajor=8, devminor=0),
        _special("pipe.jpg", tarfile.FIFOTYPE),
        _file("c.png", _photo("coffee.png")),
    ])
    samples, stats = _read(shard)
    assert list(samples) == ["a", "c"]
    assert samples["c"] == {"png": _photo("coffee.png")}
    assert stats.skipped_members == {"not_a_regular_file": 6}
    assert list(tmp_path.iterdir()) == []


def test_member_over_the_size_limit_is_skipped_and_the_rest_is_read():
    big = io.BytesIO()
    Image.open(io.BytesIO(_photo("astronaut.png"))).resize((840, 840)).save(big, format="BMP")
    assert big.tell() > 2 * MiB  # an uncompressed photograph, over the 1 MiB limit below
    shard = _tar([
        _file("a.png", _photo("astronaut.png")), _file("a.json", b"{}"),
        _file("big.bmp", big.getvalue()), _file("big.json", b"{}"),
        _file("c.png", _photo("coffee.png")),
    ])
    samples, stats = _read(shard, max_member_bytes=1 * MiB)
    assert list(samples) == ["a", "big", "c"]
    assert samples["big"] == {"json": b"{}"}  # the metadata stays; the image was never read
    assert samples["c"] == {"png": _photo("coffee.png")}
    assert stats.skipped_members == {"member_too_large": 1}


def test_samples_without_an_image_are_counted_and_good_samples_still_come_out(tmp_path):
    path = tmp_path / "shard-000000.tar"
    path.write_bytes(_tar([
        _file("a.png", _photo("astronaut.png")), _file("a.json", b'{"label": "astronaut"}'),
        _file("notes.txt", b"scanned on a Tuesday"),
        _file("meta.json", b'{"label": "no picture here"}'),
        _file("b.jpg", _photo("coffee.png")),  # PNG bytes behind a .jpg name
        _file("README", b"a member with no extension"),
        _file("c.txt", b"caption only"), _file("c.json", b"{}"),
        _file("d.jpg", _photo("rocket.jpg")),
    ]))
    source = SourceConfig(url=str(path), format="webdataset")
    options = StorageOptions()
    (shard,) = list_shards(source, options)
    stats = ReadStats()
    images = dict(read_shard(shard, source, options, stats))
    assert list(images) == ["a", "b", "d"]
    assert images["b"] == _photo("coffee.png")
    assert stats.skipped_members == {"no_image_member": 3, "no_extension": 1}
    for data in images.values():  # every sample that came out is a usable photograph
        image, _ = decode_image(data, QualityConfig().max_pixels)
        assert image.mode == "RGB" and min(image.size) >= 400


def test_read_shard_applies_the_configured_member_size_limit(tmp_path):
    path = tmp_path / "shard-000000.tar"
    path.write_bytes(_three_samples())
    source = SourceConfig(url=str(path), max_member_bytes=500_000)  # astronaut.png is ~790 kB
    options = StorageOptions()
    (shard,) = list_shards(source, options)
    stats = ReadStats()
    assert [key for key, _ in read_shard(shard, source, options, stats)] == ["b", "c"]
    assert stats.skipped_members == {"member_too_large": 1, "no_image_member": 1}


# --- damaged and compressed archives ------------------------------------------------------------


@pytest.mark.parametrize("compress", [gzip.compress, bz2.compress, lzma.compress],
                         ids=["gzip", "bzip2", "xz"])
def test_compressed_shard_is_read_like_a_plain_one(compress):
    samples, stats = _read(compress(_three_samples()))
    assert samples == _read(_three_samples())[0]
    assert list(samples) == ["a", "b", "c"]
    assert stats.skipped_members == {}


def _cut_in_data(name: str):
    return lambda shard: shard[: _member(shard, name).offset_data + _member(shard, name).size // 2]


def _cut_in_header(name: str):
    return lambda shard: shard[: _member(shard, name).offset + 100]


def _cut_before(name: str):
    return lambda shard: shard[: _member(shard, name).offset]


def _flip_header_checksum(name: str):
    def damage(shard: bytes) -> bytes:
        damaged = bytearray(shard)
        damaged[_member(shard, name).offset + 148] ^= 0x01  # first byte of the header checksum
        return bytes(damaged)
    return damage


# A sample comes out once the next sample's header has been read intact; the sample in progress
# when the damage is met goes down with the shard (it may have lost members).
@pytest.mark.parametrize("damage, keys_before", [
    pytest.param(_cut_in_data("a.png"), [], id="cut-in-first-image"),
    pytest.param(_cut_in_data("b.json"), ["a"], id="cut-in-metadata"),
    pytest.param(_cut_in_data("b.jpg"), ["a"], id="cut-in-image"),
    pytest.param(_cut_in_data("c.png"), ["a", "b"], id="cut-in-last-image"),
    pytest.param(_cut_in_header("c.png"), ["a"], id="cut-in-header"),
    pytest.param(_cut_before("c.png"), ["a"], id="cut-between-members"),
    pytest.param(_flip_header_checksum("c.png"), ["a"], id="corrupt-header"),
])
def test_damaged_shard_yields_the_samples_before_the_damage_then_raises(damage, keys_before):
    keys, error = _read_until_error(damage(_three_samples()))
    assert keys == keys_before
    assert isinstance(error, ShardError)


@pytest.mark.parametrize("keep, keys_before", [
    pytest.param(0.3, [], id="cut-in-first-image"),
    pytest.param(0.8, ["a", "b"], id="cut-in-last-image"),
])
def test_cut_gzip_shard_yields_the_samples_before_the_cut_then_raises(keep, keys_before):
    compressed = gzip.compress(_three_samples())
    keys, error = _read_until_error(compressed[: int(len(compressed) * keep)])
    assert keys == keys_before
    assert isinstance(error, ShardError)


@pytest.mark.parametrize("garbage", [
    pytest.param(b"", id="empty"),
    pytest.param(b"<html><body><h1>503 Service Unavailable</h1></body></html>", id="html"),
    pytest.param(np.random.default_rng(0).bytes(64 * 1024), id="random-bytes"),
    pytest.param(_photo("rocket.jpg"), id="a-jpeg-not-a-tar"),
])
def test_garbage_instead_of_a_shard_raises_shard_error(garbage):
    keys, error = _read_until_error(garbage)
    assert keys == []
    assert isinstance(error, ShardError)

