"""Checkpoints: sharded with torch.distributed.checkpoint, verified before they are ever used.

A checkpoint directory holds DCP's files (``.metadata`` and one ``__<rank>_0.distcp`` per rank:
model and optimizer state, resharded on load when the worker count changes), beside each
``.distcp`` file its pieces' SHA-256 (``__<rank>_0.distcp.pieces.json``: a piece is one item DCP
wrote, a tensor's shard or a value), and ``train_state.json`` (step, scheduler, data cursor, world
size, and the size and SHA-256 of every other file). A directory is *complete* only if every file
that ``train_state.json`` lists is there with that size; anything else (a crash during upload, a
deleted or truncated file) is skipped on resume. Checkpoints are written into a local directory
per worker and persisted by ``ray.train.report``.

Loading reads from any fsspec URL, and each rank reads only the pieces it loads (ranged reads:
touching pieces in one request, the requests concurrent), checking each against its SHA-256
before it is used: a restore at 512 ranks reads the checkpoint about once in all, not once a
rank (plus, on every rank, ``.metadata`` and the values DCP stores once for all ranks). Small
files (``.metadata``, the sidecars) are read whole and checked against their own SHA-256; a
checkpoint written before the sidecars existed is read a whole file at a time. Loading never
runs code from the checkpoint: a changed piece or file is refused, DCP's ``.metadata`` is
unpickled with only DCP's own metadata classes allowed, and every other object is read with
``torch.load(weights_only=True)`` (DCP's default planner would unpickle non-tensor values
freely).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import posixpath
import re
import tempfile
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed._shard._utils import narrow_tensor_by_index
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, LoadPlanner
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)
from torch.futures import Future

from pipelines.storage.access import StorageError, StorageOptions, open_filesystem, storage_call
from ssl_train.distributed.collectives import is_distributed, rank, world_size

TRAIN_STATE = "train_state.json"
CHECKPOINT_PREFIX = "checkpoint_"
PIECES_SUFFIX = ".pieces.json"  # beside each data file: its pieces' offsets, lengths, SHA-256
READ_WINDOW = 64 << 20  # bytes of pieces fetched (concurrently) and held at once, or one piece
_CHECKPOINT_NAME = re.compile(rf"{CHECKPOINT_PREFIX}\d{{9}}")


# What DCP's .metadata may contain: its own metadata classes and the few values they hold.
_METADATA_GLOBALS = frozenset({
    ("torch.distributed.checkpoint.metadata", name) for name in (
        "Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata",
        "BytesStorageMetadata", "ChunkStorageMetadata", "_MEM_FORMAT_ENCODING")
} | {("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
     ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"),
     ("pathlib", "PurePosixPath")})


class CheckpointError(StorageError):
    """A checkpoint that must not be loaded; the message says which file and what to do."""


def checkpoint_dir_name(step: int) -> str:
    return f"{CHECKPOINT_PREFIX}{step:09d}"


def _world() -> tuple[int, int]:
    return rank(), world_size()


def _file_digest(path: Path) -> tuple[int, str]:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return path.stat().st_size, digest.hexdigest()


def save_checkpoint(
    local_dir: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
    train_state: dict[str, Any],
) -> None:
    """Write this rank's part of a checkpoint into ``local_dir`` (collective: every rank calls)."""
    model_state, optim_state = get_state_dict(model, optimizer)
    metadata = dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(local_dir))
    _write_piece_digests(local_dir, metadata)
    rank, world = _world()
    mine = {p.name: _file_digest(p) for p in sorted(local_dir.iterdir()) if p.is_file()}
    everyone = [None] * world
    if world > 1:
        dist.all_gather_object(everyone, mine)
    else:
        everyone = [mine]
    if rank == 0:
        files = {name: {"bytes": size, "sha256": sha}
                 for part in everyone for name, (size, sha) in part.items()}
        state = {**train_state, "world_size": world, "files": files}
        (local_dir / TRAIN_STATE).write_text(json.dumps(state, indent=2, sort_keys=True))


def _write_piece_digests(local_dir: Path, metadata: Metadata) -> None:
    """Beside each data file this rank wrote, the SHA-256 of every piece in it (every rank has
    the whole checkpoint's metadata after ``dcp.save``; each hashes only its own files)."""
    mine = {path.name for path in local_dir.iterdir() if path.is_file()}
    pieces: dict[str, set[tuple[int, int]]] = {}
    for info in metadata.storage_data.values():
        if info.relative_path in mine:
            pieces.setdefault(info.relative_path, set()).add((info.offset, info.length))
    for name, spans in pieces.items():
        with open(local_dir / name, "rb") as f:
            rows = []
            for offset, length in sorted(spans):
                f.seek(offset)
                rows.append([offset, length, hashlib.sha256(f.read(length)).hexdigest()])
        (local_dir / (name + PIECES_SUFFIX)).write_text(json.dumps({"pieces": rows}))


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        allowed = (module, name) in _METADATA_GLOBALS or (
            module == "torch" and isinstance(getattr(torch, name, None), torch.dtype))
        if not allowed:
            raise pickle.UnpicklingError(f"{module}.{name} has no place in checkpoint metadata")
        return super().find_class(module, name)


class _WeightsOnlyPlanner(DefaultLoadPlanner):
    """DCP's planner, reading non-tensor values (optimizer hyper-parameters) weights-only."""

    def load_bytes(self, read_item, value) -> None:
        loaded = torch.load(value, weights_only=True)
        if self.flatten_state_dict:
            from torch.distributed.checkpoint._traverse import set_element

            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], loaded)
        else:
            self.state_dict[read_item.dest_index.fqn] = loaded


def verify_checkpoint(local_dir: Path, name: str | None = None) -> dict[str, Any]:
    """The train state of a checkpoint whose files all match their recorded SHA-256."""
    name = name or str(local_dir)
    try:
        state = _parse_train_state((local_dir / TRAIN_STATE).read_bytes(), name)
        files = state["files"]
    except (OSError, KeyError, TypeError) as err:
        raise _unreadable_train_state(name, err) from None
    if ".metadata" not in files:
        raise CheckpointError(f"checkpoint {name} lists no .metadata: load another one")
    for file_name, expected in sorted(files.items()):
        path = local_dir / file_name
        if posixpath.basename(file_name) != file_name or not path.is_file():
            raise CheckpointError(f"checkpoint {name} lacks {file_name}: load another one")
        if _file_digest(path) != (expected["bytes"], expected["sha256"]):
            raise CheckpointError(
                f"checkpoint {name} is refused: {file_name} does not match the SHA-256 recorded "
                f"in its {TRAIN_STATE} (changed or damaged after it was written); move that "
                "checkpoint away to resume from the one before it")
    return state


def _unpickle_metadata(data: bytes) -> Metadata:
    metadata = _MetadataUnpickler(io.BytesIO(data)).load()
    if not isinstance(metadata, Metadata):
        raise pickle.UnpicklingError("the .metadata file does not hold DCP metadata")
    return metadata


class VerifyingReader(dcp.StorageReader):
    """DCP's storage reader over fsspec: only the pieces this rank loads, each checked against
    its SHA-256 before use. ``bytes_read`` counts what it fetched."""

    def __init__(self, uri: str, files: dict[str, dict], options: StorageOptions | None = None):
        super().__init__()
        self.uri, self.files, self.options = uri.rstrip("/"), files, options
        self.fs, self.root = open_filesystem(self.uri, options)
        self.storage_data: dict[Any, Any] = {}
        self.bytes_read = 0
        self._metadata: Metadata | None = None  # read once: _load checks it before dcp.load
        self._pieces: dict[str, dict[tuple[int, int], str] | None] = {}

    # What DCP calls.
    def reset(self, checkpoint_id: str | os.PathLike | None = None) -> None:
        self.storage_data = {}

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        if self._metadata is None:
            metadata = _unpickle_metadata(self._whole(".metadata"))
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            self._metadata = metadata
        return self._metadata

    def set_up_storage_reader(self, metadata: Metadata, is_coordinator: bool, *args: Any,
                              **kwargs: Any) -> None:
        self.storage_data = metadata.storage_data

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        return plan

    def prepare_global_plan(self, plans: list[LoadPlan]) -> list[LoadPlan]:
        return plans

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike) -> bool:
        return True

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future:
        per_file: dict[str, list] = {}
        for item in plan.items:
            per_file.setdefault(self.storage_data[item.storage_index].relative_path,
                                []).append(item)
        for name, items in per_file.items():
            wanted: dict[tuple[int, int], list] = {}
            for item in items:
                info = self.storage_data[item.storage_index]
                if info.transform_descriptors:
                    raise CheckpointError(f"checkpoint {self.uri}: {name} was written with a "
                                          "storage extension this reader does not apply")
                wanted.setdefault((info.offset, info.length), []).append(item)
            for span, data in self._read_pieces(name, sorted(wanted)):
                for item in wanted[span]:
                    self._deliver(item, data, planner)
        done: Future = Future()
        done.set_result(None)
        return done

    # How it reads.
    def _storage(self, name: str, fn, *args: Any, **kwargs: Any):
        if name not in self.files:
            raise CheckpointError(f"checkpoint {self.uri} lacks {name} in its {TRAIN_STATE}: "
                                  "load another one")

        def call():
            try:
                return fn(*args, **kwargs)
            except FileNotFoundError:
                raise CheckpointError(f"checkpoint {self.uri} lacks {name} (listed in its "
                                      f"{TRAIN_STATE}): it is incomplete; load another one"
                                      ) from None
        return storage_call(f"{self.uri}/{name}", self.options, call)

    def _refuse(self, what: str) -> CheckpointError:
        return CheckpointError(
            f"checkpoint {self.uri} is refused: {what} does not match the SHA-256 recorded when "
            "it was written (changed or damaged since); move that checkpoint away to resume "
            "from the one before it")

    def _whole(self, name: str) -> bytes:
        data = self._storage(name, self.fs.cat_file, posixpath.join(self.root, name))
        self.bytes_read += len(data)
        expected = self.files[name]
        if (len(data), hashlib.sha256(data).hexdigest()) != (expected["bytes"],
                                                              expected["sha256"]):
            raise self._refuse(name)
        return data

    def _piece_digests(self, name: str) -> dict[tuple[int, int], str] | None:
        if name not in self._pieces:
            sidecar = name + PIECES_SUFFIX
            self._pieces[name] = None if sidecar not in self.files else {
                (offset, length): sha
                for offset, length, sha in json.loads(self._whole(sidecar))["pieces"]}
        return self._pieces[name]

    def _read_pieces(self, name: str, spans: list[tuple[int, int]]):
        """(span, bytes) for each (offset, length) in ``spans`` (sorted), verified."""
        digests = self._piece_digests(name)
        if digests is None:  # no sidecar: the whole file, checked against its own digest
            data = self._whole(name)
            for offset, length in spans:
                yield (offset, length), data[offset:offset + length]
            return
        runs: list[list[tuple[int, int]]] = []  # touching pieces, one ranged read each
        for offset, length in spans:
            if (runs and offset == runs[-1][-1][0] + runs[-1][-1][1]
                    and offset + length - runs[-1][0][0] <= READ_WINDOW):
                runs[-1].append((offset, length))
            else:
                runs.append([(offset, length)])
        batch: list[list[tuple[int, int]]] = []
        held = 0
        for index, run in enumerate(runs):
            batch.append(run)
            held += run[-1][0] + run[-1][1] - run[0][0]
            if index + 1 < len(runs) and held < READ_WINDOW:
                continue
            for run_of, data in zip(batch, self._fetch_ranges(name, batch)):
                start = run_of[0][0]
                for offset, length in run_of:
                    piece = data[offset - start:offset - start + length]
                    expected = digests.get((offset, length))
                    if expected is None or hashlib.sha256(piece).hexdigest() != expected:
                        raise self._refuse(f"{name} at bytes {offset}-{offset + length}")
                    yield (offset, length), piece
            batch, held = [], 0

    def _fetch_ranges(self, name: str, runs: list[list[tuple[int, int]]]) -> list[bytes]:
        """The bytes of each run, in one call (concurrent ranged reads on object storage)."""
        path = posixpath.join(self.root, name)
        starts = [run[0][0] for run in runs]
        ends = [run[-1][0] + run[-1][1] for run in runs]
        datas = self._storage(name, self.fs.cat_ranges, [path] * len(runs), starts, ends,
                              on_error="raise")
        self.bytes_read += sum(map(len, datas))
        return datas

    @staticmethod
    def _deliver(item, data: bytes, planner: LoadPlanner) -> None:
        if item.type == LoadItemType.BYTE_IO:
            planner.load_bytes(item, io.BytesIO(data))
            return
        tensor = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        tensor = narrow_tensor_by_index(tensor, item.storage_offsets, item.lengths)
        target = planner.resolve_tensor(item).detach()
        if target.size() != tensor.size():
            raise CheckpointError(f"a piece of {item.storage_index.fqn} has shape "
                                  f"{tuple(tensor.size())}, not {tuple(target.size())}")
        target.copy_(tensor)
        planner.commit_tensor(item, target)


@dataclass(frozen=True)
class Restored:
    """What a load read: the train state, and the bytes this process fetched of the whole."""

    state: dict[str, Any]
    bytes_read: int
    bytes_total: int


def _load(state: dict[str, Any], source: str | Path, options: StorageOptions | None,
          **kwargs: Any) -> Restored:
    uri = str(source)
    train_state = read_train_state(uri, options)
    files = train_state.get("files")
    if not isinstance(files, dict) or ".metadata" not in files:
        raise CheckpointError(f"checkpoint {uri} lists no .metadata: load another one")
    reader = VerifyingReader(uri, files, options)
    try:
        # Refused here, before DCP's fallbacks log the error and rewrap it as an AssertionError.
        reader.read_metadata()
        dcp.load(state, storage_reader=reader, planner=_WeightsOnlyPlanner(), **kwargs)
    except pickle.UnpicklingError as err:
        raise CheckpointError(f"checkpoint {uri} is refused: {err}") from None
    except CheckpointException as err:  # a rank's own error, carried through DCP's gather
        for failure, _trace in err.failures.values():
            if isinstance(failure, StorageError):
                raise failure from None
        if "UnpicklingError" not in str(err):
            raise
        raise CheckpointError(f"checkpoint {uri} is refused: it holds objects other than "
                              "tensors and plain values") from None
    return Restored(train_state, reader.bytes_read,
                    sum(int(entry["bytes"]) for entry in files.values()))


def load_checkpoint(
    source: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
    options: StorageOptions | None = None,
) -> Restored:
    """Load model and optimizer state (resharding as needed) from a checkpoint's URL or local
    directory; collective when distributed (every rank calls, each reads only its pieces)."""
    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optim": optim_state}
    restored = _load(state, source, options)
    set_state_dict(model, optimizer, model_state_dict=state["model"],
                   optim_state_dict=state["optim"])
    return restored


def load_model_weights(source: str | Path, model: torch.nn.Module,
                       options: StorageOptions | None = None) -> Restored:
    """Load the model's state only (evaluation, export): the optimizer's pieces are not read."""
    state = {"model": get_model_state_dict(model)}
    with warnings.catch_warnings():  # one process reading on purpose: DCP's notice says so
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        restored = _load(state, source, options, no_dist=not is_distributed())
    set_model_state_dict(model, state["model"])
    return restored


def is_complete(uri: str, options: StorageOptions | None = None) -> bool:
    """True if the checkpoint at ``uri`` has every file its train state lists, at full size."""
    fs, path = open_filesystem(uri, options)
    state_path = posixpath.join(path, TRAIN_STATE)
    try:
        state = json.loads(fs.cat_file(state_path))
        files = state["files"]
        for name, expected in files.items():
            if fs.size(posixpath.join(path, name)) != expected["bytes"]:
                return False
    except (OSError, KeyError, ValueError, TypeError):  # missing, not a directory, garbled
        return False
    return ".metadata" in files


def list_checkpoints(run_uri: str, options: StorageOptions | None = None) -> list[str]:
    """Checkpoint directories of a run, newest first (by step)."""
    fs, path = open_filesystem(run_uri, options)
    if not storage_call(run_uri, options, fs.exists, path):
        return []
    entries = storage_call(run_uri, options, fs.ls, path, detail=False)
    names = sorted((name for name in (posixpath.basename(e.rstrip("/")) for e in entries)
                    if _CHECKPOINT_NAME.fullmatch(name)), reverse=True)
    return [run_uri.rstrip("/") + "/" + name for name in names]


def latest_complete_checkpoint(run_uri: str, options: StorageOptions | None = None) -> str | None:
    """The newest checkpoint of a run that was written completely, or None."""
    for uri in list_checkpoints(run_uri, options):
        if is_complete(uri, options):
            return uri
    return None


def is_checkpoint(uri: str, options: StorageOptions | None = None) -> bool:
    """True if ``uri`` is a checkpoint directory (it holds a train state), not a run directory."""
    fs, path = open_filesystem(uri, options)
    return bool(storage_call(uri, options, fs.exists, posixpath.join(path, TRAIN_STATE)))


def resolve_checkpoint(uri: str, options: StorageOptions | None = None) -> str:
    """``uri`` when it is a checkpoint, else the latest complete checkpoint of the run directory
    ``uri``; neither is refused in one sentence."""
    if is_checkpoint(uri, options):
        return uri
    if _CHECKPOINT_NAME.fullmatch(posixpath.basename(uri.rstrip("/"))):
        raise CheckpointError(f"checkpoint {uri}: its {TRAIN_STATE} does not exist: it is "
                              "incomplete; load another one")
    fs, path = open_filesystem(uri, options)
    if not storage_call(uri, options, fs.exists, path):
        where = (options or StorageOptions()).describe(uri)
        raise CheckpointError(f"{where} does not exist: give a run directory or one of its "
                              f"{CHECKPOINT_PREFIX}NNNNNNNNN folders")
    latest = latest_complete_checkpoint(uri, options)
    if latest is None:
        raise CheckpointError(f"{uri} holds no complete checkpoint: give a run directory whose "
                              f"training wrote one, or one of its {CHECKPOINT_PREFIX}NNNNNNNNN "
                              "folders")
    return latest


def run_directory(uri: str, options: StorageOptions | None = None) -> str:
    """The run directory of ``uri``: itself, or the one a checkpoint directory sits in."""
    uri = uri.rstrip("/")
    return posixpath.dirname(uri) if is_checkpoint(uri, options) else uri


def read_train_state(uri: str, options: StorageOptions | None = None) -> dict[str, Any]:
    """The train state of the checkpoint at ``uri``; a missing or unreadable one is refused."""
    fs, path = open_filesystem(uri, options)
    text = storage_call(f"{uri.rstrip('/')}/{TRAIN_STATE}", options, fs.cat_file,
                        posixpath.join(path, TRAIN_STATE))
    return _parse_train_state(text, uri)


def _unreadable_train_state(name: str, err: BaseException) -> CheckpointError:
    return CheckpointError(f"checkpoint {name} has no readable {TRAIN_STATE} ({err}): it is "
                           "incomplete; load another one")


def _parse_train_state(text: bytes, name: str) -> dict[str, Any]:
    try:
        return json.loads(text)
    except ValueError as err:
        raise _unreadable_train_state(name, err) from None


@contextmanager
def local_copy(uri: str, options: StorageOptions | None = None):
    """The checkpoint at ``uri`` as a local directory (a download for remote storage)."""
    fs, path = open_filesystem(uri, options)
    if fs.protocol in ("file", ("file", "local")) and os.path.isdir(path):
        yield Path(path)
        return
    with tempfile.TemporaryDirectory(prefix="ssl-ckpt-") as tmp:
        storage_call(uri, options, fs.get, path.rstrip("/") + "/", tmp + "/", recursive=True)
        yield Path(tmp)
