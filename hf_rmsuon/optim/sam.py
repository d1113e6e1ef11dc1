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
import math
import weakref
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

from .. import functional as F
from ..routing import MATRIX
from .hparams import beta, choice, flag, integer, nonneg
from .rmsuon import AdaRMSuon

SAM_HPARAMS = (
    nonneg("rho", 0.1, "perturbation radius ρ (per param group; a group with ρ = 0 is not perturbed)"),
    integer("k", 1, "sync every k steps: 0 never (AGA alone with adaptive_sync), 1 always, >1 Lazy mode"),
    nonneg("alpha", 0.1, "shear-force injection strength α on lazy steps"),
    flag("adaptive", True, "ASAM-style scale invariance: N ← N⊙|p|"),
    choice("perturb_norm", "global", ("global", "per_tensor"), "‖N‖ over all tensors, or per tensor"),
    flag("replay_rng", True, "dropout sees the same RNG state in both passes"),
    flag("keep_buffers", True, "keep the sync step's weight copy and base gradient buffers between steps "
                               "(reused: no allocation per sync step; their memory stays held)"),
)
NEO_HPARAMS = (
    flag("adaptive_sync", False, "AGA: sync when the cached shear force has gone stale"),
    flag("asi", False, "ASI: adapt ρ from the surrogate gap"),
    beta("aga_beta", 0.99, "EMA rate of AGA's ν and ASI's averages, in [0, 1)"),
    nonneg("aga_lambda", 2.0, "AGA staleness threshold λ"),
    nonneg("aga_gamma", 2.0, "AGA injection exponent γ (also ASI's μ)"),
    choice("aga_rule", "abs", ("abs", "signed"), "AGA rule: |φ| (design) or signed φ (exactly the research code)"),
    choice("asi_first_sync", "initialise", ("initialise", "adapt"),
           "ASI on the first sync: only initialise its averages, or also adapt ρ (the research code)"),
)


@contextlib.contextmanager
def preserved_batchnorm_stats(model: nn.Module | None = None) -> Iterator[None]:
    """Run the body without changing any BatchNorm running statistics.

    Covers the BatchNorm modules of ``model`` and — through a global forward pre-hook — every other
    BatchNorm module that runs inside the body, so an optimizer built from bare parameters protects
    them too."""
    saved: dict[int, tuple[nn.Module, list[Tensor | None]]] = {}

    def snapshot(module: nn.Module, *_: Any) -> None:
        if (id(module) not in saved and isinstance(module, nn.modules.batchnorm._BatchNorm)
                and module.track_running_stats):
            saved[id(module)] = (module, [b.clone() if b is not None else None for b in
                                          (module.running_mean, module.running_var, module.num_batches_tracked)])

    for module in model.modules() if model is not None else ():
        snapshot(module)
    handle = nn.modules.module.register_module_forward_pre_hook(snapshot)
    try:
        yield
    finally:
        handle.remove()
        with torch.no_grad():
            for m, values in saved.values():
                for buf, value in zip((m.running_mean, m.running_var, m.num_batches_tracked), values):
                    if buf is not None and value is not None:
                        buf.copy_(value)


def _device_rng_module(device_type: str) -> Any:
    module = getattr(torch, device_type, None)
    available = getattr(module, "is_available", None)
    if module is None or not callable(available) or not available():
        return None
    return module


class RNGState:
    """A snapshot of the CPU RNG and of the RNGs of every device type in use (CUDA, MPS, XPU, …;
    ``torch.random.fork_rng`` semantics), to give both SAM passes the same dropout masks."""

    def __init__(self, device_types: Iterable[str] = ()) -> None:
        types = set(device_types)
        if torch.accelerator.is_available():
            types.add(torch.accelerator.current_accelerator().type)
        self.cpu = torch.get_rng_state()
        self.devices: dict[str, tuple[Any, Any, bool]] = {}
        for device_type in sorted(types - {"cpu", "meta"}):
            module = _device_rng_module(device_type)
            if module is None:
                continue
            every = hasattr(module, "get_rng_state_all")
            state = module.get_rng_state_all() if every else module.get_rng_state()
            self.devices[device_type] = (module, state, every)

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        for module, state, every in self.devices.values():
            if every:
                module.set_rng_state_all(state)
            else:
                module.set_rng_state(state)


class ARS(AdaRMSuon):
    """ARS: AdaRMSuon + manifold-aware SAM. ``e = ρ·N/‖N‖`` with ``N = g/(√v̂_prev+ε)`` (⊙|p| when
    ``adaptive``); the step uses ``g_adv = ∇L(w+e)``. ``k > 1``: sync on steps 1, k+1, 2k+1, … and on
    the lazy steps between inject ``g ← g + α·(‖g‖/‖s‖)·s`` with the stored shear force ``s``."""

    name = "ars"
    schema = AdaRMSuon.schema.extended(*SAM_HPARAMS)
    global_hparams = AdaRMSuon.global_hparams + tuple(p.name for p in (*SAM_HPARAMS, *NEO_HPARAMS) if p.name != "rho")
    sharpness_aware = True

    def __init__(self, params, *, model: nn.Module | None = None, **hyperparameters: Any) -> None:
        super().__init__(params, model=model, **hyperparameters)
        self.sam: dict[str, Any] = {
            "step": 0, "last_sync": 0, "syncs": 0, "prev_lazy": False,
            "nu": 0.0, "nu_count": 0, "rho": self.defaults["rho"], "rho_scale": 1.0,
            "ema_gap": None, "ema_loss": None,
        }
        self._plan: dict[str, Any] | None = None
        self._pass: dict[str, Any] | None = None  # the recorded second pass of the coming step
        self._shear_norms: dict[int, Tensor] | None = None  # ‖s‖ per parameter, valid until the next sync
        self._buffers: dict[tuple[int, str], Tensor] = {}  # sync-step buffers (keep_buffers), not state
        self._model: weakref.ref | None = weakref.ref(model) if model is not None else None
        if self.sharding is not None and model is None:
            raise ValueError(
                f"{type(self).__name__}: sharded (FSDP2) parameters need the model for SAM's second pass, so the "
                "perturbed shards are gathered again: create_optimizer(name, model) or "
                f"{type(self).__name__}(model.parameters(), model=model)")

    def _reshard(self) -> None:
        """Under FSDP2, drop every gathered (unsharded) parameter, so that the next forward gathers the
        shards as they are now — with ``reshard_after_backward=False`` FSDP would otherwise reuse the
        weights of the last forward and the second pass would not see ``w + e`` (or the restore)."""
        model = self._model() if self._model is not None else None
        if self.sharding is None or model is None:
            return
        from torch.distributed.fsdp import FSDPModule

        for module in model.modules():
            if isinstance(module, FSDPModule):
                module.reshard()

    def _check_group(self, hparams: dict[str, Any], owner: str) -> None:
        super()._check_group(hparams, owner)
        if hparams.get("adaptive_sync") is False and hparams["k"] == 0 and hparams.get("asi"):
            raise ValueError(f"{owner}: asi=True adapts ρ on sync steps, but k=0 without adaptive_sync never syncs")

    def _option(self, name: str) -> Any:
        return self.defaults.get(name, False)

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
        plan: dict[str, Any] = {"t": t, "due": False, "phi": None, "alpha": self.defaults["alpha"], "nu": None}
        if not self._option("adaptive_sync"):
            plan["due"] = k == 1 or (k > 1 and (t - 1) % k == 0)
            return plan
        rule = self.defaults["aga_rule"]
        pairs = [(F.local(p.grad), F.local(self.state[p]["shear"])) for p in self._params_with_grad()
                 if "shear" in self.state[p]]
        if t == 1 or not pairs:
            if rule == "signed" and t == 1:
                plan["nu"] = 0.0  # the research code sets ν = φ₁², and φ₁ = 0 without a shear force
            plan["due"] = True
            return plan
        beta_, lam = self.defaults["aga_beta"], self.defaults["aga_lambda"]
        phi = F.aga_phi(F.alignment([g for g, _ in pairs], [s for _, s in pairs], self._reduce()), rule)
        alpha = F.aga_alpha(phi, self.defaults["alpha"], self.defaults["aga_gamma"], rule)
        if rule == "signed":
            # research code: ν (no bias correction) is updated before the test on every step whose
            # previous step was lazy, with this step's φ
            nu = torch.full((), float(self.sam["nu"]), dtype=torch.float32, device=phi.device)
            if self.sam["last_sync"] < t - 1:
                nu = beta_ * nu + (1.0 - beta_) * phi.float().square()
            threshold = F.aga_threshold(nu, lam)
            trigger = F.aga_triggers_sync(phi, threshold, rule)
        else:
            nu = torch.full((), float("nan"), device=phi.device)
            threshold = torch.full((), float("nan"), device=phi.device)
            trigger = torch.zeros((), dtype=torch.bool, device=phi.device)
            if self.sam["nu_count"] > 0:  # no staleness statistics yet → no φ-triggered sync
                nu = torch.full((), self.sam["nu"] / (1.0 - beta_ ** self.sam["nu_count"]), device=phi.device)
                threshold = F.aga_threshold(nu, lam)
                trigger = F.aga_triggers_sync(phi, threshold, rule)
        forced = k > 1 and t - self.sam["last_sync"] >= k
        # AGA's one host read, where the decision is needed: the decision, φ, α, threshold and ν together.
        # A non-finite gradient makes φ NaN; the step gate skips that step, and φ is not committed.
        flags = [trigger, phi, alpha, threshold, nu]
        due, phi_value, alpha_value, threshold_value, nu_value = torch.stack(
            [f.to(phi.device, torch.float32) for f in flags]).tolist()
        usable = math.isfinite(phi_value)
        plan.update(due=bool(due) or forced, phi=phi_value, alpha=alpha_value if usable else 0.0,
                    threshold=threshold_value, nu=nu_value if rule == "signed" and usable else None, nu_hat=nu_value)
        return plan

    def _params_with_grad(self) -> list[Tensor]:
        return [p for group in self.param_groups for p in group["params"] if p.grad is not None]

    # -- the second pass ---------------------------------------------------------------------------------
    def reset_sam_pass(self) -> None:
        """Forget any plan or recorded pass (e.g. one left by a step that a grad scaler skipped)."""
        self._plan = None
        self._pass = None

    def _buffer(self, p: Tensor, key: str, like: Tensor) -> Tensor:
        """A scratch tensor like ``like`` for ``p``'s sync-step ``key`` ("weights", "base_grad"): the same
        memory every sync step with ``keep_buffers`` (a fresh buffer costs page faults on a CPU, and
        the caching allocator holds it on an accelerator anyway), else a new one."""
        if not self.defaults["keep_buffers"]:
            return torch.empty_like(like)
        buf = self._buffers.get((id(p), key))
        if buf is None or buf.shape != like.shape or buf.dtype != like.dtype or buf.device != like.device:
            buf = self._buffers[(id(p), key)] = torch.empty_like(like)
        return buf

    def _previous_second_moments(self, params: list[Tensor], groups: list[dict]
                                 ) -> tuple[list[Tensor | None], Tensor, Tensor]:
        """The previous step's ``√v̂+ε`` per tensor with the bias correction folded onto ε
        (:func:`F.folded_rms_denominators`): ``(v, ε', f)`` with ``√v̂+ε = (√v_i+ε'_i)/f_i``, ``ε'_i = ε·f_i``,
        ``f_i = √(1−β2ᵗ)``. ``v_i = None`` (``f_i = 1``) before a tensor has moments: ``N = g``.

        Decided on the device: a tensor whose moments exist but whose every step was skipped (``t = 0``,
        ``v = 0``; FSDP2 also creates moments before the first step) gets ``ε' = f = 1``, so ``N = g`` bit
        for bit, without a host read."""
        second_moments: list[Tensor | None] = [None] * len(params)
        device = params[0].device if params else torch.device("cpu")
        ones = F.constant_vector((1.0,) * len(params), device, torch.float32)
        eps, factors = list(ones.unbind()), list(ones.unbind())
        by_setting: dict[tuple[float, float], list[int]] = {}
        for i, (p, group) in enumerate(zip(params, groups)):
            if "exp_avg_sq" not in self.state[p]:
                continue
            if self.spec_of(p).track == MATRIX:
                beta2, adam_eps = group["betas"][1], group["eps"]
            else:
                _, (_, beta2), adam_eps, _ = self.adamw_settings(group)
            by_setting.setdefault((beta2, adam_eps), []).append(i)
        for (beta2, adam_eps), idx in by_setting.items():
            states = [self.state[params[i]] for i in idx]
            counts = torch.stack([st["step"] for st in states])
            stepped = counts > 0  # else v = 0: ε' = f = 1, so N = g bit for bit
            folded = torch.where(stepped, F.bias_correction(counts, beta2), 1.0).sqrt()
            shifts = torch.where(stepped, adam_eps * folded, 1.0)
            for i, st, e, f in zip(idx, states, shifts.unbind(), folded.unbind()):
                second_moments[i], eps[i], factors[i] = F.local(st["exp_avg_sq"]), e, f
        return second_moments, torch.stack(eps) if eps else ones, torch.stack(factors) if factors else ones

    @torch.no_grad()
    def begin_sam_pass(self, grad_scale: float | None = None) -> None:
        """Save ``w`` and the base gradient, move to ``w + e`` and zero the gradients for the replay.

        ``grad_scale``: the loss scale the gradients carry (fp16 GradScaler); the perturbation
        direction is computed from the unscaled gradient so ``ε`` keeps its meaning. Groups with
        ``rho = 0`` are not perturbed. Linear in the number of tensors."""
        if self._plan is None or not self._plan["due"]:
            raise RuntimeError("begin_sam_pass() called but no sync step is due; check sam_pass_due() first")
        if self._pass is not None:
            raise RuntimeError("begin_sam_pass() called twice for one step")
        with_grad = [(p, group) for group in self.param_groups for p in group["params"] if p.grad is not None]
        perturbed = [(p, group) for p, group in with_grad if group["rho"] > 0]
        # compile=True: the tensors for the fused passes last (a stable sort), decided on the whole parameters
        # (DTensors under FSDP2) so that every rank splits alike and the row reductions' collectives pair up
        fused = [self.defaults["compile"] and F.fuses_sam_passes(p) for p, _ in perturbed]
        perturbed = [pg for _, pg in sorted(zip(fused, perturbed), key=lambda fp: fp[0])]
        params = [p for p, _ in perturbed]
        values = [F.local(p) for p in params]  # local shards under FSDP2 (aliasing the parameters)
        all_params = [p for p, _ in with_grad]
        base_grads = []
        if self._stores_shear():  # the base gradient is needed only for the shear force (Lazy mode / AGA)
            base_grads = [self._buffer(p, "base_grad", F.local(p.grad)) for p in all_params]
            torch._foreach_copy_(base_grads, [F.local(p.grad) for p in all_params])
        weights = [self._buffer(p, "weights", v) for p, v in zip(params, values)]
        second_moments, eps, factors = self._previous_second_moments(params, [g for _, g in perturbed])
        if grad_scale:
            factors = factors / grad_scale  # N of the unscaled gradient (e is invariant to it; ‖N‖² stays in range)
        device = values[0].device if values else torch.device("cpu")
        exact = torch.float32 if device.type == "mps" else torch.float64
        rhos = F.constant_vector(tuple(group["rho"] for _, group in perturbed), device, exact)
        scale = self.sam["rho_scale"]  # ASI's factor: a device tensor once adapted
        if isinstance(scale, Tensor) or scale != 1.0:
            rhos = rhos * (scale.to(device, exact) if isinstance(scale, Tensor) else scale)
        if values:
            self._perturb(params, values, weights, second_moments, eps, factors, rhos, fused.count(False))
        self._pass = {"params": values, "weights": weights, "grad_params": all_params, "base_grads": base_grads}
        if all_params:  # one multi-tensor call: at depth the host's per-tensor cost is what a GPU waits on
            torch._foreach_zero_([F.local(p.grad) for p in all_params])
        self._reshard()

    def _perturb(self, params: list[Tensor], values: list[Tensor], weights: list[Tensor],
                 second_moments: list[Tensor | None], eps: Tensor, factors: Tensor, rhos: Tensor,
                 split: int) -> None:
        """Copy the weights into ``weights`` and move them to ``w + e``: the first ``split`` tensors by the
        in-place chain, the rest (``compile=True``, :func:`F.fuses_sam_passes`) by two fused passes that
        never store ``Ñ``, under one ``‖N‖``."""
        adaptive, perturb_norm, reduce = self.defaults["adaptive"], self.defaults["perturb_norm"], self._reduce()
        grads = [F.local(p.grad) for p in params]
        # the chain: Ñ is built in the gradients' memory (zeroed for the replay anyway); the weight-copy
        # buffers serve as scratch for √v+ε' and |p| before they receive the weights
        work = self._in_state_dtype(params[:split], grads[:split])
        scratch = [w if w.dtype == g.dtype else None for w, g in zip(weights, work)]
        directions = F.sam_directions_(work, F.folded_rms_denominators(second_moments[:split], eps[:split], scratch),
                                       values[:split], adaptive)
        norms = [F.frobenius_norms(directions, reduce)] if directions else []
        if split < len(values):  # the fused passes read g, v and p; the gradients stay as they are
            norms.append(F.fused_direction_norms(values[split:], grads[split:], second_moments[split:], eps[split:],
                                                 adaptive, reduce))
        scales = F.perturbation_scales(torch.cat(norms), rhos, perturb_norm, factors)
        torch._foreach_copy_(weights, values)
        F.apply_perturbation_(values[:split], directions, scales[:split])
        F.fused_perturb_(values[split:], grads[split:], second_moments[split:], eps[split:], scales[split:], adaptive)

    def end_sam_pass(self, loss: float | Tensor | None = None, adv_loss: float | Tensor | None = None) -> None:
        """Restore ``w`` exactly from the saved copy; ``p.grad`` now holds ``g_adv`` for :meth:`step`."""
        if self._pass is None or "weights" not in self._pass:
            raise RuntimeError("end_sam_pass() without begin_sam_pass()")
        with torch.no_grad():
            if self._pass["params"]:
                torch._foreach_copy_(self._pass["params"], self._pass.pop("weights"))
            else:
                self._pass.pop("weights")
        self._reshard()
        self._pass["loss"] = loss
        self._pass["adv_loss"] = adv_loss

    # -- the step ---------------------------------------------------------------------------------------
    def _device_types(self) -> set[str]:
        return {p.device.type for group in self.param_groups for p in group["params"]}

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One ARS step. With a closure: evaluate it, and on sync steps evaluate it again at ``w+e``
        (it must call backward). Without one, a sync step needs a recorded second pass."""
        rng = RNGState(self._device_types()) if closure is not None and self.defaults["replay_rng"] else None
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
            self._norm_hint = None
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
        finite = self._finite_flag(gathered) if gathered and (sync or not self._stores_shear()) else None
        if sync:
            shears, finite = self._shear_forces(gathered, finite)
            keep = self._step_gate(finite) if gathered else None
            self._after_sync(plan, shears, keep)
        else:
            grad_norms = None
            if gathered and self._stores_shear():
                # ‖g‖ per tensor, needed by the injection anyway, also answers "all finite?" (one pass)
                grad_norms = [F.frobenius_norms(grads, self._reduce()) for _, _, grads in gathered]
                finite = torch.isfinite(torch.cat(grad_norms).sum())
            keep = self._step_gate(finite) if gathered else None
            gathered = self._lazy_gradients(gathered, plan, grad_norms)
        if plan.get("nu") is not None:  # the signed rule's ν, committed with the step
            self.sam["nu"] = float(plan["nu"])
        self.sam["step"] = plan["t"]
        if gathered:
            self._update(gathered, keep)
        self._last["sync_ratio"] = self.sam["syncs"] / max(1, self.sam["step"])
        self._last["rho"] = self.sam["rho"]
        if plan["phi"] is not None:
            self._last["phi"] = plan["phi"]
            self._last["aga_threshold"] = plan["threshold"]
            self._last["aga_nu_sqrt"] = plan["nu_hat"] ** 0.5 if plan["nu_hat"] == plan["nu_hat"] else float("nan")
        if self.sam["ema_gap"] is not None:
            self._last["asi_gap_avg"] = self.sam["ema_gap"]
        self._last["alpha"] = plan["alpha"] if not sync else self._last.get("alpha", self.defaults["alpha"])

    def _stores_shear(self) -> bool:
        return self.defaults["k"] > 1 or bool(self._option("adaptive_sync"))

    def _shear_forces(self, gathered, finite: Tensor | None) -> tuple[dict[int, Tensor], Tensor | None]:
        """The shear forces of this sync step (``id(p) → s``, when Lazy mode or AGA will use them), and
        the finiteness flag extended to them: a non-finite base gradient makes ``s`` non-finite even
        where ``g_adv`` is finite, and that step must be skipped too."""
        assert self._pass is not None
        if not self._stores_shear():
            return {}, finite
        base = {id(p): g for p, g in zip(self._pass["grad_params"], self._pass["base_grads"])}
        params = [p for _, ps, _ in gathered for p in ps if id(p) in base]
        adv = self._in_state_dtype(params, [F.local(p.grad) for p in params])
        base_grads = self._in_state_dtype(params, [base[id(p)] for p in params])
        shears, coefficients = F.shear_force(adv, base_grads, self._reduce(), [self._shear_scratch(p) for p in params])
        if finite is not None and params:
            finite = finite & torch.isfinite(coefficients.sum())
        return {id(p): s for p, s in zip(params, shears)}, finite

    def _shear_scratch(self, p: Tensor) -> Tensor | None:
        """Where to compute ``p``'s new shear force when an old one is stored: the weight-copy buffer, idle
        after the restore (it becomes the stored force by a copy in :meth:`_after_sync`, so a sync step
        allocates nothing); ``None`` (a new tensor, which is stored) for the first one."""
        old, scratch = self.state[p].get("shear"), self._buffers.get((id(p), "weights"))
        if old is None or scratch is None or scratch.dtype != old.dtype or scratch.shape != F.local(old).shape:
            return None
        return scratch

    def _after_sync(self, plan: dict[str, Any], shears: dict[int, Tensor], keep: Tensor | None) -> None:
        """Commit a sync step: the schedule, the shear forces and ASI's ρ (state writes gated by ``keep``)."""
        assert self._pass is not None
        self.sam.update(last_sync=plan["t"], syncs=self.sam["syncs"] + 1, prev_lazy=False)
        for p in (p for group in self.param_groups for p in group["params"] if id(p) in shears):
            s, old = shears[id(p)], self.state[p].get("shear")
            if old is not None:  # into the stored force; a skipped sync step keeps it
                stored = F.local(old)
                if keep is not None:
                    torch.where(keep, s, stored, out=stored)
                else:
                    stored.copy_(s)
                continue
            if keep is not None:  # a skipped first sync step stores zero
                s.masked_fill_(keep.logical_not(), 0.0)
            self.state[p]["shear"] = self.sharding.like(p, s) if self.sharding is not None else s
        self._shear_norms = None  # ‖s‖, taken once by the first lazy step after this sync
        loss, adv_loss = self._pass.get("loss"), self._pass.get("adv_loss")
        if loss is None or adv_loss is None:
            return
        device = keep.device if keep is not None else None
        exact = torch.float32 if device is not None and device.type == "mps" else torch.float64  # losses feed ASI
        loss = torch.as_tensor(loss).detach().to(device=device, dtype=exact)
        gap = torch.as_tensor(adv_loss).detach().to(device=device, dtype=exact) - loss
        self._last["surrogate_gap"] = gap
        if self._option("asi"):
            self._adapt_rho(loss, gap, keep)

    def _adapt_rho(self, loss: Tensor, gap: Tensor, keep: Tensor | None) -> None:
        """ASI's ρ-update, decided on the device (no host read). The averages are NaN until the first
        observation, which initialises them (and, with ``asi_first_sync="adapt"``, runs the rule with
        ``Δ = 0``); a skipped step changes nothing."""
        beta_ = self.defaults["aga_beta"]
        sam = self.sam

        def previous(key: str) -> Tensor:
            value = sam[key]
            return torch.full_like(loss, float("nan")) if value is None else torch.as_tensor(value).to(loss)

        prev_gap, prev_loss, prev_scale = previous("ema_gap"), previous("ema_loss"), previous("rho_scale")
        first = torch.isnan(prev_loss)
        ema_gap = torch.where(first, gap.abs(), beta_ * prev_gap + (1 - beta_) * gap.abs())
        ema_loss = torch.where(first, loss, beta_ * prev_loss + (1 - beta_) * loss)
        delta = torch.where(first, 0.0, ema_loss - prev_loss)  # research code: Δ = 0 on the first ("adapt")
        # ASI scales every group's ρ by one factor, clipped to [0.1, 10] of the configured ρ
        scale = F.asi_rho(prev_scale, 1.0, gap, ema_gap, delta, self.defaults["alpha"], self.defaults["aga_gamma"])
        if self.defaults["asi_first_sync"] == "initialise":
            scale = torch.where(first, prev_scale, scale)
        if keep is not None:
            ema_gap, ema_loss, scale = (torch.where(keep, new, old) for new, old in
                                        ((ema_gap, prev_gap), (ema_loss, prev_loss), (scale, prev_scale)))
        sam["ema_gap"], sam["ema_loss"], sam["rho_scale"] = ema_gap, ema_loss, scale
        sam["rho"] = self.defaults["rho"] * scale

    def _lazy_gradients(self, gathered, plan: dict[str, Any], grad_norms: list[Tensor] | None = None):
        """Inject the stored shear force into the fresh gradient (``p.grad`` untouched: the result goes
        to the sync-step buffers, or new tensors without ``keep_buffers``)."""
        if (self._option("adaptive_sync") and self.defaults["aga_rule"] == "abs" and plan["phi"] is not None
                and math.isfinite(plan["phi"]) and self.sam["prev_lazy"]):
            beta_ = self.defaults["aga_beta"]
            self.sam["nu"] = beta_ * self.sam["nu"] + (1 - beta_) * float(plan["phi"]) ** 2
            self.sam["nu_count"] += 1
        self.sam["prev_lazy"] = True
        if not self._stores_shear():
            return gathered
        out = []
        if self._shear_norms is None:
            self._shear_norms = {}
        for n, (group, params, grads) in enumerate(gathered):
            grads = list(grads)
            idx = [i for i, p in enumerate(params) if "shear" in self.state[p]]
            if idx:
                fresh = self._in_state_dtype([params[i] for i in idx], [grads[i] for i in idx])
                shears = [F.local(self.state[params[i]]["shear"]) for i in idx]
                missing = [j for j, i in enumerate(idx) if id(params[i]) not in self._shear_norms]
                if missing:  # s is fixed until the next sync: its norms are taken once
                    norms = F.frobenius_norms([shears[j] for j in missing], self._reduce())
                    self._shear_norms.update((id(params[idx[j]]), norm) for j, norm in zip(missing, norms.unbind()))
                shear_norms = torch.stack([self._shear_norms[id(params[i])] for i in idx])
                # into the base-gradient buffers, idle between sync steps
                into = [self._buffer(params[i], "base_grad" if g.dtype == F.local(params[i].grad).dtype else "injected", g)
                        for i, g in zip(idx, fresh)]
                norms = None
                if grad_norms is not None:
                    norms = grad_norms[n] if len(idx) == len(params) else torch.stack([grad_norms[n][i] for i in idx])
                injected = F.inject_shear(fresh, shears, plan["alpha"], self._reduce(), shear_norms, into, norms)
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
        self._shear_norms = None
        if "sam" in family:
            self.sam.update(family["sam"])


class ARS2Neo(ARS):
    """ARS2-Neo: ARS + Lazy mode + AGA (``adaptive_sync``) + optional ASI.

    AGA (``aga_rule="abs"``, the design): ``φ_t = |Σ⟨g,s⟩|/(‖g‖·‖s‖)``; ``ν ← β·ν + (1−β)·φ²`` on
    lazy steps that follow a lazy step (bias-corrected, ``ν̂ = ν/(1−β^n)``; no φ-triggered sync before
    ν has a sample); sync when ``φ_t > λ·√ν̂``, at step 1, or when ``k > 1`` steps have passed;
    ``α_t = α·(1−φ_t)^γ``. ``aga_rule="signed"`` is the research code's rule exactly: signed φ, ν
    without bias correction, updated before the test on steps after a lazy step, sync when
    ``φ_t < −λ·√ν``, ``α_t = α·(1+max(0, φ_t))^γ``. With ``k ≤ 1`` AGA alone decides (plus step 1).
    ASI: ``ρ`` grows by ``(1+η·μ)`` while the loss EMA falls and shrinks otherwise, within
    ``[0.1·ρ0, 10·ρ0]`` (``η = 0.01·α``, ``μ = γ`` when the surrogate gap exceeds its EMA)."""

    name = "ars2_neo"
    schema = ARS.schema.extended(*NEO_HPARAMS)
