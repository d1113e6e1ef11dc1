"""Work-split Newton–Schulz under 2-process CPU data parallelism (gloo): bit-identical results with
and without splitting, and each rank orthogonalizes only its share of the matrices — but only for an
explicit data-parallel group: an initialised process group alone never mixes ranks' updates, and ranks
with different tensors never hang."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from _numeric import free_port

import hf_rmsuon
from hf_rmsuon import functional as F

WORLD = 2


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    # several same-shape matrices (a bucket to split), odd-sized buckets, a conv and 1-D params
    return torch.nn.Sequential(
        torch.nn.Linear(16, 32), torch.nn.Linear(32, 32), torch.nn.Linear(32, 32), torch.nn.Linear(32, 32),
        torch.nn.Linear(32, 8), torch.nn.Conv1d(8, 8, 3),
    )


def _train(name: str, split: bool, steps: int = 3, grad_seed: int = 100, group=None,
           model: torch.nn.Module | None = None) -> tuple[list[torch.Tensor], int]:
    """Run ``steps`` updates with gradients seeded by ``grad_seed`` (the same on every rank, as after an
    all-reduce, unless the caller varies it per rank); return params and #matrices NS'd."""
    model = model or _model()
    if split and group is None and dist.is_initialized():
        group = dist.group.WORLD
    opt = hf_rmsuon.create_optimizer(name, model, lr=1e-2, split_ns=split, ns_dtype="float32",
                                     data_parallel_group=group)
    processed = [0]
    original = F.newton_schulz

    def counting(x, *args, **kwargs):
        processed[0] += x.shape[0] if x.ndim == 3 else 1
        return original(x, *args, **kwargs)

    F.newton_schulz = counting
    try:
        for step in range(steps):
            g = torch.Generator().manual_seed(grad_seed + step)
            for p in model.parameters():
                p.grad = torch.randn(p.shape, generator=g)
            opt.step()
    finally:
        F.newton_schulz = original
    return [p.detach().clone() for p in model.parameters()], processed[0]


def _worker(rank: int, port: int, name: str, queue) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    try:
        split_params, split_count = _train(name, split=True)
        full_params, full_count = _train(name, split=False)
        identical = all(torch.equal(a, b) for a, b in zip(split_params, full_params))
        # the other rank computed the same thing: compare checksums across ranks
        checksum = torch.stack([p.double().sum() for p in split_params])
        gathered = [torch.zeros_like(checksum) for _ in range(WORLD)]
        dist.all_gather(gathered, checksum)
        queue.put((rank, identical, split_count, full_count, torch.equal(gathered[0], gathered[1])))
    finally:
        dist.destroy_process_group()



@pytest.mark.parametrize("name", ["muon", "ada_rmsuon"])
def test_split_newton_schulz_is_bit_identical_and_shares_work(name):
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, port, name, queue))
             for r in range(WORLD)]
    for p in procs:
        p.start()
    results = sorted(queue.get(timeout=120) for _ in range(WORLD))
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    matrices_per_step = 6  # 5 Linear weights + 1 conv weight on the matrix track
    for rank, identical, split_count, full_count, ranks_agree in results:
        assert identical, f"rank {rank}: split results differ from unsplit"
        assert ranks_agree
        assert full_count == 3 * matrices_per_step
        # shape-sorted buckets (8,8,3), (8,32), (32,16), (32,32)×3; chunk c of bucket b goes to
        # rank (c+b)%2: rank 0 gets (8,8,3), (32,16) and one (32,32); rank 1 (8,32) and two (32,32)
        assert split_count == 3 * 3
    assert results[0][2] + results[1][2] == 3 * matrices_per_step  # every matrix once, no duplicates


def test_single_process_never_splits():
    _, count = _train("muon", split=True, steps=1)
    assert count == 6


# --------------------------------------------------------------------------------------------------
# No data-parallel group: a process group alone never splits, never mixes, never hangs
# --------------------------------------------------------------------------------------------------


def _independent_worker(rank: int, port: int, queue) -> None:
    """Ranks with *different* gradients (no DDP), and then with different parameter sets."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    try:
        # 1. a process group is open, split_ns is on (the default), gradients differ per rank
        model = _model()
        opt = hf_rmsuon.create_optimizer("muon", model, lr=1e-2, ns_dtype="float32")  # no data_parallel_group
        g = torch.Generator().manual_seed(1000 * (rank + 1))
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=g)
        opt.step()
        alone, _ = _train("muon", split=False, steps=1, grad_seed=1000 * (rank + 1))
        own = all(torch.equal(p.detach(), a) for p, a in zip(model.parameters(), alone))
        # 2. a data-parallel group is given, but the ranks hold different parameter sets: the shape
        # check sees it and each rank orthogonalizes its own tensors (no hang, no mixing)
        extra = [torch.nn.Linear(8, 8)] if rank == 1 else []
        model2 = torch.nn.Sequential(_model(), *extra)
        with pytest.warns(RuntimeWarning, match="different matrix-track tensors"):
            after, _ = _train("muon", split=True, steps=2, grad_seed=7, group=dist.group.WORLD, model=model2)
        alone2, _ = _train("muon", split=False, steps=2, grad_seed=7,
                           model=torch.nn.Sequential(_model(), *([torch.nn.Linear(8, 8)] if rank == 1 else [])))
        own2 = all(torch.equal(a, b) for a, b in zip(after, alone2))
        queue.put((rank, own, own2))
    finally:
        dist.destroy_process_group()


def test_no_split_or_mixing_without_a_data_parallel_group():
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_independent_worker, args=(r, port, queue)) for r in range(WORLD)]
    for p in procs:
        p.start()
    results = sorted(queue.get(timeout=120) for _ in range(WORLD))  # a hang fails here, bounded
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    for rank, own, own2 in results:
        assert own, f"rank {rank}: update differs from its own single-process update"
        assert own2, f"rank {rank}: differing parameter sets changed the update"
