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

import torch
from safetensors.torch import save_file

from pipelines.storage.access import StorageOptions
from ssl_train.config import ModelConfig
from ssl_train.train.step import IMAGENET_MEAN, IMAGENET_STD

WEIGHTS = "model.safetensors"
META = "config.json"

# timm's ViT families by (width, heads). The exported name is the family's entry point for the
# encoder's patch size where timm has one; ``model_args`` (depth, patch, image size, pooling)
# override its defaults either way, and ``config.json`` says so when they differ from them.
_FAMILIES = {(192, 3): "tiny", (384, 6): "small", (768, 12): "base", (1024, 16): "large",
             (1280, 16): "huge"}


def timm_architecture(model: ModelConfig) -> tuple[str, dict[str, Any]]:
    """(timm model name, keyword arguments) that build this encoder without a classifier."""
    import timm

    enc = model.encoder
    family = _FAMILIES.get((enc.embed_dim, enc.num_heads), "base")
    candidates = [f"vit_{family}_patch{enc.patch_size}_{model.image_size}",
                  f"vit_{family}_patch{enc.patch_size}_224", f"vit_{family}_patch16_224"]
    name = next(candidate for candidate in candidates if timm.is_model(candidate))
    return name, {"img_size": model.image_size, "patch_size": enc.patch_size,
                  "embed_dim": enc.embed_dim, "depth": enc.depth, "num_heads": enc.num_heads,
                  "mlp_ratio": enc.mlp_ratio, "global_pool": enc.pool, "num_classes": 0}


def shape_note(name: str, model_args: dict[str, Any]) -> str:
    """What a reader of config.json should know about the name: whether model_args change the
    shape timm's entry point has by default."""
    import timm

    defaults = timm.models.get_pretrained_cfg(name)
    with torch.device("meta"):  # the shape alone: no memory, no initialisation
        with_defaults = timm.create_model(name, pretrained=False, num_classes=0)
    default_args = {"img_size": defaults.input_size[-1], "patch_size":
                    with_defaults.patch_embed.patch_size[0], "embed_dim": with_defaults.embed_dim,
                    "depth": len(with_defaults.blocks),
                    "num_heads": with_defaults.blocks[0].attn.num_heads}
    differ = [f"{key} {model_args[key]} (not {value})" for key, value in default_args.items()
              if model_args[key] != value]
    if not differ:
        return f"{name} as timm defines it"
    return (f"{name} with model_args overriding its defaults: {', '.join(differ)}; "
            f"model_args define the encoder")


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
            "shape": shape_note(name, model_args),
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
