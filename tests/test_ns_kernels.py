"""Newton–Schulz kernels: the Gram-matrix iteration against the standard one, and the per-shape choice."""

from __future__ import annotations

import pytest
import torch

from hf_rmsuon import functional as F

SHAPES = [(48, 160), (160, 48), (32, 96), (3, 40, 128)]  # wide, tall, 3:1, a batch of wide ones


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def _matrix(shape, kind: str, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if kind == "randn":
        return torch.randn(shape, generator=g)
    m, n = shape[-2:]
    u, _, vh = torch.linalg.svd(torch.randn(shape, generator=g, dtype=torch.float64), full_matrices=False)
    k = min(m, n)
    if kind == "conditioned":  # singular values spread over one decade: all inside NS's working range
        s = torch.logspace(0, -1, k, dtype=torch.float64)
    else:  # "lowrank": rank 4 plus nothing
        s = torch.zeros(k, dtype=torch.float64)
        s[:4] = torch.tensor([3.0, 2.0, 1.0, 0.5])
    return (u * s.unsqueeze(-2) @ vh).float()


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("kind", ["randn", "conditioned", "lowrank"])
def test_gram_equals_standard_within_float32_rounding(shape, kind):
    x = _matrix(shape, kind)
    exact = F.newton_schulz_standard(x.double(), dtype=torch.float64)
    std = F.newton_schulz_standard(x, dtype=torch.float32)
    gram = F.newton_schulz_gram(x, dtype=torch.float32)
    assert gram.shape == x.shape and gram.dtype == x.dtype
    # in float64 the two iterations are the same polynomial: equal to ~1e-12
    assert _rel(F.newton_schulz_gram(x.double(), dtype=torch.float64), exact) < 1e-10
    # in float32 both are float32 rounding away from the exact iterate, and from each other (a rank-4
    # input's null space holds only rounding noise, which the iteration amplifies ~3.4× per step in both)
    tol = 1e-4 if kind == "lowrank" else 1e-5
    assert _rel(std, exact) < tol
    assert _rel(gram, exact) < 5 * tol
    assert _rel(gram, std) < 5 * tol


@pytest.mark.parametrize("shape", [(48, 160), (160, 48)])
def test_gram_keeps_the_singular_value_band(shape):
    x = _matrix(shape, "conditioned", seed=1)
    sv_std = torch.linalg.svdvals(F.newton_schulz_standard(x, dtype=torch.float32).double())
    sv_gram = torch.linalg.svdvals(F.newton_schulz_gram(x, dtype=torch.float32).double())
    assert torch.allclose(sv_gram, sv_std, atol=1e-4)
    assert 0.6 < float(sv_gram.min()) and float(sv_gram.max()) < 1.25


@pytest.mark.parametrize("kernel", [F.newton_schulz_gram, F.newton_schulz_standard, F.newton_schulz])
def test_zero_stays_zero(kernel):
    for shape in [(16, 64), (64, 16), (2, 16, 64)]:
        out = kernel(torch.zeros(shape), 5, F.NS_COEFFICIENTS, torch.float32)
        assert torch.equal(out, torch.zeros(shape))


def test_auto_choice_by_flops_and_dtype():
    assert F.ns_method(1024, 1024, 5, torch.float32) == "standard"
    assert F.ns_method(1024, 1280, 5, torch.float32) == "standard"  # near-square: a near tie
    for shape in [(1024, 3072), (3072, 1024), (1024, 2048), (512, 1024)]:
        assert F.ns_method(*shape, 5, torch.float32) == "gram"
        assert F.ns_method(*shape, 5, torch.bfloat16) == "standard"  # bf16: the Gram form is not used
    # off a CPU, small matrices keep the standard iteration (measured slower in the Gram form on a GPU)
    assert F.ns_method(512, 1024, 5, torch.float32, "cuda") == "standard"
    assert F.ns_method(1024, 3072, 5, torch.float32, "cuda") == "gram"
    assert F.ns_method(3072, 1024, 5, torch.float32, "cuda") == "gram"
    # the FLOP model: standard 5·(2m²n + m³), Gram 2m²n + 17m³ (multiply-adds, ×2 for FLOPs)
    assert F.ns_flops(1024, 3072, 5, "standard") == 2 * 5 * (2 * 1024**2 * 3072 + 1024**3)
    assert F.ns_flops(1024, 3072, 5, "gram") == 2 * (2 * 1024**2 * 3072 + 17 * 1024**3)
    assert F.ns_flops(64, 16, 1, "gram") == F.ns_flops(64, 16, 1, "standard")  # one step: the same products


def test_newton_schulz_dispatches_per_shape():
    wide, square = _matrix((32, 128), "randn"), _matrix((64, 64), "randn")
    assert torch.equal(F.newton_schulz(wide, 5, F.NS_COEFFICIENTS, torch.float32),
                       F.newton_schulz_gram(wide, 5, F.NS_COEFFICIENTS, torch.float32))
    assert torch.equal(F.newton_schulz(square, 5, F.NS_COEFFICIENTS, torch.float32),
                       F.newton_schulz_standard(square, 5, F.NS_COEFFICIENTS, torch.float32))
    assert torch.equal(F.newton_schulz(wide, 5, F.NS_COEFFICIENTS, torch.bfloat16),
                       F.newton_schulz_standard(wide, 5, F.NS_COEFFICIENTS, torch.bfloat16))


def test_bf16_stays_in_the_band_on_low_rank_input():
    """bf16 (the accelerator default) runs the standard iteration, which keeps low-rank inputs in the
    band; the Gram form in bf16 would not (so ``auto`` never picks it there)."""
    for shape in [(32, 128), (128, 32)]:
        x = _matrix(shape, "lowrank", seed=2)
        sv = torch.linalg.svdvals(F.newton_schulz(x, 5, F.NS_COEFFICIENTS, torch.bfloat16).double())
        assert float(sv.max()) < 1.25
        top = torch.linalg.svdvals(F.newton_schulz_standard(x.double(), dtype=torch.float64))[:4]
        assert torch.allclose(sv[:4], top, atol=0.05)  # the rank-4 part is kept


def test_orthogonalize_mixes_kernels_per_shape():
    """One call with square and rectangular matrices (and a bf16 parameter) equals the per-matrix standard
    iteration within float32 rounding."""
    mats = [_matrix((24, 96), "randn", 3), _matrix((40, 40), "randn", 4), _matrix((96, 24), "randn", 5),
            _matrix((24, 96), "randn", 6).bfloat16()]
    out = F.orthogonalize(mats, ["matrix"] * len(mats), dtype=torch.float32)
    for m, o in zip(mats, out):
        assert o.shape == m.shape and o.dtype == m.dtype
        ref = F.newton_schulz_standard(m.double(), dtype=torch.float64)
        assert _rel(o, ref) < (1e-2 if m.dtype == torch.bfloat16 else 1e-4)


# --------------------------------------------------------------------------------------------------
# the AdamW track on torch's fused AdamW kernel
# --------------------------------------------------------------------------------------------------


def _adamw_pair(dtype=torch.float32, **hp):
    import hf_rmsuon

    torch.manual_seed(0)
    shapes = [(300, 16), (16,), (7, 5)]
    ours = [torch.nn.Parameter(torch.randn(s, dtype=dtype)) for s in shapes]
    ref = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    opt = hf_rmsuon.AdaRMSuon([{"params": ours, "track": "adamw"}], lr=1e-2, weight_decay=0.1, **hp)
    groups = [{"params": [ref[0], ref[2]], "weight_decay": 0.1}, {"params": [ref[1]], "weight_decay": 0.0}]
    return ours, ref, opt, torch.optim.AdamW(groups, lr=1e-2, foreach=True)


def _set_grads(ours, ref, seed):
    g = torch.Generator().manual_seed(seed)
    for p, q in zip(ours, ref):
        grad = torch.randn(p.shape, generator=g, dtype=p.dtype)
        p.grad, q.grad = grad.clone(), grad.clone()


def test_fused_adamw_track_matches_torch_adamw_and_is_used(monkeypatch):
    calls = []
    real = F.fused_adamw_
    monkeypatch.setattr(F, "fused_adamw_", lambda *a, **k: calls.append(1) or real(*a, **k))
    ours, ref, opt, torch_opt = _adamw_pair()
    for step in range(6):
        _set_grads(ours, ref, step)
        if step == 3:  # a tensor without gradient this step: its own step count falls behind
            ours[2].grad = ref[2].grad = None
        opt.step()
        torch_opt.step()
        for p, q in zip(ours, ref):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7)
    assert len(calls) == 6
    assert [float(opt.state[p]["step"]) for p in ours] == [6, 6, 5]
    # a device tensor, as torch's fused AdamW keeps it: advanced (or not, on a skipped step) without a host read
    assert all(opt.state[p]["step"].dtype == torch.float32 and opt.state[p]["step"].device == p.device for p in ours)


def test_fused_adamw_checkpoint_round_trip_and_lr_zero():
    ours, ref, opt, torch_opt = _adamw_pair()
    for step in range(2):
        _set_grads(ours, ref, step)
        opt.step()
        torch_opt.step()
    sd = opt.state_dict()
    assert sd["state"][0]["step"] == 2
    fresh = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    import hf_rmsuon

    opt2 = hf_rmsuon.AdaRMSuon([{"params": fresh, "track": "adamw"}], lr=1e-2, weight_decay=0.1)
    opt2.load_state_dict(sd)
    for g in (*opt2.param_groups, *torch_opt.param_groups):
        g["lr"] = 0.0  # lr 0: the moments still advance, the parameters do not move
    for p, q, r in zip(fresh, ref, ours):
        p.grad = torch.ones_like(p)
        q.grad = torch.ones_like(q)
        r.grad = None
    before = [p.detach().clone() for p in fresh]
    opt2.step()
    torch_opt.step()
    for p, b, q in zip(fresh, before, ref):
        assert torch.equal(p, b)
        torch.testing.assert_close(opt2.state[p]["exp_avg"], torch_opt.state[q]["exp_avg"])
    assert opt2.state[fresh[0]]["step"] == 3


def test_adamw_track_takes_foreach_where_fused_does_not_apply(monkeypatch):
    """bf16 parameters with float32 moments (state_dtype auto) and β rounding to 1 in float32 use foreach."""
    calls = []
    monkeypatch.setattr(F, "fused_adamw_", lambda *a, **k: calls.append(1))
    ours, ref, opt, _ = _adamw_pair(dtype=torch.bfloat16)
    _set_grads(ours, ref, 0)
    opt.step()
    assert not calls and opt.state[ours[0]]["exp_avg"].dtype == torch.float32
    p = torch.zeros(4, 4)
    moments = [torch.zeros(4, 4)]
    assert F.fused_adamw_applicable([p], [p.clone()], moments, moments, (0.9, 0.999))
    assert not F.fused_adamw_applicable([p], [p.clone()], moments, moments, (0.9, 1.0 - 1e-9))
    assert not F.fused_adamw_applicable([p], [p.clone().mT], moments, moments, (0.9, 0.999))  # layout
    assert not F.fused_adamw_applicable([p], [p.double()], moments, moments, (0.9, 0.999))  # dtype


def test_checkpoints_with_integer_step_counts_still_load():
    """Checkpoints written before the step counts moved to the device (a Python int per tensor) load
    into device tensors and resume the same trajectory."""
    ours, ref, opt, _ = _adamw_pair()
    for step in range(2):
        _set_grads(ours, ref, step)
        opt.step()
    sd = opt.state_dict()
    old = {**sd, "state": {k: {**v, "step": int(v["step"])} for k, v in sd["state"].items()}}
    import copy

    import hf_rmsuon

    twins = []
    for state in (sd, old):
        fresh = [torch.nn.Parameter(p.detach().clone()) for p in ours]
        o = hf_rmsuon.AdaRMSuon([{"params": fresh, "track": "adamw"}], lr=1e-2, weight_decay=0.1)
        o.load_state_dict(copy.deepcopy(state))
        assert all(o.state[p]["step"].dtype == torch.float32 and float(o.state[p]["step"]) == 2 for p in fresh)
        for p, g in zip(fresh, [torch.ones_like(p) for p in fresh]):
            p.grad = g
        o.step()
        twins.append(fresh)
    for a, b in zip(*twins):
        assert torch.equal(a, b)


@pytest.mark.parametrize("shape", [(24, 24), (16, 48), (48, 16), (3, 16, 40)])
@pytest.mark.parametrize("kernel", [F.newton_schulz_standard, F.newton_schulz_gram])
def test_iterations_leave_their_input_alone(kernel, shape):
    """The iterations write into buffers of their own: an fp32 input (which ``x.to(float32)`` does not
    copy) is left as it was, and two calls give the same result."""
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    before = x.clone()
    first = kernel(x, 5, F.NS_COEFFICIENTS, torch.float32)
    assert torch.equal(x, before)
    assert torch.equal(kernel(x, 5, F.NS_COEFFICIENTS, torch.float32), first)


@pytest.mark.parametrize(("device", "shape", "expected"),
                         [("cpu", (512, 1024), "gram"), ("meta", (512, 1024), "standard"),
                          ("meta", (1024, 3072), "gram")])
def test_newton_schulz_picks_the_iteration_for_the_tensors_device(monkeypatch, device, shape, expected):
    """``newton_schulz`` asks :func:`F.ns_method` with the tensor's device (meta stands in for a GPU)."""
    called = []
    for name in ("newton_schulz_standard", "newton_schulz_gram"):
        monkeypatch.setattr(F, name, lambda x, *a, name=name: called.append(name) or x)
    F.newton_schulz(torch.empty(shape, device=device), 5, F.NS_COEFFICIENTS, torch.float32)
    assert called == [f"newton_schulz_{expected}"]


@pytest.mark.parametrize("shape", [(160, 48), (3, 128, 40)])
@pytest.mark.parametrize("kernel", [F.newton_schulz_standard, F.newton_schulz_gram])
def test_tall_matrices_iterate_from_the_right_without_a_transpose(kernel, shape):
    """A tall ``X`` runs ``A = XᵀX, X = a·X + X·B``: in float64 the transpose of the wide iteration on
    ``Xᵀ`` (the same polynomial), in float32 that to rounding — and the result comes back in ``X``'s own
    contiguous layout (no transposed view that the caller would copy)."""
    x = _matrix(shape, "conditioned", seed=2)
    via_wide = kernel(x.double().mT.contiguous(), 5, F.NS_COEFFICIENTS, torch.float64).mT
    tall = kernel(x.double(), 5, F.NS_COEFFICIENTS, torch.float64)
    assert _rel(tall, via_wide) < 1e-12
    result = kernel(x, 5, F.NS_COEFFICIENTS, torch.float32)
    assert result.is_contiguous() and result.shape == x.shape
    assert _rel(result, via_wide) < 1e-5
