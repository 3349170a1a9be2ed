"""``ssl-pretrain eval``: frozen-encoder evaluation of a checkpoint on a labelled dataset.

Features are the encoder's pooled output (what ``export`` writes), computed once. Three
read-outs: cosine kNN with exp(sim/T) weighted votes (as in DINO), a linear probe (scikit-learn's
multinomial logistic regression on standardised features), and few-shot linear probes with n
labelled images per class (mean and spread over seeds). Labelled data is scikit-learn's digits,
a folder with one sub-folder per class, or WebDataset shards whose samples carry a ``cls``
member. This module does not train the encoder or touch Ray.
"""

from __future__ import annotations

import io
import json
import posixpath
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipelines.storage.access import StorageError, StorageOptions, open_filesystem, storage_call
from pipelines.stream.sources import RAW_IMAGE_SUFFIXES
from ssl_train.config import PretrainConfig
from ssl_train.models.ssl_model import SSLModel
from ssl_train.monitors.health import knn_accuracy
from ssl_train.train.checkpoint import load_model_weights, read_train_state
from ssl_train.train.step import normalize_views


class EvalDataError(StorageError):
    """The labelled dataset cannot be used; the message says why."""


def load_model(checkpoint: str, options: StorageOptions | None = None
               ) -> tuple[SSLModel, PretrainConfig, dict[str, Any]]:
    """The model of a checkpoint on the CPU in eval mode, its config and its train state."""
    state = read_train_state(checkpoint, options)
    config = PretrainConfig.model_validate(state["config"])
    model = SSLModel(config)
    load_model_weights(checkpoint, model, options)
    return model.eval(), config, state


def _square(image, size: int) -> np.ndarray:
    """Resize the short side to ``size`` and centre-crop: (size, size, 3) uint8."""
    from PIL import Image

    image = image.convert("RGB")
    scale = size / min(image.size)
    width, height = max(size, round(image.width * scale)), max(size, round(image.height * scale))
    image = image.resize((width, height), Image.BICUBIC)
    left, top = (width - size) // 2, (height - size) // 2
    return np.asarray(image.crop((left, top, left + size, top + size)), dtype=np.uint8)


def labelled_images(data: str, image_size: int, options: StorageOptions | None = None
                    ) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(images uint8 (N, S, S, 3), labels (N,), class names) of ``digits``, a folder per class,
    or WebDataset shards with a ``cls`` member."""
    from PIL import Image, UnidentifiedImageError

    if data == "digits":
        from pipelines.sample_images import digits_images

        images, labels = digits_images(image_size)
        return images, labels, [str(d) for d in range(10)]
    fs, root = open_filesystem(data, options)
    if not storage_call(data, options, fs.exists, root):
        raise EvalDataError(f"{data} does not exist: give 'digits', a folder with one "
                            "sub-folder per class, or a folder of .tar shards")
    files = storage_call(data, options, fs.find, root)
    shards = sorted(f for f in files if f.endswith(".tar"))
    samples: list[tuple[str, bytes]] = []  # (label text, image bytes)
    if shards:
        from pipelines.storage.shards import iter_shard_samples

        for shard in shards:
            with storage_call(data, options, fs.open, shard, "rb") as stream:
                for sample in iter_shard_samples(stream):
                    image = sample.image_bytes()
                    if image is not None and "cls" in sample.members:
                        samples.append((sample.members["cls"].decode().strip(), image[1]))
    else:
        for path in sorted(files):
            relative = posixpath.relpath(path, root)
            if "/" in relative and path.lower().endswith(RAW_IMAGE_SUFFIXES):
                samples.append((relative.split("/")[0],
                                storage_call(data, options, fs.cat_file, path)))
    names = sorted({label for label, _ in samples}, key=_label_order)
    if len(names) < 2:
        raise EvalDataError(f"{data} has {len(names)} labelled class(es): evaluation needs at "
                            "least 2 (a sub-folder per class, or shards with a cls member)")
    images, labels = [], []
    for label, payload in samples:
        try:
            with Image.open(io.BytesIO(payload)) as image:
                images.append(_square(image, image_size))
        except (UnidentifiedImageError, OSError, ValueError):
            continue  # an unreadable image is left out, as the data stage does
        labels.append(names.index(label))
    return np.stack(images), np.array(labels, dtype=np.int64), names


def _label_order(label: str):
    return (0, int(label), "") if label.isdigit() else (1, 0, label)


@torch.no_grad()
def encode_all(model: SSLModel, images: np.ndarray, batch_size: int = 256) -> torch.Tensor:
    """Pooled encoder features of uint8 images (N, S, S, 3), (N, D) float32."""
    parts = []
    for start in range(0, len(images), batch_size):
        views = normalize_views({"view_a": images[start:start + batch_size]})
        parts.append(model.encode(views["view_a"]).float())
    return torch.cat(parts)


def split(labels: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A stratified (train, test) index split."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        cut = max(1, round(len(members) * test_fraction))
        test.extend(members[:cut])
        train.extend(members[cut:])
    return np.sort(np.array(train)), np.sort(np.array(test))


def linear_probe_accuracy(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray,
                          test_y: np.ndarray, seed: int = 0) -> float:
    """Top-1 of a multinomial logistic regression on standardised frozen features."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, C=1.0,
                                                               random_state=seed))
    probe.fit(train_x, train_y)
    return float((probe.predict(test_x) == test_y).mean())


def few_shot(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray,
             shots: list[int], seeds: int) -> dict[str, dict[str, Any]]:
    """Linear probes on n images per class, for each n: mean and std of top-1 over seeds."""
    results = {}
    for n in shots:
        runs = []
        for seed in range(seeds):
            rng = np.random.default_rng([n, seed])
            chosen = np.concatenate([
                rng.choice(np.flatnonzero(train_y == label), size=n, replace=False)
                for label in np.unique(train_y) if (train_y == label).sum() >= n])
            runs.append(linear_probe_accuracy(train_x[chosen], train_y[chosen], test_x, test_y,
                                              seed))
        results[str(n)] = {"mean": float(np.mean(runs)), "std": float(np.std(runs)),
                           "runs": runs}
    return results


def evaluate_features(features: np.ndarray, labels: np.ndarray, k: int = 20,
                      temperature: float = 0.07, shots: list[int] = (1, 5, 10), seeds: int = 5,
                      test_fraction: float = 0.5, split_seed: int = 0) -> dict[str, Any]:
    """kNN, linear probe and few-shot top-1 on a stratified split of ``features``."""
    train, test = split(labels, test_fraction, split_seed)
    x, y = np.asarray(features, dtype=np.float32), np.asarray(labels)
    knn = knn_accuracy(torch.from_numpy(x[train]), torch.from_numpy(y[train]),
                       torch.from_numpy(x[test]), torch.from_numpy(y[test]), k, temperature)
    return {
        "num_train": int(len(train)), "num_test": int(len(test)),
        "num_classes": int(len(np.unique(y))), "chance": float(1 / len(np.unique(y))),
        "knn": {"k": k, "temperature": temperature, "top1": knn},
        "linear_probe": {"top1": linear_probe_accuracy(x[train], y[train], x[test], y[test])},
        "few_shot": few_shot(x[train], y[train], x[test], y[test], list(shots), seeds),
    }


def evaluate(checkpoint: str, data: str, options: StorageOptions | None = None,
             log: Callable[[str], None] = print, **settings) -> dict[str, Any]:
    """Evaluate the encoder of ``checkpoint`` on ``data``; returns the result (see the CLI)."""
    model, config, state = load_model(checkpoint, options)
    images, labels, names = labelled_images(data, config.model.image_size, options)
    log(f"encoding {len(images)} images of {len(names)} classes at "
        f"{config.model.image_size} px with the encoder of step {state['step']}")
    result = evaluate_features(encode_all(model, images).numpy(), labels, **settings)
    return {"checkpoint": checkpoint, "step": int(state["step"]), "run": config.run.name,
            "data": data, "classes": names, **result}


def result_table(result: dict[str, Any]) -> str:
    """The result as a small text table."""
    rows = [("kNN (k={k}, T={temperature})".format(**result["knn"]), result["knn"]["top1"], ""),
            ("linear probe", result["linear_probe"]["top1"], "")]
    for n, entry in result["few_shot"].items():
        rows.append((f"{n}-shot linear probe", entry["mean"], f"+- {entry['std']:.3f}"))
    lines = [f"{'read-out':<28} {'top-1':>7}",
             *(f"{name:<28} {value:>7.3f} {spread}" for name, value, spread in rows),
             f"({result['num_train']} train / {result['num_test']} test images, "
             f"{result['num_classes']} classes, chance {result['chance']:.3f})"]
    return "\n".join(lines)


def write_result(result: dict[str, Any], out: str | Path,
                 options: StorageOptions | None = None) -> str:
    """``result`` as JSON at ``out`` (a local path or an fsspec URL); returns where."""
    out = str(out)
    fs, path = open_filesystem(out, options)
    storage_call(out, options, fs.makedirs, posixpath.dirname(path) or ".", exist_ok=True)
    storage_call(out, options, fs.pipe_file, path, json.dumps(result, indent=2).encode())
    return out


def default_result_path(checkpoint: str) -> str:
    """Where ``eval`` writes by default: beside the checkpoint, in its run directory."""
    checkpoint = checkpoint.rstrip("/")
    run_dir, name = posixpath.dirname(checkpoint), posixpath.basename(checkpoint)
    return f"{run_dir}/eval_result_{name}.json"
