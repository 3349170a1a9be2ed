"""The ablation: what each objective contributes, on scikit-learn's digits.

    .venv/bin/python benchmarks/ablation.py --steps 200 --seeds 0 1 2 --out docs/ablation

Digits are upsampled to 32 px; half of each class (a fixed stratified split) is the unlabelled
pretraining set, the other half the held-out test set. For each seed, the same small ViT
(patch 4, 128 wide, 4 deep) is trained in-process with the same budget of steps, batch, views
and learning rate under five objectives: none (random init), contrastive only, masked only,
hybrid with fixed weights, hybrid with learned weights. Each encoder's frozen features are read
out with kNN, a linear probe and a 10-shot probe (``ssl_train.eval.evaluate.evaluate_features``).
Writes OUT/results.json (every run), OUT/table.md (mean and std over seeds) and OUT/curves.png
(losses and learned weights over training, first seed).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pipelines.sample_images import digits_images, random_view_batches
from ssl_train.config import load_config
from ssl_train.eval.evaluate import encode_all, evaluate_features, split
from ssl_train.models.ssl_model import SSLModel
from ssl_train.train.loop import train_in_process

IMAGE_SIZE = 32
BASE = [
    f"model.image_size={IMAGE_SIZE}", "model.encoder.patch_size=4", "model.encoder.embed_dim=128",
    "model.encoder.depth=4", "model.encoder.num_heads=4", "objectives.mae.decoder.embed_dim=64",
    "objectives.mae.decoder.depth=2", "objectives.mae.decoder.num_heads=4",
    "objectives.simclr.projector.hidden_dim=256", "objectives.simclr.projector.out_dim=64",
    "train.global_batch_size=64", "optim.warmup_steps=20",
    "objectives.simclr.crop.scale=[0.3, 1.0]", "objectives.mae.crop.scale=[0.5, 1.0]",
    "train.log_every=1000",
]
VARIANTS = {
    "random init": None,
    "contrastive only": ["objectives=[simclr]"],
    "masked only": ["objectives=[mae]"],
    "hybrid, fixed weights": ["weighting=fixed"],
    "hybrid, learned weights": ["weighting=learned"],
}


def run_variant(name, overrides, seed, steps, pretrain_images, all_images, labels, work):
    config = load_config("tiny-cpu", [*BASE, f"train.steps={steps}", f"train.seed={seed}",
                                      *(overrides or [])])
    started = time.perf_counter()
    curves = []
    if overrides is None:
        torch.manual_seed(seed)
        model = SSLModel(config)
    else:
        batches = random_view_batches(pretrain_images, IMAGE_SIZE, config.train.global_batch_size,
                                      seed=seed, augment=config.data.augment,
                                      views=config.views())
        run_dir = work / f"{name.replace(' ', '_').replace(',', '')}-{seed}"
        model = train_in_process(config, batches, run_dir, log=lambda line: None)
        curves = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    model.eval()
    features = encode_all(model, all_images).numpy()
    readout = evaluate_features(features, labels, shots=[10], seeds=3, split_seed=0)
    return {"variant": name, "seed": seed, "steps": 0 if overrides is None else steps,
            "seconds": time.perf_counter() - started, "knn": readout["knn"]["top1"],
            "linear_probe": readout["linear_probe"]["top1"],
            "ten_shot": readout["few_shot"]["10"]["mean"], "curves": curves}


def table(results: list[dict]) -> str:
    lines = ["| encoder | kNN top-1 | linear probe top-1 | 10-shot probe top-1 |",
             "| --- | ---: | ---: | ---: |"]
    for name in VARIANTS:
        runs = [r for r in results if r["variant"] == name]
        cells = []
        for key in ("knn", "linear_probe", "ten_shot"):
            values = [r[key] for r in runs]
            spread = statistics.stdev(values) if len(values) > 1 else 0.0
            cells.append(f"{statistics.mean(values):.3f} +- {spread:.3f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    first = min(r["seed"] for r in results)
    figure, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    for result in results:
        if result["seed"] != first or not result["curves"]:
            continue
        steps = [c["step"] for c in result["curves"]]
        for ax, key in ((axes[0], "loss_contrastive"), (axes[1], "loss_masked")):
            if key in result["curves"][0]:
                ax.plot(steps, [c[key] for c in result["curves"]], label=result["variant"])
        if result["variant"] == "hybrid, learned weights":
            for key in ("weight_contrastive", "weight_masked"):
                axes[2].plot(steps, [c[key] for c in result["curves"]], label=key)
    for ax, title in zip(axes, ("contrastive loss (NT-Xent)", "masked loss (MSE, normalised "
                                "pixels)", "learned loss weights (hybrid)")):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", default="docs/ablation")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    images, labels = digits_images(IMAGE_SIZE)
    train, _ = split(labels, 0.5, seed=0)  # the same split evaluate_features holds out
    pretrain_images = [Image.fromarray(images[i]) for i in train]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    with tempfile.TemporaryDirectory() as work:
        for seed in args.seeds:
            for name, overrides in VARIANTS.items():
                result = run_variant(name, overrides, seed, args.steps, pretrain_images, images,
                                     labels, Path(work))
                print(f"seed {seed} {name:<24} kNN {result['knn']:.3f} probe "
                      f"{result['linear_probe']:.3f} 10-shot {result['ten_shot']:.3f} "
                      f"({result['seconds']:.0f} s)", flush=True)
                results.append(result)
    (out / "results.json").write_text(json.dumps(
        {"steps": args.steps, "seeds": args.seeds, "base_overrides": BASE,
         "runs": [{k: v for k, v in r.items() if k != "curves"} for r in results]}, indent=2))
    (out / "table.md").write_text(table(results))
    plot(results, out / "curves.png")
    print(table(results))


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
