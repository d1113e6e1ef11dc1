"""The stages of the matrix track, each implemented once:

    moments  →  preconditioning  →  orthogonalization  →  energy  →  decay

A family member *declares* its matrix-track rule as a chain of these stages (``matrix_stages`` on
the class, read like optax's ``chain``); :class:`~hf_rmsuon.optim.base.FamilyOptimizer` runs the
chain over a :class:`MatrixBatch` — the matrix-track tensors of one param group in one step — and
applies ``p ← p·d − lr·s·U`` once at the end (``U = scale·O (+ extra)``, ``s`` Muon's shape
factor, ``d`` the decoupled-decay factor). The tensor math itself lives in :mod:`hf_rmsuon.functional`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .. import functional as F
from ..routing import TensorSpec

#: ``(inputs, views, global shapes, want ‖inputs‖) → (O, ‖inputs‖ or None, ‖O‖)``: the norms are of whole
#: matrices, taken where the whole matrix is (under FSDP2: on the rank that orthogonalizes it), so
#: sharding does not change them. ‖inputs‖ is taken only when a stage asked for it.
OrthogonalizeFn = Callable[[list[Tensor], list[str], list[tuple[int, ...]], bool],
                           tuple[list[Tensor], Tensor | None, Tensor]]


@dataclass
class MatrixBatch:
    """The matrix-track tensors of one param group in one step, as they flow through the stages."""

    group: dict[str, Any]
    owners: list[Tensor]  # the parameters as the optimizer holds them (DTensors under FSDP2)
    params: list[Tensor]  # their local values (the same tensors when not sharded)
    grads: list[Tensor]  # local gradients in the state dtype
    states: list[dict[str, Any]]
    specs: list[TensorSpec]
    orthogonalize: OrthogonalizeFn
    state_dtype: Callable[[Tensor], torch.dtype]
    reduce: F.Reduce | None = None  # sums per-shard partial reductions (None: not sharded)
    #: the step gate: a 0-d bool on the device, false when a gradient is non-finite (``grads`` are then
    #: zeros); every stage that writes state keeps it unchanged when false. ``None``: always applied.
    keep: Tensor | None = None
    # filled by the stages
    inputs: list[Tensor] = field(default_factory=list)  # what Newton–Schulz sees
    denoms: list[Tensor] | None = None  # √v̂+ε, when the member keeps Adam moments
    bias_corrections1: Tensor | None = None  # 1−β1^t per tensor (a vector on the device)
    energies: Tensor | None = None  # E per tensor (stacked)
    energy_of_input: Tensor | None = None  # or E = ‖input‖·factor, once the input norms are known
    ortho: list[Tensor] = field(default_factory=list)  # O
    input_norms: Tensor | None = None  # ‖input‖ and ‖O‖ of whole matrices (orthogonalization stage)
    ortho_norms: Tensor | None = None
    scales: Tensor | None = None  # U = scales_i·O_i (+ extra_i)
    extra: list[Tensor] | None = None
    lr_factors: list[float] | None = None  # per-tensor lr multipliers (Muon's shape factor)
    decay_factors: list[float] | None = None  # p ← p·d before the update (decoupled decay)

    def buffer(self, i: int, key: str) -> Tensor:
        """The local value of state tensor ``key`` of tensor ``i`` (created, like its parameter —
        a DTensor under FSDP2 — in the state dtype, on first use)."""
        return state_buffer(self.states[i], key, self.owners[i], self.state_dtype(self.owners[i]))

    def energy(self) -> Tensor:
        """``E`` per tensor: given by the preconditioning stage, or ``‖input‖·factor``."""
        if self.energies is not None:
            return self.energies
        return self.input_norms * self.energy_of_input.to(self.input_norms.dtype)

    def updates(self) -> list[Tensor]:
        """``U`` per tensor (zero on a skipped step), scaling ``O`` in place: it is this step's own
        buffer, and a fresh full-size temporary costs more than an in-place pass."""
        scales = self.scales
        if self.keep is not None:
            scales = self.keep.to(self.ortho[0].dtype) if scales is None else scales * self.keep
        if scales is not None and scales.ndim == 0:
            torch._foreach_mul_(self.ortho, scales)
        elif scales is not None:
            torch._foreach_mul_(self.ortho, list(scales.to(self.ortho[0].dtype).unbind()))
        updates = list(self.ortho)
        if self.extra is not None:
            updates = list(torch._foreach_add(updates, self.extra))
        return updates

    def update_norms(self, updates: list[Tensor]) -> Tensor:
        """``‖U‖`` per tensor (diagnostics): ``|scale|·‖O‖`` when ``U`` is a multiple of ``O``."""
        if self.extra is None and self.ortho_norms is not None:
            return self.ortho_norms * (self.scales.abs() if self.scales is not None else 1.0)
        return F.frobenius_norms(updates, self.reduce)


class Stage:
    """One step of the chain. ``kind`` is one of moments, preconditioning, orthogonalization, energy,
    decay; ``__call__`` reads and fills the batch."""

    kind: str = ""
    #: state tensors the stage keeps per parameter (created eagerly for sharded parameters)
    state_keys: tuple[str, ...] = ()

    def __call__(self, batch: MatrixBatch) -> None:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def state_buffer(state: dict[str, Any], key: str, param: Tensor, dtype: torch.dtype) -> Tensor:
    """The local value of the zero-initialised state tensor ``key``, created on first use like
    ``param`` (a DTensor with the parameter's placements under FSDP2), in the state dtype."""
    if key not in state:
        state[key] = torch.zeros_like(param, dtype=dtype, memory_format=torch.preserve_format)
    return F.local(state[key])


def step_count(state: dict[str, Any], param: Tensor) -> Tensor:
    """The tensor's Adam step count ``t``: a float32 0-d tensor on the parameter's (local) device, as
    torch's fused and capturable Adam keep it, so steps advance — or not, on a skipped step — without
    a host read."""
    if "step" not in state:
        state["step"] = torch.zeros((), dtype=torch.float32, device=F.local(param).device)
    return state["step"]


def advance_adam_moments(
    grads: list[Tensor], states: list[dict[str, Any]], betas: tuple[float, float], eps: float,
    state_dtype: Callable[[Tensor], torch.dtype], params: list[Tensor], keep: Tensor | None = None,
) -> tuple[list[Tensor], list[Tensor], Tensor]:
    """``m ← β1·m + (1−β1)·g``, ``v ← β2·v + (1−β2)·g²``, ``t ← t+1`` per tensor (all unchanged when
    the gate ``keep`` is false; ``grads`` are zeros then); returns ``(m, √v̂+ε, 1−β1^t)`` (local values;
    the bias corrections a vector on the device). ``params``: as the optimizer holds them (state is
    created like them). Shared by the AdamW track and the RMSuon members' matrix track."""
    beta1, beta2 = betas
    exp_avgs, exp_avg_sqs = [], []
    for p, st in zip(params, states):
        exp_avgs.append(state_buffer(st, "exp_avg", p, state_dtype(p)))
        exp_avg_sqs.append(state_buffer(st, "exp_avg_sq", p, state_dtype(p)))
    steps = [step_count(st, p) for p, st in zip(params, states)]
    F.advance_steps_(steps, keep)
    F.update_moments_(exp_avgs, exp_avg_sqs, grads, beta1, beta2, keep)
    # float64 bias corrections for float64 state (references at 1e-12), float32 otherwise
    counts = torch.stack(steps).to(torch.float64 if any(m.dtype == torch.float64 for m in exp_avgs) else torch.float32)
    denoms = F.rms_denominators(exp_avg_sqs, F.bias_correction(counts, beta2), eps)
    return exp_avgs, denoms, F.bias_correction(counts, beta1)


# --------------------------------------------------------------------------------------------------
# moments
# --------------------------------------------------------------------------------------------------


class RawGradient(Stage):
    """No moments: Newton–Schulz sees ``g`` (PureNS-Muon)."""

    kind = "moments"

    def __call__(self, batch: MatrixBatch) -> None:
        batch.inputs = batch.grads


class NesterovMomentum(Stage):
    """``M ← β·M + (1−β)·g``; input ``(1−β)·g + β·M`` (``nesterov``) or ``M`` (Muon)."""

    kind = "moments"
    state_keys = ("momentum_buffer",)

    def __call__(self, batch: MatrixBatch) -> None:
        momentum = batch.group["momentum"]
        bufs = [batch.buffer(i, "momentum_buffer") for i in range(len(batch.grads))]
        F.ema_lerp_(bufs, batch.grads, momentum, batch.keep)
        batch.inputs = [g.lerp(m, momentum) for g, m in zip(batch.grads, bufs)] if batch.group["nesterov"] else bufs


class SignedNesterovMomentum(Stage):
    """``M ← β1·M + g``; input ``sign(g + β1·M)`` (AdaMuon)."""

    kind = "moments"
    state_keys = ("momentum_buffer",)

    def __call__(self, batch: MatrixBatch) -> None:
        beta1 = batch.group["betas"][0]
        bufs = [batch.buffer(i, "momentum_buffer") for i in range(len(batch.grads))]
        torch._foreach_mul_(bufs, F.gated(batch.keep, beta1, 1.0))
        torch._foreach_add_(bufs, batch.grads)
        nesterov = torch._foreach_add(batch.grads, bufs, alpha=beta1)
        torch._foreach_sign_(nesterov)
        if batch.keep is not None:  # zero input on a skipped step, so that O = 0 leaves AdaMuon's V as it is
            torch._foreach_mul_(nesterov, batch.keep)
        batch.inputs = list(nesterov)


class AdamMoments(Stage):
    """Adam's ``m, v`` with bias correction: keeps ``√v̂+ε`` and ``1−β1^t`` for the next stages;
    input ``m`` (the preconditioning stage decides what Newton–Schulz sees)."""

    kind = "moments"
    state_keys = ("exp_avg", "exp_avg_sq")

    def __call__(self, batch: MatrixBatch) -> None:
        exp_avgs, batch.denoms, batch.bias_corrections1 = advance_adam_moments(
            batch.grads, batch.states, batch.group["betas"], batch.group["eps"], batch.state_dtype, batch.owners,
            batch.keep)
        batch.inputs = exp_avgs


# --------------------------------------------------------------------------------------------------
# preconditioning
# --------------------------------------------------------------------------------------------------


class Whiten(Stage):
    """Pre-whitening: ``G = m̂/(√v̂+ε)``, ``E = ‖G‖``; Newton–Schulz sees ``G`` (AdaRMSuon).

    NS is scale-invariant, so it is given ``m/(√v̂+ε)`` and the bias correction enters only ``E``;
    ``‖G‖`` is taken by the orthogonalization stage, where the whole matrix is. ``G`` is written over
    the step's ``√v̂+ε`` unless a later stage declared it needs them (``keep_denominators``)."""

    kind = "preconditioning"

    def __init__(self, keep_denominators: bool = False) -> None:
        self.keep_denominators = keep_denominators

    def __call__(self, batch: MatrixBatch) -> None:
        batch.inputs = F.whiten(batch.inputs, batch.denoms, overwrite_denominators=not self.keep_denominators)
        if not self.keep_denominators:
            batch.denoms = None  # spent: a stage reading them after this one fails loudly
        batch.energy_of_input = batch.bias_corrections1.reciprocal()

    def __repr__(self) -> str:
        return "Whiten(keep_denominators=True)" if self.keep_denominators else "Whiten()"


class WhitenedEnergy(Stage):
    """``E = ‖m̂/(√v̂+ε)‖`` (AdamW's step energy); Newton–Schulz keeps seeing ``m`` (RMSuon)."""

    kind = "preconditioning"

    def __call__(self, batch: MatrixBatch) -> None:
        norms = F.frobenius_norms(F.whiten(batch.inputs, batch.denoms), batch.reduce)
        batch.energies = norms / batch.bias_corrections1.to(norms.dtype)


# --------------------------------------------------------------------------------------------------
# orthogonalization
# --------------------------------------------------------------------------------------------------


class Orthogonalize(Stage):
    """``O = NS(input)`` over each tensor's matrix view (from routing)."""

    kind = "orthogonalization"

    def __call__(self, batch: MatrixBatch) -> None:
        batch.ortho, batch.input_norms, batch.ortho_norms = batch.orthogonalize(
            batch.inputs, [s.view for s in batch.specs], [s.shape for s in batch.specs],
            batch.energy_of_input is not None)


# --------------------------------------------------------------------------------------------------
# energy
# --------------------------------------------------------------------------------------------------


class ShapeFactor(Stage):
    """Muon's shape factor as a per-tensor lr multiplier: ``U = s·O`` with ``s`` from ``adjust_lr``
    and the matrix view."""

    kind = "energy"

    def __call__(self, batch: MatrixBatch) -> None:
        adjust = batch.group["adjust_lr"]
        batch.lr_factors = [F.muon_lr_scale(*s.matrix_shape, adjust) for s in batch.specs]


class EnergyRescale(Stage):
    """Energy re-injection ``U = E·O`` or, normalized, ``U = E·O/(‖O‖+1e-10)``. ``normalize=None``
    reads the group's ``energy_scale`` ("rms" normalizes, "reference" does not)."""

    kind = "energy"

    def __init__(self, normalize: bool | None = None) -> None:
        self.normalize = normalize

    def __call__(self, batch: MatrixBatch) -> None:
        normalize = self.normalize if self.normalize is not None else batch.group["energy_scale"] == "rms"
        energy = batch.energy()
        batch.scales = F.energy_scales(batch.ortho, energy, normalize, batch.ortho_norms.to(energy.dtype))

    def __repr__(self) -> str:
        return f"EnergyRescale(normalize={self.normalize if self.normalize is not None else 'energy_scale'})"


class AdaptiveRMSRescale(Stage):
    """AdaMuon's energy: ``V ← β2·V + (1−β2)·O²``; ``Û = O/(√V+ε)``; ``U = Û·0.2·√(rows·cols)/(‖Û‖+ε)``."""

    kind = "energy"
    state_keys = ("exp_avg_sq",)

    def __call__(self, batch: MatrixBatch) -> None:
        beta2, eps = batch.group["betas"][1], batch.group["eps"]
        sqs = [batch.buffer(i, "exp_avg_sq") for i in range(len(batch.ortho))]
        F.ema_square_(sqs, batch.ortho, beta2, batch.keep)  # O = 0 on a skipped step
        denoms = torch._foreach_sqrt(sqs)
        torch._foreach_add_(denoms, eps)
        adapted = F.whiten(batch.ortho, denoms, overwrite_denominators=True)  # Û = O/(√V+ε), in their memory
        norms = F.frobenius_norms(adapted, batch.reduce)
        targets = F.constant_vector(tuple(0.2 * math.sqrt(math.prod(s.shape)) for s in batch.specs), norms.device,
                                    norms.dtype)
        batch.ortho, batch.ortho_norms, batch.scales = adapted, norms, targets / (norms + eps)


# --------------------------------------------------------------------------------------------------
# decay
# --------------------------------------------------------------------------------------------------


def decay_weights(specs: list[TensorSpec], weight_decay: float) -> list[float]:
    """Per-tensor weight decay: the group's, or 0 where routing says no decay (1-D tensors)."""
    return [weight_decay if s.decay else 0.0 for s in specs]


class DecoupledDecay(Stage):
    """``p ← p·(1 − lr·wd)`` (applied together with the update)."""

    kind = "decay"

    def __call__(self, batch: MatrixBatch) -> None:
        lr = batch.group["lr"]
        batch.decay_factors = [1.0 - lr * wd for wd in decay_weights(batch.specs, batch.group["weight_decay"])]


class NaturalDecay(Stage):
    """F-AdaRMSuon's natural weight decay, added to ``U`` (no ``p·(1−lr·wd)`` step):
    ``"projected"``: ``wd·(⟨D,O⟩/‖O‖²)·O`` with ``D = p/(√v̂+ε)`` — a multiple of ``O``, so it is
    added to the scale; ``"elementwise"``: ``wd·D`` (the ADR's first, harmful form; ablation)."""

    kind = "decay"

    def __call__(self, batch: MatrixBatch) -> None:
        wds = decay_weights(batch.specs, batch.group["weight_decay"])
        if not any(wds):
            return
        if batch.denoms is None:
            raise RuntimeError("NaturalDecay needs the step's √v̂+ε: declare Whiten(keep_denominators=True) before it")
        params = [p if p.dtype == d.dtype else p.to(d.dtype) for p, d in zip(batch.params, batch.denoms)]
        wd = F.constant_vector(tuple(wds), batch.scales.device, torch.float32)
        if batch.keep is not None:  # the decay is part of U, so it too is zero on a skipped step
            wd = wd * batch.keep
        if batch.group["natural_wd"] == "projected":
            batch.scales = batch.scales + wd * F.projected_natural_decay(
                params, batch.denoms, batch.ortho, 1.0, batch.ortho_norms, batch.reduce)
        else:
            decay = F.elementwise_natural_decay(params, batch.denoms, 1.0)
            batch.extra = F.scale_each(decay, wd)
