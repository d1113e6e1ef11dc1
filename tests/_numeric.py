"""Small numeric helpers shared by the optimizer tests."""

import torch


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def assert_rel(got: torch.Tensor, want: torch.Tensor, tol: float) -> None:
    """‖got − want‖ ≤ tol·‖want‖ (Frobenius): robust to float32 NS rounding in single entries."""
    err = float((got.double() - want.double()).norm())
    scale = float(want.double().norm())
    assert err <= tol * scale, f"relative error {err / max(scale, 1e-300):.3g} > {tol}"
