"""AdaMuon (arXiv 2507.11005), the comparator: element-wise adaptivity applied *after* NS."""

from __future__ import annotations

from .base import COMMON_HPARAMS, FamilyOptimizer, Schema, betas
from .stages import AdaptiveRMSRescale, DecoupledDecay, Orthogonalize, SignedNesterovMomentum


class AdaMuon(FamilyOptimizer):
    """``M ← β1·M + g``; ``u = g + β1·M``; ``O = NS(sign(u))``; ``V ← β2·V + (1−β2)·O²``;
    ``Û = O/(√V+ε)``; ``U = Û·0.2·√(rows·cols)/(‖Û‖+ε)``; decoupled decay. 1-D params: AdamW."""

    name = "adamuon"
    schema = Schema(COMMON_HPARAMS).extended(
        betas("betas", (0.95, 0.95), "(β1 momentum, β2 second moment of the orthogonalized sign)"),
    )
    matrix_stages = (SignedNesterovMomentum(), Orthogonalize(), AdaptiveRMSRescale(), DecoupledDecay())
