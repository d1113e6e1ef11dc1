"""Kernel-time profile (``torch.profiler``) of what the scale benchmark can only time as a whole: SAM's
sync-step bookkeeping (``begin_sam_pass`` + ``end_sam_pass``), the AdamW track against torch's fused
AdamW, and F-AdaRMSuon's step against AdaRMSuon's, at the Qwen3-0.6B shapes (2 layers). On a GPU the device time separates the kernels' own cost from
the host's launch overhead, which a wall clock adds when a step takes about a millisecond.

    python -m benchmarks.kernel_profile cuda > benchmarks/results/kernel_profile_cuda.txt   # benchmarks/gpu.sh

Prints, per contender and phase, a ``==== <label>: <phase>`` header and the profiler's table (its last
lines give ``Self CPU time total`` and, on CUDA, ``Self CUDA time total``, which the report reads).
The "begin+end_sam_pass" phase includes one ``copy_`` per parameter that stands in for the second
backward (the scale benchmark leaves it out of its timing).
"""

from __future__ import annotations

import sys

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks.scale import Contender, Stepper, build_model, preset_gradients

CONTENDERS = [("ars k=1 bf16", Contender("ars", "member", "ars", (("k", 1),), ns="bfloat16")),
              ("track hinted", Contender("t", "member", params="adamw", norm_hint=True)),
              ("track own gate", Contender("t", "member", params="adamw")),
              ("fused", Contender("f", "torch_adamw_fused", params="adamw")),
              # F-AdaRMSuon's decay adds per-tensor dot products to AdaRMSuon's step (launch count on a GPU)
              ("ada_rmsuon bf16", Contender("a", "member", "ada_rmsuon", ns="bfloat16")),
              ("f_ada_rmsuon bf16", Contender("f", "member", "f_ada_rmsuon", ns="bfloat16"))]


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    device = torch.device(argv[0] if argv else "cuda")
    cuda = device.type == "cuda"
    model = build_model(2, not cuda, device)  # tiny shapes on a CPU: a smoke run of the same code
    params = [p for p in model.parameters() if p.requires_grad]
    grads, adv = preset_gradients(params, 0)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    sort = "cuda_time_total" if cuda else "cpu_time_total"

    def synchronize() -> None:
        if cuda:
            torch.cuda.synchronize()

    for label, contender in CONTENDERS:
        stepper = Stepper(contender, model)
        for _ in range(3):  # warm: state created, caches filled
            stepper.prepare(grads, adv)
            stepper.step()
        synchronize()
        if stepper.sam:
            stepper.opt.sam_pass_due()
            with profile(activities=activities) as prof:
                stepper.opt.begin_sam_pass()
                for p in stepper.params:
                    p.grad.copy_(adv[id(p)])
                stepper.opt.end_sam_pass()
                synchronize()
            print(f"==== {label}: begin+end_sam_pass (includes one grad copy_ per param)")
            print(prof.key_averages().table(sort_by=sort, row_limit=25))
        else:
            stepper.prepare(grads, adv)
        with profile(activities=activities) as prof:
            stepper.step()
            synchronize()
        print(f"==== {label}: step")
        print(prof.key_averages().table(sort_by=sort, row_limit=25))
        del stepper


if __name__ == "__main__":
    main()
