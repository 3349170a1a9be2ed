"""The bf16 policy GPUs run, run here: two gloo ranks under FSDP2 with bf16 parameters.

What a user would notice: the step trains with finite losses close to fp32's, batch-norm
statistics stay fp32 and exact, FSDP prints no warning, and one step costs one all-gather and one
reduce-scatter per FSDP group, whatever the number of encoder passes or micro-batches.
"""

from __future__ import annotations

import collections
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils._python_dispatch import TorchDispatchMode

from tests.conftest import TINY_OVERRIDES, close_process_group, free_port

WORLD = 2


class CollectiveCounter(TorchDispatchMode):
    """Counts the c10d collectives dispatched while active (forward and backward)."""

    def __init__(self):
        super().__init__()
        self.counts: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "c10d":
            self.counts[func._overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def _fsdp_groups(model) -> int:
    from torch.distributed.fsdp import FSDPModule, fully_shard

    return len({id(fully_shard.state(m)) for m in model.modules() if isinstance(m, FSDPModule)})


def _steps(rank: int, mixed_precision: str, overrides=(), reshard_after_forward=False) -> dict:
    """Three steps on fixed views; returns global losses, dtypes seen, collectives of step 3."""
    from pipelines.sample_images import random_view_batches, sample_photographs
    from ssl_train.config import load_config
    from ssl_train.distributed.collectives import average_over_ranks
    from ssl_train.objectives import StepContext
    from ssl_train.train.loop import Trainer
    from ssl_train.train.step import normalize_views, train_step

    config = load_config("tiny-cpu", [
        *TINY_OVERRIDES, "optim.warmup_steps=0", f"parallel.mixed_precision={mixed_precision}",
        f"parallel.reshard_after_forward={str(reshard_after_forward).lower()}", *overrides])
    trainer = Trainer(config, "cpu", rank, WORLD)
    model, optimizer, scheduler = trainer.model, trainer.optimizer, trainer.scheduler
    seen: dict[str, str] = {}

    def block_input(module, args):
        seen.setdefault("block_input", str(args[0].dtype))

    def prediction(module, args, out):
        seen.setdefault("prediction", str(out.dtype))

    model.encoder.blocks[0].register_forward_pre_hook(block_input)
    model.objectives["mae"].decoder.register_forward_hook(prediction)
    batches = random_view_batches(sample_photographs(), config.model.image_size,
                                  config.train.global_batch_size, seed=5)
    per = config.train.global_batch_size // WORLD
    losses, counter = [], CollectiveCounter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(3):
            mine = {k: v[rank * per:(rank + 1) * per] for k, v in next(batches).items()}
            views = normalize_views(mine)
            inputs = model.step_inputs(StepContext(config.train.seed, step, rank, WORLD,
                                                   config.train.global_batch_size))
            if step == 2:
                with counter:
                    record = train_step(model, optimizer, scheduler, views, config, inputs)
            else:
                record = train_step(model, optimizer, scheduler, views, config, inputs)
            losses.append(average_over_ranks(record))
    norm = model.objectives["simclr"].projector.layers[1]
    return {"losses": losses, "seen": seen, "collectives": dict(counter.counts),
            "groups": _fsdp_groups(model), "warnings": [str(w.message) for w in caught],
            "running_dtype": str(norm.running_mean.dtype),
            "running_moved": float(norm.running_mean.abs().sum())}


def _batch_norm(rank: int) -> dict:
    """GlobalBatchNorm1d on bf16 inputs whose mean is 100 times their spread."""
    from ssl_train.models.heads import GlobalBatchNorm1d

    generator = torch.Generator().manual_seed(11)
    everything = (100 + torch.randn(WORLD * 64, 8, generator=generator)).bfloat16()
    norm = GlobalBatchNorm1d(8, momentum=1.0)  # running statistics = this batch's
    out = norm(everything[rank * 64:(rank + 1) * 64])
    return {"out_dtype": str(out.dtype), "running_var": norm.running_var.clone(),
            "running_mean": norm.running_mean.clone(), "input": everything}


def _rank_main(rank: int, port: int, out_path: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=WORLD)
    torch.set_num_threads(1)
    try:
        results = {
            "bf16": _steps(rank, "bf16"),
            "fp32": _steps(rank, "fp32"),
            "auto": _steps(rank, "auto"),
            "bf16_accumulated": _steps(rank, "bf16", ["optim.accumulation_steps=2"]),
            "bf16_zero3": _steps(rank, "bf16", reshard_after_forward=True),
            "batch_norm": _batch_norm(rank),
        }
        torch.save(results, f"{out_path}.{rank}")
    finally:
        close_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("precision") / "result"
    mp.start_processes(_rank_main, args=(free_port(), str(out)), nprocs=WORLD,
                       start_method="spawn")
    return [torch.load(f"{out}.{rank}", weights_only=False) for rank in range(WORLD)]


def test_bf16_on_cpu_trains_with_finite_losses_close_to_fp32(ranks):
    bf16, fp32 = ranks[0]["bf16"], ranks[0]["fp32"]
    # The policy took effect: blocks compute in bf16, the decoder predicts in bf16.
    assert bf16["seen"] == {"block_input": "torch.bfloat16", "prediction": "torch.bfloat16"}
    assert fp32["seen"] == {"block_input": "torch.float32", "prediction": "torch.float32"}
    for step in range(3):
        for key in ("loss", "loss_contrastive", "loss_masked"):
            value = bf16["losses"][step][key]
            assert torch.isfinite(torch.tensor(value)), (step, key)
            assert value == pytest.approx(fp32["losses"][step][key], rel=0.02), (step, key)
    assert bf16["losses"][2]["loss"] != pytest.approx(bf16["losses"][0]["loss"], rel=1e-3)


def test_auto_precision_is_fp32_on_cpu_workers(ranks):
    assert ranks[0]["auto"]["seen"]["block_input"] == "torch.float32"
    assert ranks[0]["auto"]["losses"] == ranks[0]["fp32"]["losses"]


def test_batch_norm_running_statistics_stay_fp32_under_bf16(ranks):
    for rank in ranks:
        assert rank["bf16"]["running_dtype"] == "torch.float32"
        assert rank["bf16"]["running_moved"] > 0  # they were updated, not left at zero


def test_global_batch_norm_is_exact_on_bf16_inputs_with_a_large_mean(ranks):
    values = ranks[0]["batch_norm"]["input"].double()
    for rank in ranks:
        assert rank["batch_norm"]["out_dtype"] == "torch.bfloat16"
        assert rank["batch_norm"]["running_mean"].double() == pytest.approx(
            values.mean(0), rel=1e-6)
        # E[x^2] - E[x]^2 in bf16 would be off by far more than the variance itself here.
        assert rank["batch_norm"]["running_var"].double() == pytest.approx(
            values.var(0), rel=1e-4)


def test_no_fsdp_warning_in_any_step(ranks):
    for rank in ranks:
        for name in ("bf16", "fp32", "bf16_accumulated", "bf16_zero3"):
            assert not [w for w in rank[name]["warnings"] if "FSDP" in w], name


def test_one_all_gather_and_one_reduce_scatter_per_group_a_step(ranks):
    result = ranks[0]["bf16"]
    # 2 encoder blocks (the first with the patch embedding), 1 decoder block, the loss
    # weighting and the root.
    assert result["groups"] == 5
    # The encoder runs three times a step (two contrastive views in one pass, the visible patches
    # in another; both passes' backward), yet each group is gathered once and reduced once.
    assert result["collectives"]["_allgather_base_"] == result["groups"]
    assert result["collectives"]["_reduce_scatter_base_"] == result["groups"]
    # The losses' own: one gather of both views' projections and one of the batch-norm
    # statistics, and their backward all-reduces.
    assert result["collectives"]["allgather_"] == 2
    assert result["collectives"]["allreduce_"] == 2
    accumulated = ranks[0]["bf16_accumulated"]["collectives"]
    assert accumulated["_allgather_base_"] == result["groups"]  # two micro-batches, one gather
    # FSDP2 reduces the gradient held from the first micro-batch at the first post-backward of a
    # group used by two encoder passes, and the rest at the second: one more reduce-scatter for
    # each encoder block but the first (whose inputs, the images, carry no gradient).
    assert accumulated["_reduce_scatter_base_"] == result["groups"] + 1


def test_resharding_after_forward_trades_gathers_for_memory(ranks):
    zero3 = ranks[0]["bf16_zero3"]
    groups = zero3["groups"]
    # Blocks are gathered again for the second encoder pass and in backward; the root and the
    # loss weighting are not resharded.
    assert zero3["collectives"]["_allgather_base_"] > groups
    assert zero3["collectives"]["_reduce_scatter_base_"] == groups
    for resharded, kept in zip(zero3["losses"], ranks[0]["bf16"]["losses"]):
        assert resharded["loss"] == pytest.approx(kept["loss"], rel=1e-5)
