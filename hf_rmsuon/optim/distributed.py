"""Work-split orthogonalization under data parallelism.

After DDP's all-reduce every rank holds the same matrix-track inputs, so computing Newton–Schulz
everywhere is redundant. Here each rank orthogonalizes a contiguous share of every same-shape
bucket (buckets in a fixed, shape-sorted order, identical on all ranks) and the shares are
all-gathered. Each matrix is computed by exactly the batched kernel that would compute it without
splitting, so the results are bit-identical to every rank computing everything.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import Tensor

OrthogonalizeFn = Callable[[list[Tensor]], list[Tensor]]


def data_parallel_world() -> int:
    """World size when ``torch.distributed`` is initialised, else 1."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def split_orthogonalize(tensors: list[Tensor], orthogonalize: OrthogonalizeFn) -> list[Tensor]:
    """``orthogonalize(tensors)`` with the work split across the ranks of the default group."""
    world, rank = dist.get_world_size(), dist.get_rank()
    buckets: dict[tuple, list[int]] = defaultdict(list)
    for i, t in enumerate(tensors):
        buckets[(tuple(t.shape), str(t.dtype))].append(i)
    results: list[Tensor | None] = [None] * len(tensors)
    for b, key in enumerate(sorted(buckets)):
        indices = buckets[key]
        share = math.ceil(len(indices) / world)
        # chunk c of bucket b belongs to rank (c + b) % world: rotating per bucket spreads the many
        # single-matrix buckets round-robin instead of piling them on rank 0
        chunks = [indices[c * share:(c + 1) * share] for c in range(world)]
        owner_chunk = [chunks[(r - b) % world] for r in range(world)]
        template = tensors[indices[0]]
        local = torch.zeros((share, *template.shape), dtype=template.dtype, device=template.device)
        mine = owner_chunk[rank]
        if mine:
            local[: len(mine)] = torch.stack(orthogonalize([tensors[i] for i in mine]))
        gathered = [torch.empty_like(local) for _ in range(world)]
        dist.all_gather(gathered, local)
        for owner in range(world):
            for j, i in enumerate(owner_chunk[owner]):
                results[i] = gathered[owner][j]
    return results  # type: ignore[return-value]
