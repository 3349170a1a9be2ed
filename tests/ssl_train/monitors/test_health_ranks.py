"""The collapse monitor across ranks: a bounded number of held rows, the signals computed on
rank 0 alone and the same values on every rank, equal to one process's on the same rows."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ssl_train.config import load_config
from ssl_train.models.ssl_model import SSLModel
from tests.conftest import TINY_OVERRIDES, close_process_group, free_port

ROWS_PER_RANK = 5


def _model():
    torch.manual_seed(0)
    return SSLModel(load_config("tiny-cpu", TINY_OVERRIDES))


def _held(rank: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(100 + rank)
    return {name: torch.rand(ROWS_PER_RANK, 3, 32, 32, generator=generator)
            for name in ("view_a", "view_b")}


def _rank_main(rank: int, world: int, port: int, limit: int, out: str) -> None:
    from ssl_train.runtime import worker

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    torch.set_num_threads(1)
    try:
        worker.HEALTH_ROWS = limit
        health = worker.representation_health(_model(), _held(rank))
        Path(f"{out}.{rank}").write_text(json.dumps(health))
    finally:
        close_process_group()


def test_health_is_computed_on_rank_zero_from_a_bounded_share_of_each_ranks_rows(tmp_path):
    limit = 6  # of the 10 held rows: 3 of each rank's 5
    out = str(tmp_path / "health")
    mp.start_processes(_rank_main, args=(2, free_port(), limit, out), nprocs=2,
                       start_method="spawn")
    ranks = [json.loads(Path(f"{out}.{rank}").read_text()) for rank in (0, 1)]
    assert ranks[0] == ranks[1], "every rank gets rank 0's values"

    from ssl_train.runtime import worker

    share = min(ROWS_PER_RANK, limit // 2)  # 3 rows of each rank under a limit of 6
    rows = {name: torch.cat([_held(rank)[name][:share] for rank in (0, 1)])
            for name in ("view_a", "view_b")}
    expected = worker.representation_health(_model(), rows)  # one process, the same rows
    assert ranks[0] == pytest.approx(expected, rel=1e-5)
    assert set(expected) >= {"embedding_std", "effective_rank", "uniformity", "alignment"}
