"""Muon and PureNS-Muon: momentum SGD whose matrix-track step is orthogonalized."""

from __future__ import annotations

from torch import Tensor

from .. import functional as F
from .base import COMMON_HPARAMS, FamilyOptimizer, Schema, beta
from .hparams import choice, flag, nonneg

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

    def _direction_inputs(self, group: dict, grads: list[Tensor], states: list[dict]) -> list[Tensor]:
        momentum = group["momentum"]
        bufs = []
        for g, st in zip(grads, states):
            if "momentum_buffer" not in st:
                st["momentum_buffer"] = g.new_zeros(g.shape)
            bufs.append(st["momentum_buffer"])
        F.ema_lerp_(bufs, grads, momentum)
        if group["nesterov"]:
            return [g.lerp(m, momentum) for g, m in zip(grads, bufs)]
        return bufs

    def _matrix_updates(self, group, params, grads, states):
        updates = self._ns(group, self._direction_inputs(group, grads, states))
        lrs = [group["lr"] * F.muon_lr_scale(p.shape, group["adjust_lr"]) for p in params]
        return updates, lrs


class PureNSMuon(Muon):
    """PureNS-Muon (seed 001): Muon with momentum 0 — ``U = s·NS(g)``, no momentum state."""

    name = "pure_ns_muon"
    schema = Schema(_MUON_HPARAMS)

    def _direction_inputs(self, group, grads, states):
        return grads
