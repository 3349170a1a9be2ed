"""The ablation: what each objective, and each hybrid, contributes, on scikit-learn's digits.

    .venv/bin/python benchmarks/ablation.py --steps 300 --seeds 0 1 2 --out docs/ablation

Digits are upsampled to 32 px; half of each class (a fixed stratified split) is the unlabelled
pretraining set, the other half the held-out test set. For each seed, the same small ViT
(patch 4, 128 wide, 4 deep) is trained in-process with the same budget of steps, batch and
learning rate under each arm: none (random init), each of the six objectives alone, the
SimCLR + MAE hybrid with fixed and with learned weights, the hybrids [dino, mae] and
[byol, mae], and DINO at its own learning rate. Heads are scaled to the small encoder (``HEADS``). Each encoder's frozen features
(the teacher's for DINO, as DINO evaluates) are read out with kNN, a linear probe and a 10-shot
probe (``ssl_train.eval.evaluate.evaluate_features``). Writes OUT/results.json (every run, with
its wall time), OUT/curves.json and OUT/curves.png (each objective's loss and the learned
weights over training, first seed), and OUT/table.md (mean and std over seeds). Both JSON files
are written after every run, and a new invocation with the same protocol keeps the runs they
hold and runs only the missing (arm, seed) pairs: a long ablation can be run in parts.
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
    "model.encoder.depth=4", "model.encoder.num_heads=4", "train.global_batch_size=64",
    "optim.warmup_steps=20", "train.log_every=1000",
]
# Each objective's heads and crops, scaled to the 128-wide encoder and 32 px digits. The EMA
# teachers start at momentum 0.99 (0.996 in BYOL and DINO's long runs): at a few hundred steps,
# 0.996 would leave the teacher close to its random initialisation.
HEADS = {
    "simclr": ["projector.hidden_dim=256", "projector.out_dim=64", "crop.scale=[0.3, 1.0]"],
    "mae": ["decoder.embed_dim=64", "decoder.depth=2", "decoder.num_heads=4",
            "crop.scale=[0.5, 1.0]"],
    "mocov3": ["projector.hidden_dim=256", "projector.out_dim=64", "predictor.hidden_dim=256",
               "predictor.out_dim=64", "crop.scale=[0.3, 1.0]", "momentum=0.99"],
    "byol": ["projector.hidden_dim=256", "projector.out_dim=64", "predictor.hidden_dim=256",
             "predictor.out_dim=64", "crop.scale=[0.3, 1.0]", "momentum=0.99"],
    "simsiam": ["projector.hidden_dim=256", "projector.out_dim=256", "predictor.hidden_dim=64",
                "predictor.out_dim=256", "crop.scale=[0.3, 1.0]"],
    "dino": ["head.hidden_dim=256", "head.bottleneck_dim=64", "head.out_dim=1024",
             "global_crop.scale=[0.4, 1.0]", "local_crop.scale=[0.1, 0.4]", "local_crops=4",
             "local_size=16", "momentum=0.99"],
}
# The shared learning rate is the tiny config's (4e-3 per 256 images, 1e-3 at batch 64). DINO at
# the shared rate trains without the prototype freeze; DINO at its own (5e-4 per 256, 1.25e-4
# here) with its whole recipe, the freeze included.
NO_FREEZE = ["objectives.dino.freeze_prototypes_fraction=0"]
DINO_OWN_LR = ["optim.base_lr=5e-4"]
# arm -> (objectives, weighting[, further overrides]); None: the random encoder.
VARIANTS = {
    "random init": None,
    "simclr": (["simclr"], "learned"),
    "mocov3": (["mocov3"], "learned"),
    "byol": (["byol"], "learned"),
    "simsiam": (["simsiam"], "learned"),
    "dino": (["dino"], "learned", NO_FREEZE),
    "dino at its own lr": (["dino"], "learned", DINO_OWN_LR),
    "mae": (["mae"], "learned"),
    "[simclr, mae] fixed": (["simclr", "mae"], "fixed"),
    "[simclr, mae] learned": (["simclr", "mae"], "learned"),
    "[dino, mae] learned": (["dino", "mae"], "learned", NO_FREEZE),
    "[byol, mae] learned": (["byol", "mae"], "learned"),
}


def overrides_of(arm) -> list[str] | None:
    if arm is None:
        return None
    objectives, weighting, *further = arm
    return [f"objectives=[{', '.join(objectives)}]", f"weighting={weighting}",
            *[f"objectives.{name}.{setting}" for name in objectives for setting in HEADS[name]],
            *(further[0] if further else [])]


def run_variant(name, arm, seed, steps, pretrain_images, all_images, labels, work):
    overrides = overrides_of(arm)
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
        run_dir = work / f"{''.join(c for c in name if c.isalnum())}-{seed}"
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
    lines = ["| encoder | kNN top-1 | linear probe top-1 | 10-shot probe top-1 | seconds a run |",
             "| --- | ---: | ---: | ---: | ---: |"]
    for name in VARIANTS:
        runs = [r for r in results if r["variant"] == name]
        if not runs:
            continue
        cells = []
        for key in ("knn", "linear_probe", "ten_shot"):
            values = [r[key] for r in runs]
            spread = statistics.stdev(values) if len(values) > 1 else 0.0
            cells.append(f"{statistics.mean(values):.3f} +- {spread:.3f}")
        cells.append(f"{statistics.mean(r['seconds'] for r in runs):.0f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


LOSSES = ("contrastive", "mocov3", "byol", "simsiam", "dino", "masked")


def plot(results: list[dict], curves: dict[str, list[dict]], path: Path) -> None:
    """Each objective's loss and the hybrids' learned weights over training (first seed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(2, 4, figsize=(18, 7))
    panels = dict(zip(LOSSES, axes.flat))
    weights = axes.flat[len(LOSSES)]
    for variant, records in curves.items():
        if not records:
            continue
        steps = [c["step"] for c in records]
        for component, ax in panels.items():
            key = f"loss_{component}"
            if key in records[0]:
                ax.plot(steps, [c[key] for c in records], label=variant)
        if "learned" in variant and "[" in variant:
            for key in records[0]:
                if key.startswith("weight_"):
                    weights.plot(steps, [c[key] for c in records],
                                 label=f"{variant}: {key.removeprefix('weight_')}")
    for component, ax in panels.items():
        ax.set_title(f"loss_{component}", fontsize=10)
    weights.set_title("learned loss weights (hybrids)", fontsize=10)
    axes.flat[-1].axis("off")
    for ax in axes.flat[:-1]:
        ax.set_xlabel("step")
        if ax.get_lines():
            ax.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def load_previous(out: Path, steps: int) -> tuple[list[dict], dict]:
    """Runs (and first-seed curves) already in OUT from the same protocol: a long ablation is
    resumable, each finished run is kept and not run again. Another protocol starts afresh."""
    results_file, curves_file = out / "results.json", out / "curves.json"
    if not results_file.exists():
        return [], {}
    previous = json.loads(results_file.read_text())
    if (previous.get("steps"), previous.get("base_overrides"), previous.get("heads")) != (
            steps, BASE, HEADS):
        print(f"{results_file} is of another protocol: starting afresh", flush=True)
        return [], {}
    curves = json.loads(curves_file.read_text()) if curves_file.exists() else {}
    return previous["runs"], curves


def thinned(records: list[dict], every: int = 5) -> list[dict]:
    """Every ``every``-th step's losses, weights and signals: what the curves show."""
    keep = [r for r in records if r["step"] % every == 0 or r is records[-1]]
    return [{k: float(f"{v:.5g}") for k, v in r.items()
             if k == "step" or k.startswith(("loss", "weight_", "signal_"))} for r in keep]


def save(out: Path, steps: int, results: list[dict], curves: dict) -> None:
    seeds = sorted({r["seed"] for r in results})
    (out / "results.json").write_text(json.dumps(
        {"steps": steps, "seeds": seeds, "base_overrides": BASE, "heads": HEADS,
         "runs": results}, indent=2))
    (out / "curves.json").write_text(json.dumps(curves))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--arms", nargs="+", choices=list(VARIANTS), default=list(VARIANTS),
                        help="a subset of the arms (default: all)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", default="docs/ablation")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    images, labels = digits_images(IMAGE_SIZE)
    train, _ = split(labels, 0.5, seed=0)  # the same split evaluate_features holds out
    pretrain_images = [Image.fromarray(images[i]) for i in train]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results, curves = load_previous(out, args.steps)
    done = {(r["variant"], r["seed"]) for r in results}
    if done:
        print(f"{len(done)} runs already in {out}/results.json are kept", flush=True)
    first_seed = min(args.seeds + [r["seed"] for r in results])
    with tempfile.TemporaryDirectory() as work:
        for seed in args.seeds:
            for name in args.arms:
                if (name, seed) in done:
                    continue
                result = run_variant(name, VARIANTS[name], seed, args.steps, pretrain_images,
                                     images, labels, Path(work))
                print(f"seed {seed} {name:<22} kNN {result['knn']:.3f} probe "
                      f"{result['linear_probe']:.3f} 10-shot {result['ten_shot']:.3f} "
                      f"({result['seconds']:.0f} s)", flush=True)
                run_curves = result.pop("curves")
                if seed == first_seed:
                    curves[name] = thinned(run_curves)
                results.append(result)
                save(out, args.steps, results, curves)  # a killed ablation keeps what it ran
    (out / "table.md").write_text(table(results))
    plot(results, curves, out / "curves.png")
    print(table(results))


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
