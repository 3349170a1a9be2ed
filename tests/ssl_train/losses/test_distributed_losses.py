"""Across workers, NT-Xent and the projection head's batch norm see the global batch.

Two real processes on the gloo backend: their losses and gradients must equal those of one
process holding the whole batch.
"""

from __future__ import annotations

import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ssl_train.losses import nt_xent_loss
from ssl_train.models.heads import ProjectionHead
from tests.conftest import close_process_group

WORLD = 2
N_PER_RANK = 4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _inputs():
    generator = torch.Generator().manual_seed(7)
    z_a = torch.randn(WORLD * N_PER_RANK, 16, generator=generator)
    z_b = torch.randn(WORLD * N_PER_RANK, 16, generator=generator)
    features = torch.randn(WORLD * N_PER_RANK * 2, 32, generator=generator)
    return z_a, z_b, features


def _head():
    torch.manual_seed(3)
    return ProjectionHead(32, 64, 16)


def _rank_main(rank: int, port: int, out_path: str) -> None:
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD
    )
    try:
        z_a, z_b, features = _inputs()
        part = slice(rank * N_PER_RANK, (rank + 1) * N_PER_RANK)
        local_a = z_a[part].clone().requires_grad_()
        local_b = z_b[part].clone().requires_grad_()
        loss = nt_xent_loss(local_a, local_b, 0.2)
        loss.backward()

        head = _head()
        local_features = features[rank * 2 * N_PER_RANK : (rank + 1) * 2 * N_PER_RANK]
        projected = head(local_features)
        torch.save(
            {"loss": loss.detach(), "grad_a": local_a.grad, "grad_b": local_b.grad,
             "projected": projected.detach()},
            f"{out_path}.{rank}",
        )
    finally:
        close_process_group()


@pytest.fixture(scope="module")
def rank_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist") / "result"
    mp.start_processes(_rank_main, args=(_free_port(), str(out)), nprocs=WORLD,
                       start_method="spawn")
    return [torch.load(f"{out}.{rank}") for rank in range(WORLD)]


def test_two_ranks_compute_the_global_nt_xent(rank_results):
    z_a, z_b, _ = _inputs()
    full = nt_xent_loss(z_a, z_b, 0.2)
    averaged = sum(r["loss"] for r in rank_results) / WORLD
    assert float(averaged) == pytest.approx(float(full), rel=1e-6)
    # Each rank's own loss differs from the global one: it really used the other rank's samples.
    local_only = nt_xent_loss(z_a[:N_PER_RANK], z_b[:N_PER_RANK], 0.2)
    assert float(rank_results[0]["loss"]) != pytest.approx(float(local_only), rel=1e-3)


def test_gradients_flow_back_through_the_gather(rank_results):
    z_a, z_b, _ = _inputs()
    z_a.requires_grad_()
    z_b.requires_grad_()
    nt_xent_loss(z_a, z_b, 0.2).backward()
    for rank, result in enumerate(rank_results):
        part = slice(rank * N_PER_RANK, (rank + 1) * N_PER_RANK)
        # Gradient averaging over ranks divides by WORLD; before it, a rank holds WORLD x dL/dz.
        torch.testing.assert_close(result["grad_a"] / WORLD, z_a.grad[part])
        torch.testing.assert_close(result["grad_b"] / WORLD, z_b.grad[part])


def test_projection_head_normalises_over_the_global_batch(rank_results):
    _, _, features = _inputs()
    full = _head()(features).detach()
    both = torch.cat([r["projected"] for r in rank_results])
    torch.testing.assert_close(both, full, rtol=1e-4, atol=1e-5)
