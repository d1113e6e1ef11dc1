"""AdaMuon (arXiv 2507.11005), the comparator: element-wise adaptivity applied *after* NS."""

from __future__ import annotations

import math

import torch

from .. import functional as F
from .base import COMMON_HPARAMS, FamilyOptimizer, Schema, betas


class AdaMuon(FamilyOptimizer):
    """``M ← β1·M + g``; ``u = g + β1·M``; ``O = NS(sign(u))``; ``V ← β2·V + (1−β2)·O²``;
    ``Û = O/(√V+ε)``; ``U = Û·0.2·√(rows·cols)/(‖Û‖+ε)``; decoupled decay. 1-D params: AdamW."""

    name = "adamuon"
    schema = Schema(COMMON_HPARAMS).extended(
        betas("betas", (0.95, 0.95), "(β1 momentum, β2 second moment of the orthogonalized sign)"),
    )

    def _matrix_updates(self, group, params, grads, states):
        beta1, beta2 = group["betas"]
        eps = group["eps"]
        for g, st in zip(grads, states):
            if "momentum_buffer" not in st:
                st["momentum_buffer"] = torch.zeros_like(g)
                st["exp_avg_sq"] = torch.zeros_like(g)
        bufs = [st["momentum_buffer"] for st in states]
        torch._foreach_mul_(bufs, beta1)
        torch._foreach_add_(bufs, grads)
        nesterov = torch._foreach_add(grads, bufs, alpha=beta1)
        ortho = self._ns(group, [u.sign() for u in nesterov])
        sqs = [st["exp_avg_sq"] for st in states]
        torch._foreach_mul_(sqs, beta2)
        torch._foreach_addcmul_(sqs, ortho, ortho, value=1.0 - beta2)
        denoms = torch._foreach_sqrt(sqs)
        torch._foreach_add_(denoms, eps)
        adapted = torch._foreach_div(ortho, denoms)
        norms = F.frobenius_norms(adapted)
        updates = [u * (0.2 * math.sqrt(u.numel()) / (n + eps)).to(u.dtype) for u, n in zip(adapted, norms)]
        return updates, group["lr"]
