"""Training data sources: what the shards of an input are and how to read their samples.

Three kinds, all over fsspec (local paths, s3://, any fsspec URL):
- ``webdataset``: tar shards (ours, listed by ``manifest.json``, or any ``*.tar`` under a prefix);
- ``parquet``: files with an image-bytes column (plain binary, or a struct with a ``bytes`` field);
- ``images``: a folder of raw image files, grouped into shards of ``images_per_shard`` files.
A shard is the unit of parallelism, of the epoch's permutation and of the data cursor.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Annotated, Literal

from pydantic import Field

from pipelines.settings import StrictSection
from pipelines.storage.access import (
    StorageError,
    StorageOptions,
    StorageUrl,
    open_filesystem,
    storage_call,
)
from pipelines.storage.shards import DEFAULT_MAX_MEMBER_BYTES, ReadStats, iter_shard_samples

RAW_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".tif", ".tiff", ".gif", ".bmp")


class SourceConfig(StrictSection):
    url: StorageUrl = Field(
        "",
        description=("Where the shards are: a local path or an fsspec URL (s3://...); empty: the "
        "sample photographs, ingested under run.output_dir on first use."))
    format: Literal["webdataset", "parquet", "images"] = Field(
        "webdataset",
        description=("webdataset (tar shards of an ingest), parquet (an image-bytes column) or "
        "images (a folder of raw images)."))
    image_column: Annotated[str, Field(min_length=1)] = Field(
        "image",
        description="The Parquet column that holds the image bytes.")
    images_per_shard: Annotated[int, Field(ge=1)] = Field(
        256,
        description="Raw images grouped into one shard (format images).")
    max_member_bytes: Annotated[int, Field(ge=1)] = Field(
        DEFAULT_MAX_MEMBER_BYTES,
        description=("A tar member larger than this is skipped and counted (a corrupt or hostile "
        "shard)."))


@dataclass(frozen=True)
class ShardRef:
    """One shard: a tar or parquet file, or a group of raw image files."""

    uri: str
    kind: str
    members: tuple[str, ...] = ()

    def to_json(self) -> str:
        return json.dumps({"uri": self.uri, "kind": self.kind, "members": list(self.members)})

    @classmethod
    def from_json(cls, text: str) -> "ShardRef":
        data = json.loads(text)
        return cls(data["uri"], data["kind"], tuple(data["members"]))


def _url(fs, path: str) -> str:
    return fs.unstrip_protocol(path) if fs.protocol not in ("file", ("file", "local")) else path


def list_shards(source: SourceConfig, options: StorageOptions) -> list[ShardRef]:
    """The shards of a source in a stable order; raises StorageError if there are none."""
    if not source.url:
        raise StorageError("data.source.url is empty: give the shards' prefix or a manifest")
    fs, root = open_filesystem(source.url, options)
    root = root.rstrip("/")
    call = lambda fn, *a: storage_call(source.url, options, fn, *a)  # noqa: E731
    if source.format == "webdataset":
        if root.endswith(".tar"):
            paths = [root]
        elif call(fs.exists, f"{root}/manifest.json"):
            manifest = json.loads(call(fs.cat_file, f"{root}/manifest.json"))
            paths = [f"{root}/{shard['name']}" for shard in manifest["shards"]]
        else:
            paths = sorted(p for p in call(fs.find, root) if p.endswith(".tar"))
        refs = [ShardRef(_url(fs, p), "tar") for p in paths]
    elif source.format == "parquet":
        paths = [root] if root.endswith(".parquet") else sorted(
            p for p in call(fs.find, root) if p.endswith(".parquet"))
        refs = [ShardRef(_url(fs, p), "parquet") for p in paths]
    else:
        files = sorted(p for p in call(fs.find, root) if p.lower().endswith(RAW_IMAGE_SUFFIXES))
        size = source.images_per_shard
        refs = [ShardRef(_url(fs, root), "images", tuple(_url(fs, p) for p in files[i:i + size]))
                for i in range(0, len(files), size)]
    if not refs:
        raise StorageError(f"no {source.format} shards under {options.describe(source.url)}")
    return refs


def read_shard(
    shard: ShardRef, source: SourceConfig, options: StorageOptions, stats: ReadStats
) -> Iterator[tuple[str, bytes]]:
    """(key, image bytes) of each sample; a damaged shard raises after its readable samples."""
    if shard.kind == "images":
        for uri in shard.members:
            fs, path = open_filesystem(uri, options)
            yield uri, storage_call(uri, options, fs.cat_file, path)
        return
    fs, path = open_filesystem(shard.uri, options)
    with storage_call(shard.uri, options, fs.open, path, "rb") as stream:
        if shard.kind == "tar":
            for sample in iter_shard_samples(stream, stats, source.max_member_bytes):
                image = sample.image_bytes()
                if image is None:
                    stats.skip("no_image_member")
                    continue
                yield sample.key, image[1]
        else:
            yield from _read_parquet(stream, source, stats)


def _read_parquet(stream, source: SourceConfig, stats: ReadStats) -> Iterator[tuple[str, bytes]]:
    import pyarrow.parquet as pq

    table_file = pq.ParquetFile(stream)
    if source.image_column not in table_file.schema_arrow.names:
        raise StorageError(f"parquet file has no column {source.image_column!r}")
    row = 0
    for batch in table_file.iter_batches(columns=[source.image_column], batch_size=256):
        for value in batch.column(0).to_pylist():
            if isinstance(value, dict):  # e.g. {"bytes": ..., "path": ...}
                value = value.get("bytes")
            if not value:
                stats.skip("empty_image_value")
            else:
                yield f"row-{row}", value
            row += 1
