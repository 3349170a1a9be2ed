"""WebDataset tar shards: writing ours, reading ours and anyone's that follow the convention.

A sample is the group of consecutive members sharing a key (the member name up to the first dot
of its base name): ``KEY.jpg`` and ``KEY.json``. Reading never trusts the archive: members that
are not regular files (symlinks, devices, directories), names that are absolute or climb out
with ``..``, and members larger than a limit are skipped and counted, and nothing is ever
extracted to disk. A truncated archive yields what it held before the damage, then raises
``ShardError``.
"""

from __future__ import annotations

import hashlib
import io
import json
import posixpath
import tarfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import BinaryIO

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "tif", "tiff", "gif", "bmp")
DEFAULT_MAX_MEMBER_BYTES = 64 * 1024 * 1024


def shard_name(index: int) -> str:
    return f"shard-{index:06d}.tar"


class ShardError(RuntimeError):
    """A shard could not be read to its end."""


@dataclass
class TarSample:
    key: str
    members: dict[str, bytes] = field(default_factory=dict)

    def image_bytes(self) -> tuple[str, bytes] | None:
        """The first image member by extension, as (extension, bytes)."""
        for ext in IMAGE_EXTENSIONS:
            if ext in self.members:
                return ext, self.members[ext]
        return None


@dataclass
class ReadStats:
    """What reading one shard skipped, by reason."""

    skipped_members: dict[str, int] = field(default_factory=dict)

    def skip(self, reason: str) -> None:
        self.skipped_members[reason] = self.skipped_members.get(reason, 0) + 1


class _HashingWriter(io.RawIOBase):
    """Counts and hashes bytes on their way to the underlying file."""

    def __init__(self, sink: BinaryIO):
        self.sink = sink
        self.sha256 = hashlib.sha256()
        self.bytes_written = 0

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        view = memoryview(data)
        self.sha256.update(view)
        self.bytes_written += len(view)
        self.sink.write(view)
        return len(view)


def write_shard(sink: BinaryIO, samples: Iterable[tuple[str, str, bytes, dict]]) -> dict:
    """Write ``(key, image_extension, image_bytes, metadata)`` samples as one tar to ``sink``.

    Returns ``{"samples", "bytes", "sha256"}`` of the archive as written.
    """
    writer = _HashingWriter(sink)
    count = 0
    with tarfile.open(fileobj=writer, mode="w|", format=tarfile.PAX_FORMAT) as archive:
        for key, ext, data, metadata in samples:
            for name, payload in ((f"{key}.{ext}", data),
                                  (f"{key}.json", json.dumps(metadata, sort_keys=True).encode())):
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                info.mode = 0o644
                archive.addfile(info, io.BytesIO(payload))
            count += 1
    return {"samples": count, "bytes": writer.bytes_written, "sha256": writer.sha256.hexdigest()}


class _CheckedTarInfo(tarfile.TarInfo):
    """Tar headers that treat a cut, corrupt or missing header as damage, not as the end.

    tarfile alone stops quietly at such a header anywhere after the first member, which would
    shorten a damaged shard without a word; only a zero block ends an archive here.
    """

    @classmethod
    def fromtarfile(cls, tarfile_):
        try:
            return super().fromtarfile(tarfile_)
        except tarfile.EOFHeaderError:
            raise  # a zero block: the archive's proper end
        except tarfile.HeaderError as err:
            raise tarfile.ReadError(f"damaged header at byte {tarfile_.offset}: {err}") from None


def _unsafe_name(name: str) -> bool:
    normalised = posixpath.normpath(name)
    return name.startswith("/") or normalised.startswith("..") or "/../" in f"/{name}/"


def _split_key(name: str) -> tuple[str, str]:
    directory, base = posixpath.split(name)
    stem, _, ext = base.partition(".")
    return posixpath.join(directory, stem) if directory else stem, ext.lower()


def iter_shard_samples(
    source: BinaryIO, stats: ReadStats | None = None,
    max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES,
) -> Iterator[TarSample]:
    """Samples of a tar stream in archive order; see the module docstring for what is skipped."""
    stats = stats or ReadStats()
    current: TarSample | None = None
    try:
        with tarfile.open(fileobj=source, mode="r|*", tarinfo=_CheckedTarInfo) as archive:
            for member in archive:
                if not member.isfile():
                    stats.skip("not_a_regular_file")
                    continue
                if _unsafe_name(member.name):
                    stats.skip("unsafe_path")
                    continue
                if member.size > max_member_bytes:
                    stats.skip("member_too_large")
                    continue
                key, ext = _split_key(member.name)
                if not ext:
                    stats.skip("no_extension")
                    continue
                if current is not None and current.key != key:
                    yield current  # complete: what follows cannot damage it
                    current = None
                extracted = archive.extractfile(member)
                data = extracted.read() if extracted is not None else b""
                if len(data) != member.size:
                    raise ShardError(f"member {member.name} is truncated")
                if current is None:
                    current = TarSample(key)
                current.members[ext] = data
    except (tarfile.TarError, EOFError, OSError) as err:
        # The cause stays attached: a read that failed on storage, not on the archive, is
        # told apart by the caller (pipelines.storage.access.unavailable_reason).
        raise ShardError(f"{type(err).__name__}: {err}") from err
    if current is not None:
        yield current
