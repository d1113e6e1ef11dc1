"""Muon and PureNS-Muon: momentum SGD whose matrix-track step is orthogonalized."""

from __future__ import annotations

from .base import COMMON_HPARAMS, FamilyOptimizer, Schema, beta
from .hparams import choice, flag, nonneg
from .stages import DecoupledDecay, NesterovMomentum, Orthogonalize, RawGradient, ShapeFactor

_MUON_HPARAMS = (
    *COMMON_HPARAMS,
    nonneg("weight_decay", 0.1, "decoupled weight decay: p ← p·(1 − lr·wd)"),
    choice("adjust_lr", "original", ("original", "match_rms_adamw"),
           "shape factor s: √max(1, rows/cols) or 0.2·√max(rows, cols)"),
)


class Muon(FamilyOptimizer):
    """Muon: ``M ← β·M + (1−β)·g``; ``u = (1−β)·g + β·M`` (nesterov) or ``M``; ``U = s·NS(u)``.

    Matches ``torch.optim.Muon`` on the matrix track (same defaults); ``betas``/``eps`` apply to the
    AdamW track only.
    """

    name = "muon"
    schema = Schema(_MUON_HPARAMS).extended(
        beta("momentum", 0.95, "momentum β of the matrix track"),
        flag("nesterov", True, "Nesterov momentum"),
    )
    matrix_stages = (NesterovMomentum(), Orthogonalize(), ShapeFactor(), DecoupledDecay())


class PureNSMuon(FamilyOptimizer):
    """PureNS-Muon (seed 001): Muon with momentum 0 — ``U = s·NS(g)``, no momentum state."""

    name = "pure_ns_muon"
    schema = Schema(_MUON_HPARAMS)
    matrix_stages = (RawGradient(), Orthogonalize(), ShapeFactor(), DecoupledDecay())
