"""Checkpoints: sharded with torch.distributed.checkpoint, verified before they are ever used.

A checkpoint directory holds DCP's files (``.metadata`` and one ``__<rank>_0.distcp`` per rank:
model and optimizer state, resharded on load when the worker count changes) and
``train_state.json`` (step, scheduler, data cursor, world size, and the size and SHA-256 of every
other file). A directory is *complete* only if every file that ``train_state.json`` lists is
there with that size; anything else (a crash during upload, a deleted or truncated file) is
skipped on resume. Checkpoints are written into a local directory per worker and persisted by
``ray.train.report``; they are read back from any fsspec URL.

Loading never runs code from the checkpoint: every file is checked against its SHA-256 first (a
changed file is refused), DCP's ``.metadata`` is unpickled with only DCP's own metadata classes
allowed, and every other object is read with ``torch.load(weights_only=True)`` (DCP's default
planner would unpickle non-tensor values freely).
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import posixpath
import re
import tempfile
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

from pipelines.storage.access import StorageError, StorageOptions, open_filesystem, storage_call
from ssl_train.distributed.collectives import is_distributed, rank, world_size

TRAIN_STATE = "train_state.json"
CHECKPOINT_PREFIX = "checkpoint_"
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
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(local_dir))
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


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        allowed = (module, name) in _METADATA_GLOBALS or (
            module == "torch" and isinstance(getattr(torch, name, None), torch.dtype))
        if not allowed:
            raise pickle.UnpicklingError(f"{module}.{name} has no place in checkpoint metadata")
        return super().find_class(module, name)


class _SafeReader(dcp.FileSystemReader):
    """DCP's file reader, with ``.metadata`` unpickled by the allow-list above."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        with open(os.path.join(str(self.path), ".metadata"), "rb") as f:
            metadata = _MetadataUnpickler(f).load()
        if not isinstance(metadata, Metadata):
            raise pickle.UnpicklingError("the .metadata file does not hold DCP metadata")
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


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


def _load(state: dict[str, Any], local_dir: Path, name: str | None, **kwargs: Any) -> dict:
    train_state = verify_checkpoint(local_dir, name)
    reader = _SafeReader(str(local_dir))
    try:
        # Refused here, before DCP's fallbacks log the error and rewrap it as an AssertionError.
        reader.read_metadata()
        dcp.load(state, storage_reader=reader, planner=_WeightsOnlyPlanner(), **kwargs)
    except pickle.UnpicklingError as err:
        raise CheckpointError(f"checkpoint {name or local_dir} is refused: {err}") from None
    except CheckpointException as err:
        if "UnpicklingError" not in str(err):
            raise
        raise CheckpointError(f"checkpoint {name or local_dir} is refused: it holds objects "
                              "other than tensors and plain values") from None
    return train_state


def load_checkpoint(
    local_dir: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
    name: str | None = None,
) -> dict[str, Any]:
    """Load model and optimizer state (resharding as needed); returns the train state."""
    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optim": optim_state}
    train_state = _load(state, local_dir, name)
    set_state_dict(model, optimizer, model_state_dict=state["model"],
                   optim_state_dict=state["optim"])
    return train_state


def load_model_weights(local_dir: Path, model: torch.nn.Module, name: str | None = None) -> None:
    """Load the model's state only (evaluation, export): the optimizer's is not read."""
    state = {"model": get_model_state_dict(model)}
    with warnings.catch_warnings():  # one process reading on purpose: DCP's notice says so
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        _load(state, local_dir, name, no_dist=not is_distributed())
    set_model_state_dict(model, state["model"])


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
