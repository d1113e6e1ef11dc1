"""CUDA checks (``pytest -m gpu``; skipped without a CUDA device, run by ``benchmarks/gpu.sh``).

What a CPU run cannot show: that no steady-state step synchronises the host with a real CUDA stream
(``torch.cuda.set_sync_debug_mode("error")`` raises at the first synchronising call — nothing is
patched), that every member computes on the GPU what it computes on the CPU, that Newton–Schulz in
bf16 on tensor cores keeps the singular values in the band, and that ``compile=True`` agrees on CUDA.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch import nn

import hf_rmsuon
from hf_rmsuon import functional as F

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

SAM = ("ars", "ars2_neo")


@contextlib.contextmanager
def sync_raises():
    """Any host synchronisation inside the block raises (CUDA's own check, not a patch)."""
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(0)


def _model(device: str, dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(24, 64), nn.GELU(), nn.Linear(64, 64), nn.LayerNorm(64), nn.Linear(64, 8),
                          nn.Unflatten(1, (2, 4)), nn.Conv1d(2, 2, 3, padding=1), nn.Flatten())
    return model.to(device=device, dtype=dtype)


def _options(name: str) -> dict:
    return {"k": 2} if name in SAM else {}


def _run(name: str, device: str, steps: int, dtype=torch.float32, check_sync: bool = False, **hp) -> nn.Module:
    """``steps`` steps of ``name`` on a fixed input (SAM members through ``step(closure)`` on odd steps
    and the Trainer's protocol on even ones); steps after the first run under :func:`sync_raises` when
    ``check_sync``."""
    model = _model(device, dtype)
    opt = hf_rmsuon.create_optimizer(name, model, **_options(name), **hp)
    x = torch.randn(16, 24, generator=torch.Generator().manual_seed(1)).to(device=device, dtype=dtype)

    def closure():
        opt.zero_grad()
        loss = model(x).float().square().mean()
        loss.backward()
        return loss

    for step in range(steps):
        guard = sync_raises() if check_sync and step >= 1 else contextlib.nullcontext()
        with guard:
            if name in SAM and step % 2 == 0:
                loss = closure().detach()
                if opt.sam_pass_due():
                    opt.begin_sam_pass()
                    opt.end_sam_pass(loss, closure().detach())
                opt.step()
            elif name in SAM:
                opt.step(closure)
            else:
                closure()
                opt.step()
    assert opt.diagnostics()["optimizer_steps"] == steps
    return model


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", hf_rmsuon.available_optimizers())
def test_steady_state_steps_never_synchronise_on_cuda(name, dtype):
    _run(name, "cuda", steps=6, dtype=dtype, check_sync=True)


@pytest.mark.parametrize("hp", [{"natural_wd": "elementwise"}, {"energy_scale": "rms"}, {"asi": True}],
                         ids=["nwd", "rms", "asi"])
@pytest.mark.parametrize("name", ["f_ada_rmsuon", "ada_rmsuon", "ars2_neo"])
def test_options_never_synchronise_on_cuda(name, hp):
    if not all(k in hf_rmsuon.get_optimizer_class(name).schema for k in hp):
        pytest.skip("option not in this member")
    _run(name, "cuda", steps=6, check_sync=True, **hp)


@pytest.mark.parametrize("name", hf_rmsuon.available_optimizers())
def test_cuda_step_matches_cpu(name):
    """Same model, data and hyperparameters: three steps on the GPU move every parameter as three on the
    CPU do (fp32 Newton–Schulz, TF32 off), so no device-specific path changes the arithmetic. Compared
    per tensor in norm: Adam's whitening g/(√v̂+ε) is sign-like where |g| is tiny, so single entries may
    differ by float32 rounding far more than the tensor does (seen on an H200: 12% on 13 of 4096 entries)."""
    torch.backends.cuda.matmul.allow_tf32 = False
    cpu = _run(name, "cpu", steps=3, ns_dtype="float32")
    gpu = _run(name, "cuda", steps=3, ns_dtype="float32")
    _assert_moved_alike(_model("cpu"), cpu, gpu, rel=2e-3)


def _assert_moved_alike(start: nn.Module, a: nn.Module, b: nn.Module, rel: float) -> None:
    """Every parameter moved from ``start`` in ``a``, and ``b``'s move differs from it by at most ``rel`` of
    its norm (per tensor: single entries of Adam's sign-like g/(√v̂+ε) may differ far more by rounding)."""
    for (n, p0), pa, pb in zip(start.named_parameters(), a.parameters(), b.parameters()):
        moved_a, moved_b = pa.detach().cpu() - p0.detach().cpu(), pb.detach().cpu() - p0.detach().cpu()
        assert moved_a.norm() > 0, n
        assert (moved_b - moved_a).norm() <= rel * moved_a.norm(), n


@pytest.mark.parametrize("shape", [(1024, 1024), (1024, 3072), (3072, 1024), (4, 512, 1024)])
def test_bf16_newton_schulz_on_cuda_stays_in_the_band(shape):
    """bf16 on tensor cores (``ns_dtype="auto"`` there): for an input whose singular values span
    [0.1, 1]·σ_max, every output singular value lands in Muon's band, and the result is the fp32
    iteration's up to bf16 rounding."""
    assert F.default_ns_dtype("cuda") == torch.bfloat16
    g = torch.Generator("cuda").manual_seed(0)
    *batch, rows, cols = shape
    m = min(rows, cols)
    u = torch.linalg.qr(torch.randn(*batch, rows, m, device="cuda", generator=g)).Q
    v = torch.linalg.qr(torch.randn(*batch, cols, m, device="cuda", generator=g)).Q
    x = u @ torch.diag_embed(torch.linspace(0.1, 1.0, m, device="cuda").expand(*batch, m)) @ v.mT
    low = F.newton_schulz(x, 5, F.NS_COEFFICIENTS, torch.bfloat16).float()
    high = F.newton_schulz(x, 5, F.NS_COEFFICIENTS, torch.float32)
    sv = torch.linalg.svdvals(low.double())
    assert sv.min() > 0.5 and sv.max() < 1.3, (float(sv.min()), float(sv.max()))
    assert ((low - high).norm() / high.norm()) < 0.05


def test_compiled_newton_schulz_agrees_with_eager_on_cuda():
    x = torch.randn(2, 256, 768, device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    compiled = F.compiled_newton_schulz()
    for dtype, tol in ((torch.float32, 1e-4), (torch.bfloat16, 3e-2)):
        eager = F.newton_schulz(x, 5, F.NS_COEFFICIENTS, dtype)
        torch.testing.assert_close(compiled(x, 5, F.NS_COEFFICIENTS, dtype), eager, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_compiled_sam_passes_on_cuda(monkeypatch, dtype):
    """The fused SAM passes (Triton), forced on for CUDA: no host synchronisation once compiled, and the
    run of the in-place chain — fp32 per tensor in norm (fp32 Newton–Schulz, TF32 off: an H100 showed bf16
    NS turning the passes' rounding into 1.6e-4 on single entries), bf16 entry by entry."""
    monkeypatch.setattr(F, "compiled_newton_schulz", lambda: F.newton_schulz)  # the SAM passes are under test
    monkeypatch.setattr(F, "FUSED_SAM_MIN_NUMEL", {"cuda": 0})  # every tensor, small as they are here
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    hp = {"ns_dtype": "float32"} if dtype == torch.float32 else {}
    _run("ars2_neo", "cuda", steps=6, dtype=dtype, check_sync=False, compile=True, **hp)  # compiles both kernels
    fused = _run("ars2_neo", "cuda", steps=6, dtype=dtype, check_sync=True, compile=True, **hp)
    eager = _run("ars2_neo", "cuda", steps=6, dtype=dtype, **hp)
    if dtype == torch.float32:
        _assert_moved_alike(_model("cuda"), eager, fused, rel=1e-3)
    else:
        for a, b in zip(eager.parameters(), fused.parameters()):
            torch.testing.assert_close(b.float(), a.float(), rtol=2e-2, atol=2e-3)


def test_compile_keeps_small_tensors_on_the_in_place_sam_chain_on_cuda(monkeypatch):
    """On CUDA ``compile=True`` fuses SAM's passes only for large tensors (per-call host cost makes the
    fused passes slower on small ones there): for this model's small tensors, with Newton–Schulz eager,
    the run is the ``compile=False`` one bit for bit."""
    model = _model("cuda")
    assert not any(F.fuses_sam_passes(p) for p in model.parameters())
    assert F.fuses_sam_passes(torch.empty(1, device="cuda").expand(151936, 1024))  # an embedding's size
    monkeypatch.setattr(F, "compiled_newton_schulz", lambda: F.newton_schulz)
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)  # the Conv1d's backward, run to run
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    a = _run("ars2_neo", "cuda", steps=6, check_sync=True, compile=True)
    b = _run("ars2_neo", "cuda", steps=6)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))
