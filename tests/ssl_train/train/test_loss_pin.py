"""Today's losses, pinned: the tiny hybrid's first two steps on fixed inputs, 1 and 2 workers.

A restructuring of the model, the objectives or the training step must leave these numbers as
they are (to float rounding). The pinned values are in ``pinned_losses.json`` beside this file;
after an intended change of behaviour, regenerate them with

    .venv/bin/python -m tests.ssl_train.train.test_loss_pin

and say in the change why they moved.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tests.conftest import TINY_OVERRIDES, close_process_group, free_port

PINNED = Path(__file__).with_name("pinned_losses.json")
KEYS = ("loss", "loss_contrastive", "loss_masked", "weight_contrastive", "weight_masked",
        "grad_norm")


def _rank_main(rank: int, world: int, port: int, out: str) -> None:
    from pipelines.sample_images import random_view_batches, sample_photographs
    from ssl_train.config import load_config
    from ssl_train.distributed.collectives import average_over_ranks
    from ssl_train.train.loop import Trainer

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    torch.set_num_threads(1)
    try:
        config = load_config("tiny-cpu", [*TINY_OVERRIDES, "optim.warmup_steps=0"])
        batches = random_view_batches(sample_photographs(), config.model.image_size,
                                      config.train.global_batch_size, seed=5)
        trainer = Trainer(config, "cpu", rank, world)
        per = config.train.global_batch_size // world
        steps = []
        for step in range(2):
            mine = {k: v[rank * per:(rank + 1) * per] for k, v in next(batches).items()}
            record = average_over_ranks(trainer.step(mine, step))
            steps.append({key: record[key] for key in KEYS})
        if rank == 0:
            Path(out).write_text(json.dumps(steps))
    finally:
        close_process_group()


def losses(world: int, out: Path) -> list[dict]:
    mp.start_processes(_rank_main, args=(world, free_port(), str(out)), nprocs=world,
                       start_method="spawn")
    return json.loads(out.read_text())


@pytest.mark.parametrize("world", [1, 2])
def test_the_first_two_steps_give_todays_losses(world, tmp_path):
    pinned = json.loads(PINNED.read_text())
    measured = losses(world, tmp_path / "losses.json")
    for step, (got, expected) in enumerate(zip(measured, pinned)):
        for key in KEYS:
            assert got[key] == pytest.approx(expected[key], rel=1e-5), (world, step, key)


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        values = losses(1, Path(folder) / "losses.json")
    PINNED.write_text(json.dumps(values, indent=2) + "\n")
    print(f"wrote {PINNED}", file=sys.stderr)
