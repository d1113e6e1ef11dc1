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
