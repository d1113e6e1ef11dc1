"""RMSuon, AdaRMSuon and F-AdaRMSuon: AdamW's energy, Muon's geometry."""

from __future__ import annotations

import torch

from .. import functional as F
from .base import COMMON_HPARAMS, FamilyOptimizer, Schema
from .hparams import choice


class RMSuon(FamilyOptimizer):
    """RMSuon (seed 003): ``E = ‖m̂/(√v̂+ε)‖``; ``O = NS(m̂)``; ``U = E·O/(‖O‖+1e-10)`` — AdamW's
    Frobenius energy in Muon's direction."""

    name = "rmsuon"
    schema = Schema(COMMON_HPARAMS)

    def _matrix_updates(self, group, params, grads, states):
        exp_avgs, denoms, t = self._adam_moments(group, params, grads, states)
        whitened = self._whitened(group, exp_avgs, denoms, t, states)
        energies = F.frobenius_norms(whitened)
        # NS is scale-invariant, so NS(m) = NS(m̂): no need to materialise m̂.
        ortho = self._ns(group, exp_avgs)
        return F.scale_by_energy(ortho, energies, normalize=True), group["lr"]


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

    def _whitened_direction(self, group, params, grads, states):
        """``(O, E, √v̂+ε)`` for the matrix track (moments advanced)."""
        exp_avgs, denoms, t = self._adam_moments(group, params, grads, states)
        if t < 0:  # mixed step counts: per-tensor bias corrections
            whitened = self._whitened(group, exp_avgs, denoms, t, states)
            return self._ns(group, whitened), F.frobenius_norms(whitened), denoms
        # G = (m/(√v̂+ε))/(1−β1^t): NS is scale-invariant, so the bias correction only enters E
        # (a scalar per tensor) — one full pass over the matrices saved.
        uncorrected = torch._foreach_div(exp_avgs, denoms)
        bias_correction1 = F.bias_corrections(t, group["betas"][0], 0.0)[0]
        energies = torch.stack(F.frobenius_norms(uncorrected)) / bias_correction1
        return self._ns(group, uncorrected), energies, denoms

    def _matrix_updates(self, group, params, grads, states):
        ortho, energies, _ = self._whitened_direction(group, params, grads, states)
        return F.scale_by_energy(ortho, energies, group["energy_scale"] == "rms"), group["lr"]


class FAdaRMSuon(AdaRMSuon):
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
    decoupled_matrix_decay = False

    def _matrix_updates(self, group, params, grads, states):
        ortho, energies, denoms = self._whitened_direction(group, params, grads, states)
        scales = F.energy_scales(ortho, energies, group["energy_scale"] == "rms")
        wd = group["weight_decay"]
        if wd == 0.0:
            return F.scale_each(ortho, scales), group["lr"]
        if group["natural_wd"] == "projected":
            # U = E·O + wd·(⟨D,O⟩/‖O‖²)·O: both terms are multiples of O, so add the coefficients
            return F.scale_each(ortho, scales + F.projected_natural_decay(params, denoms, ortho, wd)), group["lr"]
        decay = F.elementwise_natural_decay(params, denoms, wd)
        return list(torch._foreach_add(F.scale_each(ortho, scales), decay)), group["lr"]
