"""Work-split orthogonalization under data parallelism.

After DDP's all-reduce every rank of the data-parallel group holds the same matrix-track inputs, so
computing Newton–Schulz everywhere is redundant. Here each rank orthogonalizes a contiguous share of
every same-shape bucket (buckets in a fixed, shape-sorted order, identical on all ranks) and the
shares are all-gathered. Each matrix is computed by exactly the batched kernel that would compute it
without splitting, so the results are bit-identical to every rank computing everything.

Splitting is only correct when the ranks' inputs are identical, so it happens only for an explicit
``data_parallel_group`` (the transformers/Accelerate integration passes DDP's). Before splitting, the
ranks compare a fingerprint of their tensor shapes in one small all-reduce; if they differ (e.g.
different parameters received gradients), every rank orthogonalizes its own tensors instead of
waiting in collectives that would never match.
"""

from __future__ import annotations

import math
import warnings
import zlib
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

OrthogonalizeFn = Callable[[list[Tensor], list[str]], list[Tensor]]
_warned_mismatch = False


def group_size(group: Any) -> int:
    """Size of ``group`` when ``torch.distributed`` is initialised, else 1."""
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


def _fingerprint(tensors: list[Tensor], views: list[str]) -> int:
    text = ";".join(f"{tuple(t.shape)}:{t.dtype}:{v}" for t, v in zip(tensors, views))
    return zlib.crc32(text.encode())


def _ranks_agree(tensors: list[Tensor], views: list[str], group: Any) -> bool:
    """Whether every rank of ``group`` holds the same list of shapes (one all-reduce of two ints)."""
    fp = _fingerprint(tensors, views)
    device = tensors[0].device if tensors else torch.device("cpu")
    if dist.get_backend(group) == "nccl" and device.type != "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    both = torch.tensor([fp, -fp], dtype=torch.int64, device=device)
    dist.all_reduce(both, op=dist.ReduceOp.MAX, group=group)
    return int(both[0]) == -int(both[1])


def split_orthogonalize(tensors: list[Tensor], views: list[str], *, orthogonalize: OrthogonalizeFn,
                        group: Any) -> list[Tensor]:
    """``orthogonalize(tensors, views)`` with the work split across the ranks of ``group``."""
    global _warned_mismatch
    world = group_size(group)
    if world <= 1:
        return orthogonalize(tensors, views)
    if not _ranks_agree(tensors, views, group):
        if not _warned_mismatch:
            warnings.warn(
                "hf_rmsuon: the ranks of the data-parallel group hold different matrix-track tensors, so "
                "their gradients cannot be replicas; each rank orthogonalizes its own (no split). If the "
                "ranks do not train one replicated model, do not pass a data_parallel_group.",
                RuntimeWarning, stacklevel=2,
            )
            _warned_mismatch = True
        return orthogonalize(tensors, views)
    rank = dist.get_rank(group)
    buckets: dict[tuple, list[int]] = defaultdict(list)
    for i, (t, v) in enumerate(zip(tensors, views)):
        buckets[(tuple(t.shape), str(t.dtype), v)].append(i)
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
            local[: len(mine)] = torch.stack(orthogonalize([tensors[i] for i in mine], [key[2]] * len(mine)))
        gathered = [torch.empty_like(local) for _ in range(world)]
        dist.all_gather(gathered, local, group=group)
        for owner in range(world):
            for j, i in enumerate(owner_chunk[owner]):
                results[i] = gathered[owner][j]
    return results  # type: ignore[return-value]
