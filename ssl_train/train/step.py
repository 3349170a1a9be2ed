"""One optimisation step on the training worker: uint8 views in, logged figures out.

Owns normalisation (the data stage ships uint8 views; they are converted here, on the worker's
device), gradient accumulation over micro-batches, gradient clipping (of the network: the loss
weighting's log variances are left out, their gradient 1 - L is no network gradient and would
scale every other one down) and the scheduler tick. It does not build models, read data or know
whether it runs under Ray.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule

from pipelines.views.photometric import apply_photometric_torch
from ssl_train.config import PretrainConfig
from ssl_train.distributed.fsdp import reshard
from ssl_train.monitors.health import embedding_std

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def normalize_views(
    batch: Mapping[str, np.ndarray | torch.Tensor],
    device: torch.device | str = "cpu",
    solarize_threshold: int = 128,
) -> dict[str, torch.Tensor]:
    """uint8 views (B, H, W, 3) -> normalised float images (B, 3, H, W) on ``device``.

    Views are the batch's ``view_*`` entries. A view that comes with ``<view>_photometric``
    parameters gets its photometric augmentation here, batched on ``device``, before
    normalisation.
    """
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)
    views = {}
    for key in batch:
        if not key.startswith("view_") or key.endswith("_photometric"):
            continue
        images = torch.as_tensor(batch[key]).to(device, non_blocking=True)
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[-1] != 3:
            raise ValueError(
                f"{key} must be uint8 (B, H, W, 3), got {images.dtype} {tuple(images.shape)}"
            )
        images = images.permute(0, 3, 1, 2).float().div_(255.0)
        params = batch.get(f"{key}_photometric")
        if params is not None:
            images = apply_photometric_torch(images, torch.as_tensor(params), solarize_threshold)
        views[key] = (images - mean) / std
    return views


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    views: Mapping[str, torch.Tensor],
    config: PretrainConfig,
    inputs: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, float]:
    """Forward, backward (accumulated over micro-batches), clip, step; returns what to log.

    ``inputs`` are the objectives' per-step inputs for this worker's images (``step_inputs``,
    e.g. the masking order), chunked into micro-batches with the views.
    """
    accumulation = config.optim.accumulation_steps
    inputs = dict(inputs or {})

    def chunked(tensors: Mapping[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        parts = {key: tensor.chunk(accumulation) for key, tensor in tensors.items()}
        return [{key: parts[key][i] for key in parts} for i in range(accumulation)]

    chunks = list(zip(chunked(views), chunked(inputs)))
    optimizer.zero_grad(set_to_none=True)
    summed: dict[str, float] = {}
    embeddings = []
    sharded = isinstance(model, FSDPModule)
    if sharded:  # gathered once for every micro-batch and every encoder pass: see parallel.py
        model.set_reshard_after_backward(False)
    for index, (views_chunk, inputs_chunk) in enumerate(chunks):
        if sharded:  # reduce once, after the last micro-batch
            model.set_requires_gradient_sync(index == len(chunks) - 1)
        output = model(views_chunk, inputs_chunk)
        (output.loss / len(chunks)).backward()
        logged = {"loss": output.loss.detach()}
        logged |= {f"loss_{name}": value for name, value in output.losses.items()}
        logged |= {f"weight_{name}": value for name, value in output.weights.items()}
        logged |= {f"signal_{name}": value for name, value in output.signals.items()}
        for key, value in logged.items():
            summed[key] = summed.get(key, 0.0) + float(value) / len(chunks)
        if output.embeddings is not None:
            embeddings.append(output.embeddings)
    if sharded:
        reshard(model)
    model.before_update()  # frozen parameters drop their gradients
    max_norm = config.optim.grad_clip_norm or float("inf")
    weighting = {id(p) for p in model.weighting.parameters()}
    params = [p for p in model.parameters() if p.grad is not None and id(p) not in weighting]
    grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    if hasattr(grad_norm, "full_tensor"):  # a DTensor under FSDP2
        grad_norm = grad_norm.full_tensor()
    lr = optimizer.param_groups[0]["lr"]
    optimizer.step()
    scheduler.step()
    model.after_step(scheduler.last_epoch)  # EMA teachers and schedules of the objectives
    summed["lr"] = lr
    summed["grad_norm"] = float(grad_norm)
    if embeddings:
        summed["embedding_std"] = embedding_std(torch.cat(embeddings))
    return summed
