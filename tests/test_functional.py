"""The functional core (SPEC §3, §5) against plain float64 references written in conftest.py."""

from __future__ import annotations

import math

import pytest
import torch

from hf_rmsuon import functional as F

SHAPES_2D = [(48, 16), (16, 48), (32, 32), (7, 3)]  # tall, wide, square, tiny tall


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _ortho(tensors, **kwargs):
    """F.orthogonalize with the shape rule's views (what bare tensors get)."""
    views = [{2: "matrix", 3: "stack"}.get(t.ndim, "flatten") for t in tensors]
    return F.orthogonalize(tensors, views, **kwargs)


# --------------------------------------------------------------------------------------------------
# Newton–Schulz
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES_2D)
def test_newton_schulz_float32_matches_float64_loop(ref, shape):
    x = torch.randn(*shape, generator=_gen(1))
    out = F.newton_schulz(x, dtype=torch.float32)
    assert out.shape == x.shape and out.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref.ns(x), rtol=0, atol=2e-5)


@pytest.mark.parametrize("steps,coefficients", [(3, (2.0, -1.5, 0.5)), (7, F.NS_COEFFICIENTS), (1, (1.5, -0.5, 0.0))])
def test_newton_schulz_steps_and_coefficients_are_honoured(ref, steps, coefficients):
    x = torch.randn(24, 40, generator=_gen(2))
    out = F.newton_schulz(x, steps=steps, coefficients=coefficients, dtype=torch.float32)
    torch.testing.assert_close(out.double(), ref.ns(x, steps, coefficients), rtol=0, atol=2e-5)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-4), (torch.bfloat16, 0.04)])
@pytest.mark.parametrize("shape", [(64, 32), (32, 64), (96, 96), (200, 40)])
def test_singular_values_follow_the_scalar_quintic(ref, shape, dtype, tol):
    """NS is an odd matrix polynomial, so it maps each singular value σ of X/‖X‖ through the scalar
    quintic p∘p∘p∘p∘p exactly. Check the package's output spectrum against that prediction
    (float32: to rounding; bfloat16: within bf16's ~3 significant digits, amplified by the slope)."""
    x = ref.well_conditioned(*shape, kappa=10.0, generator=_gen(3))
    sigma = torch.linalg.svdvals(x)
    predicted = torch.sort(ref.ns_scalar_map(sigma / (torch.linalg.norm(x) + 1e-7)), descending=True).values
    out = F.newton_schulz(x.float(), dtype=dtype)
    measured = torch.sort(torch.linalg.svdvals(out.double()), descending=True).values
    torch.testing.assert_close(measured, predicted, rtol=0, atol=tol)


# The band: for a well-conditioned input (κ ≤ 10, short side k ≤ 256) every σ/‖X‖_F is ≥ 1/(κ√k) =
# 0.00625, and five steps of the quintic map [0.00625, 1] into [0.6818, 1.1344] (computed in the test
# below from the polynomial itself; inputs with tinier σ can reach 1.2024, Muon's known ~[0.7, 1.2]).
# bf16 rounding moves singular values by < 0.01 at these sizes (measured 0.679–1.141), so the asserted
# band is the scalar image widened by 0.02: about [0.66, 1.154].
BAND_SLACK = 0.02


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_singular_values_land_in_the_quintic_band(ref, dtype):
    grid = torch.linspace(1 / (10 * math.sqrt(256)), 1.0, 200_001, dtype=torch.float64)
    image = ref.ns_scalar_map(grid)
    lo, hi = float(image.min()) - BAND_SLACK, float(image.max()) + BAND_SLACK
    assert 0.6 < lo < 0.7 and 1.1 < hi < 1.25  # the band the quintic iteration promises
    gen = _gen(4)
    seen_lo, seen_hi = 9.0, 0.0
    for shape in [(16, 16), (64, 32), (32, 64), (256, 128), (100, 256)]:
        for kappa in (1.0, 3.0, 10.0):
            x = ref.well_conditioned(*shape, kappa=kappa, generator=gen).float()
            s = torch.linalg.svdvals(F.newton_schulz(x, dtype=dtype).double())
            seen_lo, seen_hi = min(seen_lo, float(s.min())), max(seen_hi, float(s.max()))
    assert lo <= seen_lo and seen_hi <= hi, (seen_lo, seen_hi, lo, hi)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(5, 3), (3, 5), (4, 4), (2, 6, 3), (6, 3, 2, 2)])
def test_zero_in_zero_out(shape, dtype):
    x = torch.zeros(*shape)
    outs = [_ortho([x], dtype=dtype)[0]]
    if x.ndim <= 3:
        outs.append(F.newton_schulz(x, dtype=dtype))
    for out in outs:
        assert out.shape == x.shape
        assert not torch.isnan(out).any()
        assert torch.equal(out, torch.zeros_like(x))


def test_batched_3d_is_per_slice(ref):
    x = torch.randn(3, 12, 20, generator=_gen(5))
    out = F.newton_schulz(x, dtype=torch.float32)
    assert out.shape == x.shape
    torch.testing.assert_close(out.double(), ref.ns(x), rtol=0, atol=2e-5)
    for i in range(3):  # each slice is orthogonalized on its own (not normalised by the stack's norm)
        torch.testing.assert_close(out[i], F.newton_schulz(x[i], dtype=torch.float32), rtol=1e-5, atol=1e-6)
    tall = torch.randn(2, 20, 12, generator=_gen(6))
    torch.testing.assert_close(F.newton_schulz(tall, dtype=torch.float32).double(), ref.ns(tall), rtol=0, atol=2e-5)


def test_conv_weight_is_orthogonalized_as_out_by_rest(ref):
    w = torch.randn(8, 3, 3, 3, generator=_gen(7))  # (out, in, kh, kw) → (8, 27)
    out = _ortho([w], dtype=torch.float32)[0]
    assert out.shape == w.shape
    torch.testing.assert_close(out.double(), ref.ns(w), rtol=0, atol=2e-5)
    flat = out.reshape(8, -1).double()
    # wide (8 × 27) and well-conditioned: rows are near-orthonormal within the quintic band
    s = torch.linalg.svdvals(flat)
    assert float(s.min()) > 0.6 and float(s.max()) < 1.25


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_output_keeps_input_dtype(dtype):
    x = torch.randn(6, 4).to(dtype)
    assert F.newton_schulz(x, dtype=torch.float32).dtype == dtype
    assert _ortho([x], dtype=torch.bfloat16)[0].dtype == dtype


def test_orthogonalize_batching_equals_per_tensor_calls():
    gen = _gen(8)
    tensors = [torch.randn(16, 8, generator=gen), torch.randn(8, 16, generator=gen), torch.randn(16, 8, generator=gen),
               torch.randn(4, 2, 3, 3, generator=gen), torch.randn(2, 5, 7, generator=gen),
               torch.randn(16, 8, generator=gen)]
    for dtype in (torch.float32, torch.bfloat16):
        together = _ortho(tensors, dtype=dtype)
        for t, out in zip(tensors, together):
            alone = _ortho([t], dtype=dtype)[0]
            assert out.shape == t.shape
            torch.testing.assert_close(out, alone, rtol=1e-6, atol=1e-6 if dtype == torch.float32 else 1e-2)
            if t.ndim == 2:
                torch.testing.assert_close(out, F.newton_schulz(t, dtype=dtype), rtol=1e-6,
                                           atol=1e-6 if dtype == torch.float32 else 1e-2)
    assert F.orthogonalize([], []) == []


def test_newton_schulz_rejects_bad_steps_and_vectors():
    with pytest.raises(ValueError, match="ns_steps"):
        F.newton_schulz(torch.randn(3, 3), steps=0)
    with pytest.raises(ValueError, match="2-D"):
        F.orthogonalize([torch.randn(5)], ["matrix"])
    with pytest.raises(ValueError, match="cannot be orthogonalized"):
        F.orthogonalize([torch.randn(5, 2)], ["-"])


@pytest.mark.parametrize("shape,view", [((64, 16), "matrix"), ((16, 64), "matrix"), ((10, 10), "matrix"),
                                        ((8, 3, 3, 3), "flatten"), ((32, 16, 3), "flatten"), ((4, 6, 2), "stack"),
                                        ((4, 2, 3, 3, 3), "flatten")])
def test_muon_lr_scale(ref, shape, view):
    for mode in ("original", "match_rms_adamw"):
        got = F.muon_lr_scale(*F.matrix_shape(shape, view), mode)
        assert got == pytest.approx(ref.muon_scale(shape, mode, view), rel=1e-12)
    assert F.muon_lr_scale(64, 16, "original") == pytest.approx(2.0)
    assert F.muon_lr_scale(16, 64, "match_rms_adamw") == pytest.approx(1.6)
    with pytest.raises(ValueError, match="adjust_lr"):
        F.muon_lr_scale(3, 3, "nope")


# --------------------------------------------------------------------------------------------------
# Moments and energy
# --------------------------------------------------------------------------------------------------


def test_moments_whitening_and_energy(ref):
    gen = _gen(9)
    g1, g2 = torch.randn(5, 4, generator=gen, dtype=torch.float64), torch.randn(5, 4, generator=gen, dtype=torch.float64)
    m, v = torch.zeros(5, 4, dtype=torch.float64), torch.zeros(5, 4, dtype=torch.float64)
    for g in (g1, g2):
        F.update_moments_([m], [v], [g], 0.9, 0.99)
    m_ref = 0.9 * 0.1 * g1 + 0.1 * g2
    v_ref = 0.99 * 0.01 * g1**2 + 0.01 * g2**2
    torch.testing.assert_close(m, m_ref)
    torch.testing.assert_close(v, v_ref)
    step = torch.tensor([2.0], dtype=torch.float64)
    bc1, bc2 = F.bias_correction(step, 0.9), F.bias_correction(step, 0.99)
    assert (float(bc1), float(bc2)) == pytest.approx((1 - 0.81, 1 - 0.9801))
    denom = F.rms_denominators([v], bc2, 1e-8)[0]
    torch.testing.assert_close(denom, (v_ref / (1 - 0.99**2)).sqrt() + 1e-8)
    white = F.whiten([m], [denom], bc1)[0]
    torch.testing.assert_close(white, (m_ref / (1 - 0.9**2)) / denom)
    o = torch.randn(5, 4, generator=gen, dtype=torch.float64)
    e = F.frobenius_norms([white])[0]
    assert float(e) == pytest.approx(ref.fro(white), rel=1e-6)
    torch.testing.assert_close(F.scale_by_energy([o], [e], normalize=False)[0], float(e) * o)
    torch.testing.assert_close(F.scale_by_energy([o], [e], normalize=True)[0], float(e) * o / ref.fro(o),
                               rtol=1e-6, atol=0)


# --------------------------------------------------------------------------------------------------
# Sharpness-aware pieces
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("perturb_norm", ["global", "per_tensor"])
@pytest.mark.parametrize("adaptive", [True, False])
@pytest.mark.parametrize("first_step", [True, False])
@pytest.mark.parametrize("folded", [False, True], ids=["denominators", "folded-denominators"])
def test_sam_perturbation(ref, perturb_norm, adaptive, first_step, folded):
    """``folded``: the denominators of :func:`F.folded_rms_denominators` (bias correction moved onto ε, a
    different one per tensor) with their factors give the same perturbation as ``√v̂+ε`` itself."""
    grads, params, v_hats, eps = _perturbation_case(first_step)
    denoms, factors = [None if v is None else v.sqrt() + eps for v in v_hats], None
    if folded and not first_step:
        bcs = torch.tensor([0.3, 0.6, 0.9], dtype=torch.float64)  # v̂ = v/bc
        denoms, factors = F.folded_rms_denominators([v * bc for v, bc in zip(v_hats, bcs)], eps * bcs.sqrt()), bcs.sqrt()
    work = [g.clone() for g in grads]
    directions = F.sam_directions_(work, denoms, params, adaptive)  # the in-place chain, as ARS composes it
    scales = F.perturbation_scales(F.frobenius_norms(directions), [0.05] * 3, perturb_norm, factors)
    assert all(a is b for a, b in zip(directions, work))  # N in place
    moved = [p.clone() for p in params]
    F.apply_perturbation_(moved, directions, scales)
    _check_perturbation(ref, moved, grads, v_hats, params, eps, adaptive, perturb_norm)


def _perturbation_case(first_step: bool, dtype: torch.dtype = torch.float64):
    gen = _gen(10)
    shapes = [(6, 4), (4,), (3, 5)]
    grads = [torch.randn(*s, generator=gen, dtype=dtype) for s in shapes]
    params = [torch.randn(*s, generator=gen, dtype=dtype) for s in shapes]
    v_hats = [None] * 3 if first_step else [torch.rand(*s, generator=gen, dtype=dtype) for s in shapes]
    return grads, params, v_hats, 1e-3  # ε large enough that a missing one would show


def _check_perturbation(ref, moved, grads, v_hats, params, eps, adaptive, perturb_norm, rtol=1e-6, atol=1e-15):
    expected = ref.perturbation(grads, v_hats, params, 0.05, eps, adaptive, perturb_norm)
    e = [m - p for m, p in zip(moved, params)]
    for got, want in zip(e, expected):
        torch.testing.assert_close(got.double(), want, rtol=rtol, atol=atol)
    if perturb_norm == "global":
        assert math.sqrt(sum(ref.fro(t) ** 2 for t in e)) == pytest.approx(0.05, rel=rtol)
    else:
        assert [ref.fro(t) for t in e] == pytest.approx([0.05] * 3, rel=rtol)


@pytest.mark.parametrize("perturb_norm,adaptive,first_step", [
    ("global", True, False), ("per_tensor", False, False), ("global", True, True),
    pytest.param("per_tensor", True, False, marks=pytest.mark.slow),
    pytest.param("global", False, True, marks=pytest.mark.slow)])
def test_fused_sam_perturbation_matches_the_reference(ref, perturb_norm, adaptive, first_step):
    """The ``torch.compile``-d two-pass perturbation (``compile=True``) against the hand-written SAM
    reference, with the bias correction folded onto ε, a non-contiguous weight, and the gradients
    left unchanged."""
    grads, params, v_hats, eps = _perturbation_case(first_step, torch.float32)
    params[2] = params[2].t().contiguous().t()  # same values, transposed memory: written back through a copy
    assert not params[2].is_contiguous()
    bcs = torch.tensor([0.3, 0.6, 0.9])
    second = [None if v is None else v * bc for v, bc in zip(v_hats, bcs)]
    factors = torch.ones(3) if first_step else bcs.sqrt()
    moved, before = [p.clone() for p in params], [g.clone() for g in grads]
    moved[2] = moved[2].t().contiguous().t()
    norms = F.fused_direction_norms(moved, grads, second, eps * factors, adaptive)
    F.fused_perturb_(moved, grads, second, eps * factors, F.perturbation_scales(norms, [0.05] * 3, perturb_norm,
                                                                                 factors), adaptive)
    assert all(torch.equal(g, b) for g, b in zip(grads, before))
    _check_perturbation(ref, moved, grads, v_hats, params, eps, adaptive, perturb_norm, rtol=2e-5, atol=5e-7)


def test_sam_perturbation_rejects_unknown_norm():
    with pytest.raises(ValueError, match="perturb_norm"):
        F.perturbation_scales(torch.ones(1), [0.1], "spectral")


def test_shear_force_and_injection(ref):
    gen = _gen(11)
    g = [torch.randn(6, 4, generator=gen, dtype=torch.float64), torch.randn(7, generator=gen, dtype=torch.float64)]
    ga = [t + 0.3 * torch.randn(t.shape, generator=gen, dtype=torch.float64) for t in g]
    s, _ = F.shear_force(ga, g)
    for si, gai, gi in zip(s, ga, g):
        torch.testing.assert_close(si, ref.shear(gai, gi))
        assert abs(ref.dot(si, gi)) < 1e-10 * ref.fro(si) * ref.fro(gi) + 1e-12  # orthogonal to g
    injected = F.inject_shear(g, s, 0.25)
    for out, gi, si in zip(injected, g, s):
        torch.testing.assert_close(out, ref.inject(gi, si, 0.25))
    # α as a tensor (AGA passes α_t on the device)
    injected_t = F.inject_shear(g, s, torch.tensor(0.25, dtype=torch.float64))
    for a, b in zip(injected, injected_t):
        torch.testing.assert_close(a, b)
    # a zero shear leaves the gradient untouched
    assert torch.equal(F.inject_shear([g[0]], [torch.zeros_like(g[0])], 0.5)[0], g[0])


@pytest.mark.parametrize("rule", ["abs", "signed"])
def test_aga_phi_threshold_and_alpha(ref, rule):
    gen = _gen(12)
    g = [torch.randn(6, 4, generator=gen), torch.randn(5, generator=gen)]
    for sign in (1.0, -1.0):
        s = [sign * t + 0.5 * torch.randn(t.shape, generator=gen) for t in g]
        cos = ref.signed_alignment(g, s)
        assert float(F.alignment(g, s)) == pytest.approx(cos, rel=1e-5)
        phi = F.aga_phi(F.alignment(g, s), rule)
        want_phi = abs(cos) if rule == "abs" else cos
        assert float(phi) == pytest.approx(want_phi, rel=1e-5)
        want_alpha = 0.1 * (1 - want_phi) ** 2.0 if rule == "abs" else 0.1 * (1 + max(0.0, want_phi)) ** 2.0
        assert float(F.aga_alpha(phi, 0.1, 2.0, rule)) == pytest.approx(want_alpha, rel=1e-5)
        assert float(F.aga_alpha(phi, 0.3, 1.5, rule)) == pytest.approx(
            0.3 * ((1 - want_phi) if rule == "abs" else (1 + max(0.0, want_phi))) ** 1.5, rel=1e-5)
    # staleness test: abs syncs when φ > λ√ν; signed when φ < −λ√ν
    nu = torch.tensor(0.04)  # λ√ν = 2·0.2 = 0.4
    for phi_value in (-0.9, -0.41, -0.39, 0.0, 0.39, 0.41, 0.9):
        trig = bool(F.aga_triggers_sync(torch.tensor(phi_value), F.aga_threshold(nu, 2.0), rule))
        want = phi_value > 0.4 if rule == "abs" else phi_value < -0.4
        assert trig == want, (phi_value, rule)


def test_aga_phi_rejects_unknown_rule():
    with pytest.raises(ValueError, match="aga_rule"):
        F.aga_phi(torch.tensor(0.5), "square")


def _asi_reference(rho, rho0, gap, ema_gap, delta, alpha, gamma):
    eta = 0.01 * alpha
    mu = gamma if abs(gap) > ema_gap else 1.0
    new = rho * (1 + eta * mu) if delta < 0 else rho * (1 - eta * mu)
    return min(max(new, 0.1 * rho0), 10 * rho0)


@pytest.mark.parametrize(
    "rho,gap,ema_gap,delta,expected",
    [
        (0.1, 0.5, 0.2, -1.0, 0.1 * (1 + 0.001 * 2.0)),  # loss falling, big gap: grow by 1+ηγ
        (0.1, 0.1, 0.2, -1.0, 0.1 * (1 + 0.001)),  # loss falling, small gap: grow by 1+η
        (0.1, -0.5, 0.2, 0.3, 0.1 * (1 - 0.001 * 2.0)),  # loss rising, |h| big: shrink by 1−ηγ
        (0.1, 0.1, 0.2, 0.0, 0.1 * (1 - 0.001)),  # Δ = 0 counts as not falling
        (0.9999, 0.5, 0.2, -1.0, 1.0),  # clipped at 10·ρ0
        (0.01, 0.5, 0.2, 1.0, 0.01),  # clipped at 0.1·ρ0
    ],
)
def test_asi_rho(rho, gap, ema_gap, delta, expected):
    got = F.asi_rho(rho, 0.1, gap, ema_gap, delta, alpha=0.1, aga_gamma=2.0)
    assert got == pytest.approx(expected, rel=1e-12)
    assert got == pytest.approx(_asi_reference(rho, 0.1, gap, ema_gap, delta, 0.1, 2.0), rel=1e-12)


# --------------------------------------------------------------------------------------------------
# the step's finiteness gate
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("paired", [False, True], ids=["norms", "paired-halves"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_all_finite_sees_every_inf_and_nan(monkeypatch, paired, dtype):
    monkeypatch.setitem(F.PAIRED_HALVES_MIN_NUMEL, "cpu", 1 if paired else 1 << 62)
    dots = []
    monkeypatch.setattr(torch, "dot", lambda a, b, _dot=torch.dot: dots.append(a.numel()) or _dot(a, b))
    # odd and even sizes; the zeros make inf·0 = NaN the only way an inf in the other half can show
    tensors = [torch.randn(7, 5, generator=_gen(4)).to(dtype), torch.randn(6, generator=_gen(5)).to(dtype),
               torch.zeros(9, dtype=dtype), torch.full((4,), 3e18, dtype=dtype)]
    assert F.all_finite(tensors).item() is True
    takes_halves = paired and dtype in (torch.float32, torch.float64)
    assert dots == ([17, 3, 4, 2] if takes_halves else [])
    for i, t in enumerate(tensors):
        for pos in sorted({0, t.numel() // 2 - 1, t.numel() // 2, t.numel() - 1}):  # both halves, odd tails
            for bad in (float("nan"), float("inf"), -float("inf")):
                poisoned = [x.clone() for x in tensors]
                poisoned[i].view(-1)[pos] = bad
                assert F.all_finite(poisoned).item() is False, (i, pos, bad)
    assert F.all_finite([]).item() is True


def test_all_finite_pairs_halves_from_the_cpu_threshold(monkeypatch):
    dots = []
    monkeypatch.setattr(torch, "dot", lambda a, b, _dot=torch.dot: dots.append(a.numel()) or _dot(a, b))
    least = F.PAIRED_HALVES_MIN_NUMEL["cpu"]
    big, small, strided = torch.ones(least), torch.ones(least - 1), torch.ones(2, least)[:, ::2]
    assert strided.numel() == least and not strided.is_contiguous()
    assert F.all_finite([big, small, strided]).item() is True
    assert dots == [least // 2]  # the smaller and the non-contiguous tensors take the norms
    big[-1] = float("inf")
    assert F.all_finite([big]).item() is False
