"""The four objectives with their own heads and targets (MoCo v3, BYOL, SimSiam, DINO): 1 and 2
FSDP workers agree, each learns on real photographs without collapsing, and a resumed EMA
teacher continues exactly where it was."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pipelines.sample_images import random_view_batches, sample_photographs
from ssl_train.config import load_config
from ssl_train.monitors.health import embedding_std, healthy_embedding_std
from ssl_train.train.checkpoint import load_checkpoint, save_checkpoint
from ssl_train.train.loop import Trainer
from ssl_train.train.step import normalize_views
from tests.conftest import TINY_OVERRIDES, close_process_group, free_port

OBJECTIVES = ("mocov3", "byol", "simsiam", "dino")
# Small heads, so that 50 steps of each objective take seconds on two cores.
SMALL_HEADS = [
    "objectives.mocov3.projector.hidden_dim=128", "objectives.mocov3.projector.out_dim=64",
    "objectives.mocov3.predictor.hidden_dim=128", "objectives.mocov3.predictor.out_dim=64",
    "objectives.byol.projector.hidden_dim=128", "objectives.byol.projector.out_dim=64",
    "objectives.byol.predictor.hidden_dim=128", "objectives.byol.predictor.out_dim=64",
    "objectives.simsiam.projector.hidden_dim=128", "objectives.simsiam.projector.out_dim=64",
    "objectives.simsiam.predictor.hidden_dim=32", "objectives.simsiam.predictor.out_dim=64",
    "objectives.dino.head.hidden_dim=128", "objectives.dino.head.bottleneck_dim=64",
    "objectives.dino.head.out_dim=256", "objectives.dino.local_crops=2",
]
# DINO at its own learning rate (5e-4 per 256 images); at the tiny config's (8x more) the
# student drifts towards the flat teacher within 50 steps.
OWN_OPTIM = {"dino": ["optim.base_lr=5e-4"]}


# DINO's prototypes frozen for the first of the two steps: both paths run under FSDP2.
FROZEN_FIRST = {"dino": ["train.steps=4", "objectives.dino.freeze_prototypes_fraction=0.25"]}


def objective_config(name: str, *extra: str):
    return load_config("tiny-cpu", [*TINY_OVERRIDES, f"objectives=[{name}]",
                                    f"objectives.{name}.crop.scale=[0.3, 1.0]"
                                    if name != "dino" else "objectives.dino.local_size=16",
                                    *[o for o in SMALL_HEADS if o.startswith(f"objectives.{name}.")],
                                    "optim.warmup_steps=0", "train.global_batch_size=16",
                                    "data.quality.min_side=16", *OWN_OPTIM.get(name, []),
                                    *extra])


def _batches(config, seed: int = 5):
    return random_view_batches(sample_photographs(), config.model.image_size,
                               config.train.global_batch_size, seed=seed, views=config.views())


def _first_steps(trainer: Trainer, config, rank: int = 0, world: int = 1, steps: int = 2):
    """Losses of the first steps (averaged over ranks) and the DINO center after them."""
    from ssl_train.distributed.collectives import average_over_ranks

    batches, per = _batches(config), config.train.global_batch_size // world
    losses = []
    for step in range(steps):
        mine = {k: v[rank * per:(rank + 1) * per] for k, v in next(batches).items()}
        losses.append(average_over_ranks(trainer.step(mine, step))["loss"])
    center = getattr(trainer.model.objectives[config.objective_names[0]], "center", None)
    return {"losses": losses, "center": None if center is None else center.sum().item()}


def _rank_main(rank: int, world: int, port: int, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    torch.set_num_threads(1)
    try:
        results = {}
        for name in OBJECTIVES:
            config = objective_config(name, *FROZEN_FIRST.get(name, []))
            results[name] = _first_steps(Trainer(config, "cpu", rank, world), config, rank, world)
        for name in ("mocov3", "dino"):  # teachers under FSDP2's bf16 policy (on gloo)
            config = objective_config(name, "parallel.mixed_precision=bf16",
                                      *FROZEN_FIRST.get(name, []))
            results[f"{name}-bf16"] = _first_steps(Trainer(config, "cpu", rank, world), config,
                                                   rank, world)
        if rank == 0:
            Path(out).write_text(json.dumps(results))
    finally:
        close_process_group()


def test_one_and_two_fsdp_workers_give_the_same_first_losses(tmp_path):
    """Global negatives (MoCo v3), global batch norm in the heads (all but DINO) and the
    all-reduced center (DINO): two workers compute what one computes on the whole batch, and
    their EMA teachers, updated shard by shard, stay the same (the second step's loss)."""
    out = tmp_path / "two.json"
    mp.start_processes(_rank_main, args=(2, free_port(), str(out)), nprocs=2,
                       start_method="spawn")
    two = json.loads(out.read_text())
    for name in OBJECTIVES:
        config = objective_config(name, *FROZEN_FIRST.get(name, []))
        one = _first_steps(Trainer(config), config)
        # abs: SimSiam's loss is a cosine near 0; one Adam step apart, float rounding is ~3e-6
        assert two[name]["losses"] == pytest.approx(one["losses"], rel=1e-5, abs=1e-5), name
        if name == "dino":
            assert two[name]["center"] == pytest.approx(one["center"], rel=1e-5, abs=1e-7)
    for name in ("mocov3", "dino"):  # bf16 compute: the same losses to bf16's precision
        assert two[f"{name}-bf16"]["losses"] == pytest.approx(two[name]["losses"], rel=3e-2), name


@pytest.mark.parametrize("name", OBJECTIVES)
def test_fifty_steps_lower_the_loss_without_collapse(name):
    config = objective_config(name, "train.steps=50")
    trainer, batches = Trainer(config), _batches(config, seed=1)
    records = [trainer.step(next(batches), step) for step in range(50)]
    # DINO's loss is H(teacher) + KL(teacher || student). Centering flattens the teacher over the
    # first steps (its entropy rises towards log K), so the student's part, the KL, is what
    # must fall; its gradient is the loss's.
    key = "signal_dino_kl" if name == "dino" else "loss"
    losses = [record[key] for record in records]
    assert all(np.isfinite([record["loss"] for record in records]))
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.05 * abs(np.mean(losses[:5])), losses

    held = normalize_views(next(_batches(config, seed=99)))
    model = trainer.model.eval()
    with torch.no_grad():
        embedded = model.embed(held[model.views()[0].name])
    assert embedding_std(embedded) > 0.5 * healthy_embedding_std(embedded.shape[1]), name


def test_dinos_prototypes_take_no_update_while_frozen():
    config = objective_config("dino", "train.steps=4", "objectives.dino.freeze_prototypes_fraction=0.5")
    trainer, batches = Trainer(config), _batches(config)
    head = trainer.model.objectives["dino"].head
    snapshots = [(head.prototypes.detach().clone(), head.mlp[0].weight.detach().clone())]
    for step in range(3):
        trainer.step(next(batches), step)
        snapshots.append((head.prototypes.detach().clone(), head.mlp[0].weight.detach().clone()))
    (p0, m0), (p1, m1), (p2, m2), (p3, _) = snapshots
    assert torch.equal(p0, p1) and torch.equal(p1, p2), "frozen prototypes moved (steps 0, 1)"
    assert not torch.equal(m0, m1), "the rest of the head must train while the prototypes rest"
    assert not torch.equal(p2, p3), "the prototypes must train after the frozen part (step 2)"


@pytest.mark.parametrize("name", ["dino", "byol"])
def test_a_resumed_teacher_continues_exactly(name, tmp_path):
    config = objective_config(name, "train.steps=6")
    straight = Trainer(config)
    batches = _batches(config)
    expected = [straight.step(next(batches), step)["loss"] for step in range(4)]

    first = Trainer(config)
    batches = _batches(config)
    for step in range(2):
        first.step(next(batches), step)
    save_checkpoint(tmp_path, first.model, first.optimizer, {"step": 2})
    resumed = Trainer(config)
    load_checkpoint(tmp_path, resumed.model, resumed.optimizer)
    resumed.scheduler.load_state_dict(first.scheduler.state_dict())
    after = [resumed.step(next(batches), step)["loss"] for step in (2, 3)]
    assert after == expected[2:], "the loss after resume differs from the uninterrupted run"


@pytest.mark.parametrize("name", ["byol", "mocov3", "simsiam"])
def test_a_predictor_that_cannot_regress_the_projection_is_a_config_error(name):
    from ssl_train.config import ConfigError

    with pytest.raises(ConfigError, match=f"objectives.{name}.predictor.out_dim \\(32\\) must "
                                          f"equal objectives.{name}.projector.out_dim"):
        objective_config(name, f"objectives.{name}.predictor.out_dim=32")
