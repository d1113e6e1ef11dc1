"""RMSuon, AdaRMSuon and F-AdaRMSuon: AdamW's energy, Muon's geometry."""

from __future__ import annotations

from .base import COMMON_HPARAMS, FamilyOptimizer, Schema
from .hparams import choice
from .stages import (
    AdamMoments,
    DecoupledDecay,
    EnergyRescale,
    NaturalDecay,
    Orthogonalize,
    Whiten,
    WhitenedEnergy,
)


class RMSuon(FamilyOptimizer):
    """RMSuon (seed 003): ``E = ‖m̂/(√v̂+ε)‖``; ``O = NS(m̂)``; ``U = E·O/(‖O‖+1e-10)`` — AdamW's
    Frobenius energy in Muon's direction."""

    name = "rmsuon"
    schema = Schema(COMMON_HPARAMS)
    matrix_stages = (AdamMoments(), WhitenedEnergy(), Orthogonalize(), EnergyRescale(normalize=True), DecoupledDecay())


class AdaRMSuon(FamilyOptimizer):
    """AdaRMSuon (seed 002): pre-whiten ``G = m̂/(√v̂+ε)``; ``E = ‖G‖``; ``O = NS(G)``;
    ``U = E·O`` (``energy_scale="reference"``) or ``U = E·O/‖O‖`` (``"rms"``, AdamW-matched energy).

    ``‖E·O‖ ≈ E·√rank``: the reference scale steps up to √min(rows, cols)× farther than AdamW at the
    same lr — use small learning rates (≈1e-4) with it, or ``energy_scale="rms"``.
    """

    name = "ada_rmsuon"
    schema = Schema(COMMON_HPARAMS).extended(
        choice("energy_scale", "reference", ("reference", "rms"), "U = E·O (reference) or E·O/‖O‖ (rms)"),
    )
    matrix_stages = (AdamMoments(), Whiten(), Orthogonalize(), EnergyRescale(), DecoupledDecay())


class FAdaRMSuon(FamilyOptimizer):
    """F-AdaRMSuon (seed 000, ADR-0009): AdaRMSuon with *natural* weight decay on the matrix track.

    ``natural_wd="projected"``: ``U = E·O + wd·(⟨D,O⟩/‖O‖²)·O`` with ``D = p/(√v̂+ε)`` — the
    Fisher-preconditioned decay projected onto the update direction (keeps its low-rank geometry).
    ``natural_wd="elementwise"``: ``U = E·O + wd·p/(√v̂+ε)`` (the ADR's first, harmful form; ablation).
    No ``p·(1−lr·wd)`` step on the matrix track; the AdamW track decays as usual.
    """

    name = "f_ada_rmsuon"
    schema = AdaRMSuon.schema.extended(
        choice("natural_wd", "projected", ("projected", "elementwise"), "form of the natural weight decay"),
    )
    matrix_stages = (AdamMoments(), Whiten(keep_denominators=True), Orthogonalize(), EnergyRescale(), NaturalDecay())
