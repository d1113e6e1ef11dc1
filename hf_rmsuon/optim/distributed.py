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


def _fingerprint(tensors: list[Tensor], views: list[str], shapes: list[tuple[int, ...]] | None = None) -> int:
    shapes = shapes if shapes is not None else [tuple(t.shape) for t in tensors]
    text = ";".join(f"{tuple(s)}:{t.dtype}:{v}" for t, v, s in zip(tensors, views, shapes))
    return zlib.crc32(text.encode())


def _ranks_agree(tensors: list[Tensor], views: list[str], group: Any,
                 shapes: list[tuple[int, ...]] | None = None) -> bool:
    """Whether every rank of ``group`` holds the same list of (global) shapes (one all-reduce of two ints)."""
    fp = _fingerprint(tensors, views, shapes)
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


# --------------------------------------------------------------------------------------------------
# FSDP2: sharded parameters (DTensor, Shard(0) on a 1-D mesh), owner-computes Newton–Schulz
# --------------------------------------------------------------------------------------------------

SUPPORTED_LAYOUT = ("FSDP2 (torch.distributed.fsdp.fully_shard, or transformers' DistributedConfig(fsdp_size=N)) "
                    "on a 1-D device mesh with Shard(0) placements, or DDP, or one process")


def _is_dtensor(t: Tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - builds without distributed
        return False
    return isinstance(t, DTensor)


class ShardedLayout:
    """FSDP2's layout of an optimizer's parameters: all DTensors on one 1-D mesh, sharded on dim 0
    with ``torch.chunk``'s rule (rank ``r`` holds rows ``[r·c, (r+1)·c)``, ``c = ⌈rows/world⌉``)."""

    def __init__(self, mesh: Any) -> None:
        self.mesh = mesh
        self.group = mesh.get_group()
        self.world = mesh.size()
        self.rank = mesh.get_local_rank()

    @classmethod
    def of(cls, params: list[Tensor], owner: str) -> ShardedLayout | None:
        """The layout of ``params``, ``None`` for plain tensors; unsupported layouts raise."""
        sharded = [p for p in params if _is_dtensor(p)]
        if not sharded:
            return None
        if len(sharded) != len(params):
            raise ValueError(f"{owner}: a param group mixes DTensor (sharded) and plain parameters; "
                             f"supported: {SUPPORTED_LAYOUT}")
        from torch.distributed.tensor import Shard

        mesh = sharded[0].device_mesh
        for p in sharded:
            if p.device_mesh.ndim != 1:
                raise ValueError(
                    f"{owner}: a parameter lives on a {p.device_mesh.ndim}-D device mesh (HSDP or tensor "
                    f"parallel); Newton–Schulz needs whole matrices and only this is supported: {SUPPORTED_LAYOUT}")
            if tuple(p.placements) != (Shard(0),):
                raise ValueError(f"{owner}: a parameter has placements {tuple(p.placements)}; supported: "
                                 f"{SUPPORTED_LAYOUT}")
            if p.device_mesh != mesh:
                raise ValueError(f"{owner}: parameters on different device meshes; supported: {SUPPORTED_LAYOUT}")
        return cls(mesh)

    def same_mesh(self, other: ShardedLayout) -> bool:
        return self.mesh == other.mesh

    def rows(self, total: int) -> list[int]:
        """Rows of a ``total``-row tensor held by each rank."""
        chunk = math.ceil(total / self.world) if total else 0
        return [max(0, min(chunk, total - r * chunk)) for r in range(self.world)]

    def gather_rows(self, parts: list[Tensor]) -> list[Tensor]:
        """Per-row partial results of this rank's shards → the whole tensors' per-row results, rank by
        rank in row order (one all-gather of the row counts, one of the values)."""
        if not parts:
            return []
        device = parts[0].device
        counts = torch.tensor([p.numel() for p in parts], dtype=torch.int64, device=device)
        all_counts = [torch.empty_like(counts) for _ in range(self.world)]
        dist.all_gather(all_counts, counts, group=self.group)
        sizes = [int(c.sum()) for c in all_counts]
        buffer = torch.zeros(max(sizes), dtype=parts[0].dtype, device=device)
        mine = torch.cat([p.reshape(-1) for p in parts])
        buffer[:mine.numel()] = mine
        gathered = [torch.empty_like(buffer) for _ in range(self.world)]
        dist.all_gather(gathered, buffer, group=self.group)
        pieces: list[list[Tensor]] = [[] for _ in parts]
        for r in range(self.world):
            offset = 0
            for i, n in enumerate(all_counts[r].tolist()):
                pieces[i].append(gathered[r][offset:offset + n])
                offset += n
        return [torch.cat(p) for p in pieces]

    def all_true(self, flag: Tensor) -> Tensor:
        """Whether ``flag`` holds on every rank (one all-reduce)."""
        value = flag.to(torch.float32).reshape(1)
        dist.all_reduce(value, op=dist.ReduceOp.MIN, group=self.group)
        return value[0] > 0.5

    def like(self, param: Tensor, local_value: Tensor) -> Tensor:
        """A DTensor with ``param``'s mesh, placements and global shape around ``local_value``."""
        from torch.distributed.tensor import DTensor

        return DTensor.from_local(local_value, param.device_mesh, param.placements, run_check=False,
                                  shape=param.shape, stride=param.stride())


def assign_owners(shapes: list[tuple[int, ...]], views: list[str], world: int) -> list[int]:
    """Owner rank of each matrix: greedy by Newton–Schulz cost (largest first, to the least-loaded
    rank; ties by index and rank) — computed from shapes only, so identical on every rank."""
    from ..functional import matrix_shape

    def cost(shape: tuple[int, ...], view: str) -> float:
        rows, cols = matrix_shape(shape, view)
        count = math.prod(shape[:-2]) if view == "stack" else 1
        return count * rows * cols * min(rows, cols)

    order = sorted(range(len(shapes)), key=lambda i: (-cost(shapes[i], views[i]), i))
    load = [0.0] * world
    owners = [0] * len(shapes)
    for i in order:
        r = min(range(world), key=lambda q: (load[q], q))
        owners[i] = r
        load[r] += cost(shapes[i], views[i])
    return owners


def _exchange(layout: ShardedLayout, send: list[list[Tensor]], recv_numel: list[int], capacity: int,
              like: Tensor) -> list[Tensor]:
    """One all-to-all: ``send[r]`` (flattened, concatenated) goes to rank ``r``. Every message is padded
    to ``capacity`` (the largest message between any two ranks, known to all from the shapes), so the
    exchange is one ``all_to_all_single`` of equal splits — which gloo supports in every torch this
    package admits (its list ``all_to_all`` arrived later)."""
    outgoing = like.new_zeros(len(send) * capacity)
    for r, parts in enumerate(send):
        if parts:
            flat = torch.cat([t.reshape(-1) for t in parts])
            outgoing[r * capacity:r * capacity + flat.numel()] = flat
    incoming = like.new_empty(len(recv_numel) * capacity)
    dist.all_to_all_single(incoming, outgoing, group=layout.group)
    return [incoming[r * capacity:r * capacity + n] for r, n in enumerate(recv_numel)]


def sharded_orthogonalize(inputs: list[Tensor], views: list[str], shapes: list[tuple[int, ...]], input_norms: bool,
                          *, orthogonalize: OrthogonalizeFn,
                          layout: ShardedLayout) -> tuple[list[Tensor], Tensor | None, Tensor]:
    """Newton–Schulz of row-sharded matrices: each matrix's shards go to its owner (one all-to-all),
    the owner orthogonalizes its whole matrices with the same batched kernel as the unsharded path
    (so the result is bit-identical) and takes ``‖input‖`` and ``‖O‖``; the row shards of ``O`` come
    back with a second all-to-all and the norms with one all-reduce. ``inputs`` are local shards."""
    if not _ranks_agree(inputs, views, layout.group, shapes):
        raise RuntimeError("hf_rmsuon: the ranks of the FSDP2 mesh hold gradients for different parameters; "
                           "every rank must step the same parameters")
    if not inputs:
        return [], torch.zeros(0) if input_norms else None, torch.zeros(0)
    world, rank = layout.world, layout.rank
    owners = assign_owners(shapes, views, world)
    mine = [i for i, o in enumerate(owners) if o == rank]
    row_numel = [math.prod(s[1:]) for s in shapes]
    rows = [layout.rows(s[0]) for s in shapes]
    like = inputs[0]

    # traffic[src][dst]: values that rank src sends to owner dst (the way back is the transpose)
    traffic = [[sum(rows[i][src] * row_numel[i] for i in range(len(shapes)) if owners[i] == dst)
                for dst in range(world)] for src in range(world)]
    capacity = max(max(row) for row in traffic)
    send: list[list[Tensor]] = [[] for _ in range(world)]
    for i, t in enumerate(inputs):
        send[owners[i]].append(t)
    recv = _exchange(layout, send, [traffic[src][rank] for src in range(world)], capacity, like)
    offsets = [0] * world
    whole: list[Tensor] = []
    for i in mine:
        pieces = []
        for r in range(world):
            n = rows[i][r] * row_numel[i]
            pieces.append(recv[r][offsets[r]:offsets[r] + n].view(rows[i][r], *shapes[i][1:]))
            offsets[r] += n
        whole.append(torch.cat(pieces))
    ortho = orthogonalize(whole, [views[i] for i in mine])

    norms = torch.zeros(2, len(inputs), dtype=torch.float64, device=like.device)
    if mine:
        from ..functional import whole_norms

        index = torch.tensor(mine, device=like.device)
        if input_norms:
            norms[0, index] = whole_norms(whole).to(torch.float64)
        norms[1, index] = whole_norms(ortho).to(torch.float64)
    dist.all_reduce(norms, op=dist.ReduceOp.SUM, group=layout.group)  # one owner per entry: exact

    back: list[list[Tensor]] = [[] for _ in range(world)]
    for j, i in enumerate(mine):
        for r, piece in enumerate(torch.split(ortho[j], rows[i])):
            back[r].append(piece)
    returned = _exchange(layout, back, [traffic[rank][owner] for owner in range(world)], capacity, like)
    offsets = [0] * world
    results = []
    for i, t in enumerate(inputs):
        r, n = owners[i], rows[i][rank] * row_numel[i]
        results.append(returned[r][offsets[r]:offsets[r] + n].view(t.shape))
        offsets[r] += n
    dtype = like.dtype if like.dtype == torch.float64 else torch.float32
    return results, norms[0].to(dtype) if input_norms else None, norms[1].to(dtype)
