"""ARS and ARS2-Neo: AdaRMSuon plus manifold-aware sharpness-aware minimization (SPEC §5).

A *sync step* evaluates the gradient twice at the same batch: the base gradient ``g`` at ``w`` and
the adversarial gradient ``g_adv`` at ``w + e``. The step itself then uses ``g_adv``. Lazy steps
(``k > 1`` or AGA) reuse the last sync's *shear force* — the part of ``g_adv`` orthogonal to ``g``.

The second pass can be driven two ways, both through the same three methods:

* plain PyTorch: ``optimizer.step(closure)`` — the closure computes the loss and calls backward;
* a training loop (the transformers integration): ``if opt.sam_pass_due(): opt.begin_sam_pass();
  <replay every micro-batch, backward>; opt.end_sam_pass(loss, adv_loss)`` and then ``opt.step()``.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

from .. import functional as F
from .hparams import choice, flag, integer, nonneg
from .rmsuon import AdaRMSuon

SAM_HPARAMS = (
    nonneg("rho", 0.1, "perturbation radius ρ"),
    integer("k", 1, "sync every k steps: 0 never, 1 always, >1 Lazy mode (shear-force injection)"),
    nonneg("alpha", 0.1, "shear-force injection strength α on lazy steps"),
    flag("adaptive", True, "ASAM-style scale invariance: N ← N⊙|p|"),
    choice("perturb_norm", "global", ("global", "per_tensor"), "‖N‖ over all tensors, or per tensor"),
    flag("replay_rng", True, "dropout sees the same RNG state in both passes"),
)
NEO_HPARAMS = (
    flag("adaptive_sync", False, "AGA: sync when the cached shear force has gone stale"),
    flag("asi", False, "ASI: adapt ρ from the surrogate gap"),
    nonneg("aga_beta", 0.99, "EMA rate of AGA's ν and ASI's averages"),
    nonneg("aga_lambda", 2.0, "AGA staleness threshold λ"),
    nonneg("aga_gamma", 2.0, "AGA injection exponent γ (also ASI's μ)"),
    choice("aga_rule", "abs", ("abs", "signed"), "AGA rule: |φ| (design) or signed φ (reference code)"),
)


@contextlib.contextmanager
def preserved_batchnorm_stats(model: nn.Module | None) -> Iterator[None]:
    """Run the body without changing any BatchNorm running statistics of ``model``."""
    if model is None:
        yield
        return
    saved = [
        (m, [b.clone() if b is not None else None for b in (m.running_mean, m.running_var, m.num_batches_tracked)])
        for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
    ]
    try:
        yield
    finally:
        with torch.no_grad():
            for m, (mean, var, count) in saved:
                for buf, value in ((m.running_mean, mean), (m.running_var, var), (m.num_batches_tracked, count)):
                    if buf is not None and value is not None:
                        buf.copy_(value)


class RNGState:
    """A snapshot of the CPU and CUDA RNGs, to give both SAM passes the same dropout masks."""

    def __init__(self) -> None:
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state_all(self.cuda)


class ARS(AdaRMSuon):
    """ARS: AdaRMSuon + manifold-aware SAM. ``e = ρ·N/‖N‖`` with ``N = g/(√v̂_prev+ε)`` (⊙|p| when
    ``adaptive``); the step uses ``g_adv = ∇L(w+e)``. ``k > 1``: sync on steps 1, k+1, 2k+1, … and on
    the lazy steps between inject ``g ← g + α·(‖g‖/‖s‖)·s`` with the stored shear force ``s``."""

    name = "ars"
    schema = AdaRMSuon.schema.extended(*SAM_HPARAMS)
    global_hparams = AdaRMSuon.global_hparams + tuple(p.name for p in (*SAM_HPARAMS, *NEO_HPARAMS))
    sharpness_aware = True

    def __init__(self, params, **hyperparameters: Any) -> None:
        super().__init__(params, **hyperparameters)
        self.sam: dict[str, Any] = {
            "step": 0, "last_sync": 0, "syncs": 0, "prev_lazy": False,
            "nu": 0.0, "nu_count": 0, "rho": self.defaults["rho"],
            "ema_gap": None, "ema_loss": None,
        }
        self._plan: dict[str, Any] | None = None
        self._pass: dict[str, Any] | None = None  # the recorded second pass of the coming step
        self._model: weakref.ref | None = None

    def _option(self, name: str) -> Any:
        return self.defaults.get(name, False)

    def attach_model(self, model: nn.Module) -> None:
        """Let ``step(closure)`` keep the model's BatchNorm statistics out of the second pass."""
        self._model = weakref.ref(model)

    # -- planning ---------------------------------------------------------------------------------------
    def sam_pass_due(self) -> bool:
        """Whether the coming step is a sync step. Call after the base gradient is complete (all
        micro-batches accumulated, all ranks reduced); AGA reads it to decide."""
        if self._plan is None:
            self._plan = self._make_plan()
        return self._plan["due"]

    def _make_plan(self) -> dict[str, Any]:
        t = self.sam["step"] + 1
        k = self.defaults["k"]
        plan: dict[str, Any] = {"t": t, "due": False, "phi": None, "alpha": self.defaults["alpha"]}
        if k == 0:
            return plan
        if not self._option("adaptive_sync"):
            plan["due"] = k == 1 or (t - 1) % k == 0
            return plan
        pairs = [(p.grad, self.state[p]["shear"]) for p in self._params_with_grad() if "shear" in self.state[p]]
        if t == 1 or not pairs:
            plan["due"] = True
            return plan
        rule = self.defaults["aga_rule"]
        phi = F.aga_phi(F.alignment([g for g, _ in pairs], [s for _, s in pairs]), rule)
        alpha = F.aga_alpha(phi, self.defaults["alpha"], self.defaults["aga_gamma"], rule)
        plan.update(phi=phi, alpha=alpha)
        forced = k > 1 and t - self.sam["last_sync"] >= k
        if forced:
            plan["due"] = True
        else:
            trigger = torch.tensor(False)
            if self.sam["nu_count"] > 0:  # no staleness statistics yet → no φ-triggered sync
                nu_hat = self.sam["nu"] / (1.0 - self.defaults["aga_beta"] ** self.sam["nu_count"])
                trigger = F.aga_triggers_sync(phi, torch.tensor(nu_hat), self.defaults["aga_lambda"], rule)
            # the one host read of a lazy AGA step: the decision, φ and finiteness together
            grads = [(None, [], [g for g, _ in pairs])]
            flags = [trigger, self._finite_flag(grads), phi, alpha]
            due, finite, phi_value, alpha_value = torch.stack(
                [f.to(phi.device, torch.float32) for f in flags]).tolist()
            plan.update(due=bool(due), finite=bool(finite), phi=phi_value, alpha=alpha_value)
        return plan

    def _params_with_grad(self) -> list[Tensor]:
        return [p for group in self.param_groups for p in group["params"] if p.grad is not None]

    # -- the second pass ---------------------------------------------------------------------------------
    def reset_sam_pass(self) -> None:
        """Forget any plan or recorded pass (e.g. one left by a step that a grad scaler skipped)."""
        self._plan = None
        self._pass = None

    @torch.no_grad()
    def begin_sam_pass(self, grad_scale: float | None = None) -> None:
        """Save ``w`` and the base gradient, move to ``w + e`` and zero the gradients for the replay.

        ``grad_scale``: the loss scale the gradients carry (fp16 GradScaler); the perturbation
        direction is computed from the unscaled gradient so ``ε`` keeps its meaning."""
        if self._plan is None or not self._plan["due"]:
            raise RuntimeError("begin_sam_pass() called but no sync step is due; check sam_pass_due() first")
        if self._pass is not None:
            raise RuntimeError("begin_sam_pass() called twice for one step")
        params = self._params_with_grad()
        grads = [p.grad for p in params]
        denoms = []
        for p in params:
            st = self.state[p]
            if "exp_avg_sq" in st and st["step"] > 0:
                group = self._group_of(p)
                _, bc2 = F.bias_corrections(st["step"], *group["betas"])
                denoms.append(F.rms_denominators([st["exp_avg_sq"]], bc2, group["eps"])[0])
            else:
                denoms.append(None)  # first step: N = g
        direction_grads = grads if not grad_scale else [g / grad_scale for g in grads]
        e = F.sam_perturbation(direction_grads, denoms, params, self.sam["rho"], self.defaults["adaptive"],
                               self.defaults["perturb_norm"])
        self._pass = {
            "params": params,
            "weights": [p.detach().clone() for p in params],
            "base_grads": [g.detach().clone() for g in grads],
        }
        torch._foreach_add_(params, e)
        for g in grads:
            g.zero_()

    def end_sam_pass(self, loss: float | Tensor | None = None, adv_loss: float | Tensor | None = None) -> None:
        """Restore ``w`` exactly from the saved copy; ``p.grad`` now holds ``g_adv`` for :meth:`step`."""
        if self._pass is None or "weights" not in self._pass:
            raise RuntimeError("end_sam_pass() without begin_sam_pass()")
        with torch.no_grad():
            torch._foreach_copy_(self._pass["params"], self._pass.pop("weights"))
        self._pass["loss"] = loss
        self._pass["adv_loss"] = adv_loss

    def _group_of(self, p: Tensor) -> dict:
        for group in self.param_groups:
            if any(q is p for q in group["params"]):
                return group
        raise KeyError("parameter not in this optimizer")

    # -- the step ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One ARS step. With a closure: evaluate it, and on sync steps evaluate it again at ``w+e``
        (it must call backward). Without one, a sync step needs a recorded second pass."""
        rng = RNGState() if closure is not None and self.defaults["replay_rng"] else None
        loss = None
        if closure is not None:
            if self._pass is None:
                self._plan = None  # the closure produces new gradients: plan from those
            with torch.enable_grad():
                loss = closure()
        try:
            if self._pass is None and self.sam_pass_due():
                if closure is None:
                    raise RuntimeError(
                        f"{type(self).__name__}: step {self._plan['t']} is a SAM sync step, which needs a "
                        "second gradient evaluation. Call optimizer.step(closure) with a closure that "
                        "computes the loss and calls backward, train with hf_rmsuon.RMSuonTrainer, or "
                        "call hf_rmsuon.install() before creating a transformers Trainer."
                    )
                self._closure_second_pass(closure, loss, rng)
            self._sam_update()
        finally:
            self._plan = None
            self._pass = None
        return loss

    def _closure_second_pass(self, closure: Callable[[], Any], loss: Any, rng: RNGState | None) -> None:
        model = self._model() if self._model is not None else None
        self.begin_sam_pass()
        adv_loss = None
        try:
            if rng is not None:
                rng.restore()
            with preserved_batchnorm_stats(model), torch.enable_grad():
                adv_loss = closure()
        finally:
            self.end_sam_pass(loss, adv_loss)

    def _sam_update(self) -> None:
        plan = self._plan if self._plan is not None else self._make_plan()
        gathered = self._gather()
        sync = self._pass is not None
        if sync:
            # one host read: finiteness of g_adv together with the two losses (surrogate gap, ASI)
            losses = [self._pass.get("loss"), self._pass.get("adv_loss")]
            finite_flag = self._finite_flag(gathered)
            exact = torch.float32 if finite_flag.device.type == "mps" else torch.float64  # losses feed ASI
            known = [torch.as_tensor(v).detach().to(finite_flag.device, exact) for v in losses if v is not None]
            values = torch.stack([finite_flag.to(exact), *known]).tolist()
            self._pass["loss"], self._pass["adv_loss"] = (values[1], values[2]) if len(known) == 2 else (None, None)
            if not self._accept_gradients(bool(values[0])):
                return
            self._after_sync(gathered, plan)
        else:
            known_finite = plan.get("finite")  # read together with AGA's decision
            finite = known_finite if known_finite is not None else bool(self._finite_flag(gathered))
            if not self._accept_gradients(finite):
                return
            gathered = self._lazy_gradients(gathered, plan)
        self.sam["step"] = plan["t"]
        self.stats["steps"] += 1
        self._update(gathered)
        self._last["sync_ratio"] = self.sam["syncs"] / max(1, self.sam["step"])
        self._last["rho"] = self.sam["rho"]
        if plan["phi"] is not None:
            self._last["phi"] = plan["phi"]
        self._last["alpha"] = plan["alpha"] if not sync else self._last.get("alpha", self.defaults["alpha"])

    def _stores_shear(self) -> bool:
        return self.defaults["k"] > 1 or bool(self._option("adaptive_sync"))

    def _after_sync(self, gathered, plan: dict[str, Any]) -> None:
        assert self._pass is not None
        self.sam.update(last_sync=plan["t"], syncs=self.sam["syncs"] + 1, prev_lazy=False)
        if self._stores_shear():
            base = {id(p): g for p, g in zip(self._pass["params"], self._pass["base_grads"])}
            params = [p for _, ps, _ in gathered for p in ps if id(p) in base]
            adv = [p.grad for p in params]
            for p, s in zip(params, F.shear_force(adv, [base[id(p)] for p in params])):
                self.state[p]["shear"] = s
        loss, adv_loss = self._pass.get("loss"), self._pass.get("adv_loss")
        if loss is not None and adv_loss is not None:
            gap = float(adv_loss) - float(loss)
            self._last["surrogate_gap"] = gap
            if self._option("asi"):
                self._adapt_rho(float(loss), gap)

    def _adapt_rho(self, loss: float, gap: float) -> None:
        beta = self.defaults["aga_beta"]
        sam = self.sam
        if sam["ema_loss"] is None:  # first observation initialises the averages
            sam["ema_gap"], sam["ema_loss"] = abs(gap), loss
            return
        sam["ema_gap"] = beta * sam["ema_gap"] + (1 - beta) * abs(gap)
        previous = sam["ema_loss"]
        sam["ema_loss"] = beta * previous + (1 - beta) * loss
        sam["rho"] = F.asi_rho(sam["rho"], self.defaults["rho"], gap, sam["ema_gap"], sam["ema_loss"] - previous,
                               self.defaults["alpha"], self.defaults["aga_gamma"])

    def _lazy_gradients(self, gathered, plan: dict[str, Any]):
        """Inject the stored shear force into the fresh gradient (new tensors; ``p.grad`` untouched)."""
        if self._option("adaptive_sync") and plan["phi"] is not None and self.sam["prev_lazy"]:
            beta = self.defaults["aga_beta"]
            self.sam["nu"] = beta * self.sam["nu"] + (1 - beta) * float(plan["phi"]) ** 2
            self.sam["nu_count"] += 1
        self.sam["prev_lazy"] = True
        if self.defaults["k"] == 0:
            return gathered
        out = []
        for group, params, grads in gathered:
            grads = list(grads)
            idx = [i for i, p in enumerate(params) if "shear" in self.state[p]]
            if idx:
                injected = F.inject_shear([grads[i] for i in idx], [self.state[params[i]]["shear"] for i in idx],
                                          plan["alpha"])
                for i, g in zip(idx, injected):
                    grads[i] = g
            out.append((group, params, grads))
        return out

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none)
        if self._pass is None:
            self._plan = None  # a plan is only valid for the gradients it was made from

    # -- diagnostics and state ------------------------------------------------------------------------
    def diagnostics(self) -> dict[str, float]:
        out = super().diagnostics()
        out["effective_k"] = self.sam["step"] / max(1, self.sam["syncs"])
        return out

    def _extra_state(self) -> dict[str, Any]:
        return {"sam": dict(self.sam)}

    def _load_extra_state(self, family: dict[str, Any]) -> None:
        if "sam" in family:
            self.sam.update(family["sam"])


class ARS2Neo(ARS):
    """ARS2-Neo: ARS + Lazy mode + AGA (``adaptive_sync``) + optional ASI.

    AGA: ``φ_t = |Σ⟨g,s⟩|/(‖g‖·‖s‖)``; ``ν ← β·ν + (1−β)·φ²`` on lazy steps that follow a lazy step
    (bias-corrected, ``ν̂ = ν/(1−β^n)``; no φ-triggered sync before ν has a sample); sync when
    ``φ_t > λ·√ν̂``, at step 1, or when ``k > 1`` steps have passed; ``α_t = α·(1−φ_t)^γ``.
    ASI: ``ρ`` grows by ``(1+η·μ)`` while the loss EMA falls and shrinks otherwise, within
    ``[0.1·ρ0, 10·ρ0]`` (``η = 0.01·α``, ``μ = γ`` when the surrogate gap exceeds its EMA)."""

    name = "ars2_neo"
    schema = ARS.schema.extended(*NEO_HPARAMS)
