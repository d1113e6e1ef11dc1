"""DDP vs FSDP2 per rank: optimizer-state memory, parameter memory, step time and communication.

Run under torchrun (CPU ranks use gloo, CUDA ranks NCCL)::

    torchrun --nproc_per_node 2 -m benchmarks.fsdp2 --out benchmarks/results/fsdp2.json   # 2 CPU ranks
    torchrun --nproc_per_node 1 -m benchmarks.fsdp2 --device cuda --out ...             # one GPU (DTensor path)

The model is a Qwen3 (hidden 256, 4 layers, vocabulary 8,192 — small enough for 2 CPU cores). Gradients
are preset (the same full gradient on every rank, as after the reduction), so the times are the
optimizer step alone: under DDP each rank holds every parameter and orthogonalizes a share (``split_ns``,
all-gather of the results); under FSDP2 each rank holds a row shard of every tensor and state, and
each matrix is orthogonalized whole by one owner rank (two all-to-alls). Contenders alternate, and
the report gives medians. ``section()`` renders the BENCHMARKS.md part.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from typing import Any

import torch
import torch.distributed as dist

from . import common

MEMBERS = ("muon", "ada_rmsuon", "ars2_neo")


def build_model(device: torch.device) -> torch.nn.Module:
    import transformers

    cfg = transformers.Qwen3Config(vocab_size=8192, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                                   max_position_embeddings=128, tie_word_embeddings=False)
    torch.manual_seed(0)
    return transformers.Qwen3ForCausalLM(cfg).to(device)


def _state_bytes(opt: torch.optim.Optimizer) -> int:
    total = 0
    for st in opt.state.values():
        for value in st.values():
            if isinstance(value, torch.Tensor):
                local = value.to_local() if hasattr(value, "to_local") else value
                total += local.numel() * local.element_size()
    return total


def _param_bytes(model: torch.nn.Module) -> int:
    return sum((p.to_local() if hasattr(p, "to_local") else p).numel() * p.element_size() for p in model.parameters())


def _preset(model: torch.nn.Module, step: int) -> None:
    from torch.distributed.tensor import distribute_tensor

    g = torch.Generator().manual_seed(1000 + step)
    for p in model.parameters():
        grad = torch.randn(p.shape, generator=g).to(p.device)
        p.grad = distribute_tensor(grad, p.device_mesh, p.placements) if hasattr(p, "device_mesh") else grad


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(member: str, layout: str, device: torch.device, steps: int) -> dict[str, Any]:
    import hf_rmsuon

    model = build_model(device)
    if layout == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
        group = None
    else:
        group = dist.group.WORLD
    hp = {"k": 0} if member == "ars2_neo" else {}  # a lazy step: the SAM state without a second pass
    opt = hf_rmsuon.create_optimizer(member, model, lr=1e-3, ns_dtype="float32", data_parallel_group=group, **hp)
    times = []
    for step in range(steps + 1):
        _preset(model, step)
        _sync(device)
        dist.barrier()
        start = time.perf_counter()
        opt.step()
        _sync(device)
        elapsed = time.perf_counter() - start
        if step:  # the first step creates state
            times.append(elapsed)
    return {"state_bytes": _state_bytes(opt), "param_bytes": _param_bytes(model),
            "step_ms": statistics.median(times) * 1e3, "step_ms_all": [t * 1e3 for t in times]}


def communication(model: torch.nn.Module, world: int) -> dict[str, float]:
    """Values moved per rank per optimizer step (computed): DDP's split Newton–Schulz all-gathers the
    matrix-track results (each rank receives (world−1)/world of them); FSDP2's owner-computes sends
    and receives the rank's shard of every matrix twice (about 2/world of the matrix track, in and out)
    — besides the gradient reduction both do (DDP all-reduce ≈ 2·P, FSDP2 reduce-scatter ≈ P and
    the forward/backward all-gathers ≈ 2·P, per rank)."""
    import hf_rmsuon

    matrix = hf_rmsuon.route_model(model).counts()["matrix"]["numel"]
    return {"matrix_values": matrix, "ddp_split_ns_values": matrix * (world - 1) / world,
            "fsdp2_owner_ns_values": 2 * matrix * (world - 1) / world}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(common.REPO / "benchmarks" / "results" / "fsdp2.json"))
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--members", nargs="+", default=list(MEMBERS))
    args = parser.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    backend = "nccl" if args.device == "cuda" else "gloo"
    dist.init_process_group(backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", rank % max(1, torch.cuda.device_count())) if args.device == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    rows: dict[str, dict[str, Any]] = {}
    for member in args.members:
        for rep in range(2):  # alternate the layouts twice; keep the faster of the two medians
            for layout in ("ddp", "fsdp2"):
                result = measure(member, layout, device, args.steps)
                key = f"{member} / {layout}"
                if key not in rows or result["step_ms"] < rows[key]["step_ms"]:
                    rows[key] = result
                if rank == 0:
                    common.log(f"fsdp2 bench: {key} rep {rep}: {result['step_ms']:.1f} ms, "
                               f"state {result['state_bytes'] / 2**20:.2f} MiB per rank")
    if rank == 0:
        payload = {"environment": common.environment(), "world": world, "device": args.device,
                   "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else common.cpu_model(),
                   "rows": rows, "communication": communication(build_model(torch.device("cpu")), world)}
        common.write_json(args.out, payload)
        common.log(f"fsdp2 bench: wrote {args.out}")
    dist.barrier()
    dist.destroy_process_group()


def section(data: dict[str, Any]) -> list[str]:
    """The BENCHMARKS.md part: per-rank state, parameters and step time, DDP vs FSDP2."""
    env = data["environment"]
    lines = ["## Scaling: DDP vs FSDP2 per rank", "",
             f"`torchrun --nproc_per_node {data['world']} -m benchmarks.fsdp2` on {data['device']} "
             f"({data['device_name']}; {env['cpu_count']} CPU threads, flags: "
             f"{', '.join(f for f in env['cpu_flags'] if 'avx' in f or 'amx' in f) or 'none listed'}), "
             f"{env['date']}. Qwen3 hidden 256 × 4 layers, vocabulary 8,192; gradients preset, so the time "
             "is the optimizer step alone (median of 5, faster of 2 alternating repetitions); ars2_neo is its "
             "lazy step (k=0).", "",
             "| member | layout | optimizer state / rank | parameters / rank | step | FSDP2 ÷ DDP (state, step) |",
             "|---|---|---|---|---|---|"]
    rows = data["rows"]
    for key, row in rows.items():
        member, layout = key.split(" / ")
        ratio = ""
        if layout == "fsdp2" and f"{member} / ddp" in rows:
            ddp = rows[f"{member} / ddp"]
            ratio = f"{row['state_bytes'] / ddp['state_bytes']:.2f}×, {row['step_ms'] / ddp['step_ms']:.2f}×"
        lines.append(f"| {member} | {layout} | {row['state_bytes'] / 2**20:.2f} MiB | "
                     f"{row['param_bytes'] / 2**20:.2f} MiB | {row['step_ms']:.1f} ms | {ratio} |")
    comm = data["communication"]
    lines += ["", f"Optimizer-step communication per rank (computed, {comm['matrix_values']:,} matrix-track values): "
              f"DDP's split Newton–Schulz all-gathers {comm['ddp_split_ns_values']:,.0f} values; FSDP2's "
              f"owner-computes moves {comm['fsdp2_owner_ns_values']:,.0f} (the rank's shards to the owners and "
              "back) plus one all-reduce of two scalars per matrix. Both also reduce the gradients (DDP: an "
              "all-reduce of every gradient; FSDP2: a reduce-scatter, plus the parameter all-gathers of the "
              "forward and backward). On 2 CPU ranks sharing 2 cores the step times mostly show the extra "
              "collectives; the memory columns are the point: FSDP2 holds 1/world of the parameters and state.", ""]
    return lines


if __name__ == "__main__":
    main()
