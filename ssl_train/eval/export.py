"""``ssl-pretrain export``: the encoder of a checkpoint, alone, as a timm model.

Writes ``model.safetensors`` (the timm VisionTransformer's state dict, no projection head, no
decoder, no loss weights) and ``config.json`` (the timm architecture name, the keyword arguments
that give it this shape, where the checkpoint came from). Loading it back is one call:

    import json, timm
    meta = json.load(open("OUT/config.json"))
    model = timm.create_model(meta["architecture"], pretrained=True, **meta["model_args"],
                              pretrained_cfg_overlay=dict(file="OUT/model.safetensors",
                                                          num_classes=0))

``num_classes=0`` in the overlay matches the exported head-less encoder, so timm loads strictly
(a missing or unexpected key is an error).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from safetensors.torch import save_file

from pipelines.storage.access import StorageOptions
from ssl_train.config import ModelConfig
from ssl_train.train.step import IMAGENET_MEAN, IMAGENET_STD

WEIGHTS = "model.safetensors"
META = "config.json"

# timm's names for the shapes of the packaged configs (others load through the same name with
# their own model_args).
_TIMM_NAMES = {(384, 12, 6): "vit_small_patch16_224", (768, 12, 12): "vit_base_patch16_224",
               (1024, 24, 16): "vit_large_patch16_224"}


def timm_architecture(model: ModelConfig) -> tuple[str, dict[str, Any]]:
    """(timm model name, keyword arguments) that build this encoder without a classifier."""
    enc = model.encoder
    name = _TIMM_NAMES.get((enc.embed_dim, enc.depth, enc.num_heads), "vit_small_patch16_224")
    return name, {"img_size": model.image_size, "patch_size": enc.patch_size,
                  "embed_dim": enc.embed_dim, "depth": enc.depth, "num_heads": enc.num_heads,
                  "mlp_ratio": enc.mlp_ratio, "global_pool": enc.pool, "num_classes": 0}


def export(checkpoint: str, out: str | Path, options: StorageOptions | None = None) -> Path:
    """Write the encoder of ``checkpoint`` to ``out``; returns the weights file."""
    from ssl_train.eval.evaluate import load_model

    model, config, state = load_model(checkpoint, options)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    weights = {key: tensor.detach().contiguous()
               for key, tensor in model.export_encoder().state_dict().items()}
    save_file(weights, str(out / WEIGHTS), metadata={"format": "pt"})
    name, model_args = timm_architecture(config.model)
    meta = {"architecture": name, "model_args": model_args,
            "source": {"checkpoint": checkpoint, "step": int(state["step"]),
                       "run": config.run.name, "objectives": config.objective_names},
            "normalisation": {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)},
            "load": "timm.create_model(architecture, pretrained=True, **model_args, "
                    "pretrained_cfg_overlay=dict(file=<this folder>/model.safetensors, "
                    "num_classes=0))"}
    (out / META).write_text(json.dumps(meta, indent=2))
    return out / WEIGHTS


def load_exported(folder: str | Path):
    """The exported encoder as a timm model (strict: every key must match)."""
    import timm

    folder = Path(folder)
    meta = json.loads((folder / META).read_text())
    return timm.create_model(meta["architecture"], pretrained=True, **meta["model_args"],
                             pretrained_cfg_overlay=dict(file=str(folder / WEIGHTS),
                                                         num_classes=0))
