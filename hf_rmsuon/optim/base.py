"""The shared skeleton of every family optimizer: routing, the two tracks, validation, the AdamW
track, non-finite guarding, diagnostics and the optimizer-wide state that ``state_dict`` carries.

A member declares its hyperparameter ``schema`` and its matrix-track rule as a chain of stages
(``matrix_stages``, see :mod:`hf_rmsuon.optim.stages`); everything else is here, once.

Param groups are the user's: one optimizer group per group given (so ``param_groups[i]`` and
per-group schedulers mean what the user expects). The *track* is a property of each tensor, decided
once by :class:`hf_rmsuon.routing.Router` when the tensor is added (construction or
``add_param_group``) and kept as a :class:`~hf_rmsuon.routing.TensorSpec`.
"""

from __future__ import annotations

import functools
import inspect
import math
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

from .. import functional as F
from ..routing import ADAMW, LORA_POLICIES, MATRIX, Router, RoutingOptions, TensorSpec
from .distributed import ShardedLayout, sharded_orthogonalize, split_orthogonalize
from .hparams import HyperParam, Schema, beta, betas, choice, eps, flag, integer, nonneg, optional
from .stages import MatrixBatch, OrthogonalizeFn, Stage, advance_adam_moments, state_buffer, step_count

COMMON_HPARAMS = (
    nonneg("lr", 1e-3, "learning rate (both tracks)"),
    betas("betas", (0.9, 0.999), "Adam moment decay rates (β1, β2)"),
    eps("eps", 1e-8, "Adam denominator ε"),
    nonneg("weight_decay", 0.01, "decoupled weight decay: p ← p·(1 − lr·wd)"),
    HyperParam("adamw_lr", "optional_float", None,
               "learning rate of the AdamW track (default: lr; LR schedulers scale it like lr)", minimum=0.0),
    optional("adamw_betas", "betas", "AdamW-track betas (default: betas)"),
    optional("adamw_eps", "eps", "AdamW-track ε (default: eps)"),
    optional("adamw_weight_decay", "float", "AdamW-track weight decay (default: weight_decay)"),
    integer("ns_steps", 5, "Newton–Schulz iterations", minimum=1),
    HyperParam("ns_coefficients", "floats3", F.NS_COEFFICIENTS, "quintic Newton–Schulz coefficients (a, b, c)"),
    choice("ns_dtype", "auto", ("auto", "bfloat16", "float32"), "Newton–Schulz compute dtype (auto: per device)"),
    choice("state_dtype", "auto", ("auto", "param", "float32", "float64"),
           "dtype of moments and shear force (auto: float32 for bf16/fp16 parameters, else the parameter's)"),
    choice("on_nonfinite", "skip", ("skip", "raise"),
           "non-finite gradient: skip the whole step (decided on the device), or raise (one host read per step)"),
    flag("split_ns", True, "with a data_parallel_group (DDP), each rank orthogonalizes a share; results gathered"),
    flag("compile", False, "torch.compile Newton–Schulz and SAM's perturbation passes where they pay (F.FUSED_SAM_MIN_NUMEL); off by default"),
)

#: Routing options: optimizer-wide, consumed when tensors are added (all ``--optim_args`` keys).
ROUTING_HPARAMS = Schema([
    choice("lora_policy", "both", LORA_POLICIES, "LoRA factors on the matrix track: both, B only, none"),
    HyperParam("adamw_patterns", "patterns", (), "regexes of parameter names forced onto the AdamW track"),
    HyperParam("matrix_patterns", "patterns", (), "regexes of parameter names forced onto the matrix track"),
    HyperParam("stack_patterns", "patterns", (), "regexes of parameter names whose ≥3-D tensors are stacks "
                                                "of matrices (orthogonalized per slice)"),
    flag("no_decay_1d", True, "no weight decay on 1-D tensors (biases, norms) unless their param group sets "
                              "weight_decay, as transformers does"),
])

#: Keys a param group may carry besides hyperparameters.
GROUP_KEYS = frozenset({"params", "param_names", "track", "name", "initial_lr"})


def resolve_dtype(setting: str, param: Tensor) -> torch.dtype:
    """The state dtype for ``param`` under ``state_dtype``."""
    if setting == "auto":
        return torch.float32 if param.dtype in (torch.float16, torch.bfloat16) else param.dtype
    if setting == "param":
        return param.dtype
    return getattr(torch, setting)


class FamilyOptimizer(torch.optim.Optimizer):
    """Base class: a matrix track (the member's stages) and an AdamW track, in one optimizer.

    ``params``: a model's ``parameters()`` or ``named_parameters()``, tensors, or param groups (dicts
    with ``params`` and any hyperparameter; ``"track"`` forces a track for the group's tensors).
    ``model``: routes model-aware (module types, embeddings, heads, LoRA) and lets SAM members keep
    BatchNorm statistics out of the second pass; :func:`hf_rmsuon.create_optimizer` passes it.
    ``data_parallel_group``: a process group whose ranks hold identical gradients (DDP); with
    ``split_ns`` each rank then orthogonalizes a share of the matrices. Without it nothing is split.
    """

    #: registry name (``--optim`` value)
    name: str = ""
    schema: Schema = Schema(COMMON_HPARAMS)
    #: the matrix-track rule: moments → preconditioning → orthogonalization → energy → decay
    matrix_stages: tuple[Stage, ...] = ()
    #: hyperparameters that define one optimizer-wide computation and so cannot differ per group
    global_hparams: tuple[str, ...] = ("on_nonfinite", "split_ns", "compile", "state_dtype")

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # An honest signature and a generated hyperparameter table for help(); the signature lives on
        # the class because most subclasses share one inherited ``__init__`` function.
        params = [inspect.Parameter("params", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
        params += [inspect.Parameter(p.name, inspect.Parameter.KEYWORD_ONLY, default=p.default)
                   for p in (*cls.schema, *ROUTING_HPARAMS)]
        params += [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, default=None)
                   for n in ("model", "data_parallel_group")]
        cls.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
        if cls.__doc__ and "Hyperparameters:" not in cls.__doc__:
            stages = " → ".join(repr(s) for s in cls.matrix_stages)
            cls.__doc__ = (inspect.cleandoc(cls.__doc__) + (f"\n\nMatrix track: {stages}" if stages else "")
                           + "\n\nHyperparameters:\n" + cls.schema.describe())

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[tuple[str, Tensor]] | Iterable[dict[str, Any]],
        *,
        model: nn.Module | None = None,
        data_parallel_group: Any = None,
        **hyperparameters: Any,
    ) -> None:
        owner = type(self).__name__
        routing = {k: hyperparameters.pop(k) for k in list(hyperparameters) if k in ROUTING_HPARAMS}
        routing = {**ROUTING_HPARAMS.defaults(), **ROUTING_HPARAMS.validate(routing, owner)}
        defaults = self.schema.defaults()
        defaults.update(self.schema.validate(hyperparameters, owner))
        self._check_group(defaults, owner)
        self.router = Router(model, RoutingOptions(**routing))
        self.data_parallel_group = data_parallel_group
        self.sharding: ShardedLayout | None = None  # FSDP2: set when DTensor parameters are added
        self._specs: dict[int, TensorSpec] = {}
        # steps: step() calls that had gradients; skipped: how many of them the gate skipped, counted on
        # the device (read by diagnostics() and state_dict(), never by step())
        self.stats: dict[str, Any] = {"steps": 0, "skipped_steps": 0}
        self._skipped: Tensor | None = None
        self._warned_nonfinite = False
        self._norm_hint: GradientNormHint | None = None  # set by accept_gradient_norm, for one step
        #: the last step's diagnostics: tensors or floats, or callables evaluated when read
        self._last: dict[str, Tensor | float | Callable[[], Tensor | float]] = {}
        super().__init__(_as_groups(params), defaults)
        patterns = [k for k in ("adamw_patterns", "matrix_patterns", "stack_patterns") if routing[k]]
        if patterns and model is None and not any("param_names" in g for g in self.param_groups):
            raise ValueError(f"{owner}: {'/'.join(patterns)} match parameter names, but the tensors came without "
                             "names; pass the model (create_optimizer(name, model)) or model.named_parameters()")
        self.routing_report = self.router.finish()

    # -- construction ---------------------------------------------------------------------------------
    def _check_group(self, hparams: dict[str, Any], owner: str) -> None:
        """Cross-argument checks on a group's resolved hyperparameters (subclasses extend)."""
        if hparams.get("adamw_lr") is not None and hparams["lr"] == 0.0:
            raise ValueError(f"{owner}: adamw_lr is scaled with lr by LR schedulers, so lr must be > 0 with it")

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        owner = type(self).__name__
        group = dict(param_group)
        items = group.pop("params")
        items = [items] if isinstance(items, Tensor) else list(items)
        names = list(group.pop("param_names", [])) or [None] * len(items)
        named = [it for it in items if isinstance(it, tuple)]
        if named and len(named) != len(items):
            raise ValueError(f"{owner}: a param group mixes named (name, tensor) pairs and bare tensors")
        if named:
            names, items = [n for n, _ in items], [p for _, p in items]
        unknown = sorted(k for k in group if k not in GROUP_KEYS and k not in self.schema)
        if unknown:
            raise ValueError(
                f"{owner}: param group key(s) {unknown} are not known; valid keys are the hyperparameters "
                f"{sorted(self.schema.params)} and {sorted(GROUP_KEYS)}"
            )
        for key in self.global_hparams:
            if key in group and group[key] != self.defaults[key]:
                raise ValueError(f"{key} is optimizer-wide in {owner}; set it on the constructor, not per param group")
        given = {k: v for k, v in group.items() if k in self.schema}
        group.update(self.schema.validate(given, owner))
        self._check_group({**self.defaults, **group}, owner)
        for p in items:
            if not isinstance(p, Tensor):
                raise TypeError(f"{owner} params must be tensors, got {type(p).__name__}")
            if torch.is_complex(p):
                raise ValueError(f"{owner} does not support complex parameters (got dtype {p.dtype})")
        self._check_layout(items, owner)
        index = len(self.param_groups)
        labels = [self.router.name_of(p, n, f"group{index}.{i}" if index else f"param{i}")
                  for i, (p, n) in enumerate(zip(items, names))]
        if not named and any("param_names" in g for g in self.param_groups):
            # torch needs all groups named or none: name the new tensors as the report does
            named, names = True, labels
        forced = group.get("track")
        for p, label in zip(items, labels):
            if id(p) in self._specs:
                continue  # torch raises below: a tensor in two groups
            self._specs[id(p)] = self.router.route(p, label, forced_track=forced,
                                                   explicit_weight_decay="weight_decay" in given)
        group["params"] = list(zip(names, items)) if named else items
        super().add_param_group(group)
        if self.sharding is not None:
            # state like the parameters, created now, so that distributed checkpoints see the same
            # keys on every rank (and never need a dummy step to create them)
            for p in items:
                self._create_state(p)
        if hasattr(self, "routing_report"):  # added after construction: refresh the report
            self.routing_report = self.router.finish()

    def _check_layout(self, params: list[Tensor], owner: str) -> None:
        """Accept plain tensors, or FSDP2's DTensors (1-D mesh, ``Shard(0)``) — never a mix."""
        layout = ShardedLayout.of(params, owner)
        if layout is None:
            if self.sharding is not None and params:
                raise ValueError(f"{owner}: plain tensors added to an optimizer of FSDP2 (DTensor) parameters; "
                                 "shard every module with fully_shard, or keep them in another optimizer")
            return
        if self.sharding is None:
            if self.param_groups:
                raise ValueError(f"{owner}: DTensor parameters added to an optimizer of plain tensors; "
                                 "shard the whole model with fully_shard before creating the optimizer")
            self.sharding = layout
        elif not self.sharding.same_mesh(layout):
            raise ValueError(f"{owner}: parameters on different device meshes; one FSDP2 mesh per optimizer")

    def _create_state(self, p: Tensor) -> None:
        """All state tensors the update of ``p`` will use (DTensors like ``p`` under FSDP2)."""
        st = self.state[p]
        keys = ("exp_avg", "exp_avg_sq") if self._specs[id(p)].track == ADAMW else tuple(
            k for stage in self.matrix_stages for k in stage.state_keys)
        for key in keys:
            state_buffer(st, key, p, self._state_dtype(p))
        if "exp_avg" in keys:
            step_count(st, p)

    def spec_of(self, p: Tensor) -> TensorSpec:
        """The routing decision for one parameter of this optimizer."""
        try:
            return self._specs[id(p)]
        except KeyError:
            raise KeyError("tensor is not a parameter of this optimizer") from None

    # -- the step -------------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One update. ``closure`` (optional) re-evaluates the loss and calls backward."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        try:
            self._guarded_update()
        finally:
            self._norm_hint = None
        return loss

    def accept_gradient_norm(self, total_norm: Tensor, parameters: Iterable[Tensor]) -> bool:
        """A hint for the next :meth:`step`: ``total_norm`` is the L2 norm of the gradients of
        ``parameters``, just computed by the caller. A training loop that clips gradients (or logs
        their norm, as ``transformers.Trainer`` does every step) has already made this pass over every
        gradient; when the hint covers exactly the gradients the step will use — the same tensors, not
        modified since (their version counters) — the step's finiteness gate is ``isfinite(total_norm)``
        instead of a second pass. Anything else (other or modified gradients, a non-tensor, non-scalar,
        float16 or other-device norm, FSDP2-sharded optimizers) is ignored and the step computes its own
        gate. Returns whether the hint was recorded; it is valid for the next step only.

        Clipping scales the gradients by ``min(1, c/‖g‖)`` after taking ``‖g‖``: finite ``‖g‖`` keeps
        them finite, and a non-finite one skips the step either way."""
        self._norm_hint = GradientNormHint.record(total_norm, parameters) if self.sharding is None else None
        return self._norm_hint is not None

    def _guarded_update(self) -> None:
        """Apply one update, gated on every gradient being finite (see :meth:`_step_gate`)."""
        gathered = self._gather()
        if not gathered:
            return
        keep = self._step_gate(self._finite_flag(gathered))
        self._update(gathered, keep)

    def _gather(self) -> list[tuple[dict, list[Tensor], list[Tensor]]]:
        """``(group, params, grads)`` for params that have gradients; validates gradient kinds.
        Under FSDP2 the params are the DTensors and the grads their *local* shards."""
        out = []
        for group in self.param_groups:
            params, grads = [], []
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
                params.append(p)
                grads.append(F.local(p.grad))
            if params:
                out.append((group, params, grads))
        return out

    def _finite_flag(self, gathered: list[tuple[dict, list[Tensor], list[Tensor]]]) -> Tensor:
        """Whether every gradient is finite, as a 0-d bool tensor on the device (no host read);
        under FSDP2 over every shard, so all ranks take the same decision. Taken from the gradient-norm
        hint when one covers exactly these gradients (:meth:`accept_gradient_norm`)."""
        hint = self._norm_hint  # cleared when the step ends
        if hint is not None and hint.covers(g for _, _, grads in gathered for g in grads):
            return torch.isfinite(hint.total_norm)
        flag = self._local_finite_flag(gathered)
        if self.sharding is not None:
            flag = self.sharding.all_true(flag)
        return flag

    @staticmethod
    def _local_finite_flag(gathered: list[tuple[dict, list[Tensor], list[Tensor]]]) -> Tensor:
        return F.all_finite([g for _, _, gs in gathered for g in gs])

    def _step_gate(self, finite: Tensor) -> Tensor | None:
        """Apply the ``on_nonfinite`` policy to the device flag ``finite`` and count the step.

        ``"skip"`` (default) decides on the device, without a host read: the returned 0-d bool gate
        makes every state and parameter write of the step a no-op when false (the gradients are
        replaced by zeros first, the moment decays by 1, the update by 0, the decay factor by 1, the
        step counts do not advance). Skipped steps are counted on the device and reported, with a
        warning, when :meth:`diagnostics` or :meth:`state_dict` reads them. ``"raise"`` reads the flag
        (one host synchronisation per step) and raises before anything is written; it returns
        ``None``: no gate."""
        if self.defaults["on_nonfinite"] == "raise":
            if not bool(finite):
                raise FloatingPointError(
                    f"{type(self).__name__}: non-finite gradient (inf/NaN); parameters and state were left "
                    "untouched. Pass on_nonfinite='skip' to skip such steps instead."
                )
            self.stats["steps"] += 1
            return None
        self.stats["steps"] += 1
        if self._skipped is None:
            self._skipped = torch.zeros((), dtype=torch.float32, device=finite.device)
        self._skipped.add_(finite.logical_not())
        return finite

    def _skipped_steps(self) -> int:
        """Skipped steps so far (a host read; warns once when there are any)."""
        skipped = int(self.stats["skipped_steps"]) + (int(self._skipped.item()) if self._skipped is not None else 0)
        if skipped and not self._warned_nonfinite:
            warnings.warn(
                f"{type(self).__name__}: {skipped} step(s) had a non-finite gradient and were skipped for all "
                "parameters (counted in diagnostics()['nonfinite_steps']; warned once)",
                RuntimeWarning,
                stacklevel=3,
            )
            self._warned_nonfinite = True
        return skipped

    def _state_dtype(self, p: Tensor) -> torch.dtype:
        return resolve_dtype(self.defaults["state_dtype"], p)

    def _in_state_dtype(self, params: list[Tensor], grads: list[Tensor]) -> list[Tensor]:
        return [g if g.dtype == self._state_dtype(p) else g.to(self._state_dtype(p)) for p, g in zip(params, grads)]

    def _reduce(self) -> F.Reduce | None:
        """Sums per-shard partial reductions across the FSDP2 mesh (None when not sharded)."""
        return self.sharding.gather_rows if self.sharding is not None else None

    def _update(self, gathered: list[tuple[dict, list[Tensor], list[Tensor]]], keep: Tensor | None) -> None:
        """Both tracks of every group; ``keep``: the step gate (``None``: applied unconditionally)."""
        norms: list[Tensor] = []
        step_sizes: list[float] = []
        numel = 0
        for group, params, grads in gathered:
            tracks: dict[str, tuple[list[Tensor], list[Tensor], list[TensorSpec]]] = {MATRIX: ([], [], []),
                                                                                       ADAMW: ([], [], [])}
            for p, g in zip(params, grads):
                spec = self._specs[id(p)]
                bucket = tracks[spec.track]
                bucket[0].append(p)
                bucket[1].append(g)
                bucket[2].append(spec)
            m_params, m_grads, m_specs = tracks[MATRIX]
            if m_params:
                batch = self._matrix_batch(group, m_params, m_grads, m_specs, keep)
                for stage in self.matrix_stages:
                    stage(batch)
                updates = batch.updates()
                lrs = [group["lr"] * f for f in batch.lr_factors] if batch.lr_factors else [group["lr"]] * len(m_params)
                norms.append(batch.update_norms(updates))
                step_sizes += lrs
                numel += sum(math.prod(s.shape) for s in m_specs)
                F.decay_and_apply_(batch.params, updates, lrs, batch.decay_factors or [1.0] * len(m_params), keep)
            a_params, a_grads, a_specs = tracks[ADAMW]
            if a_params:
                self._adamw_track(group, a_params, a_grads, a_specs, keep)
        if norms:
            energy = torch.cat([n.float() for n in norms])
            self._last["energy"] = energy.mean()
            # ‖lr·U‖ per tensor needs the step sizes on the device: computed only when read
            self._last["update_rms"] = functools.partial(_update_rms, energy, step_sizes, numel)

    def _matrix_batch(self, group: dict, params: list[Tensor], grads: list[Tensor],
                      specs: list[TensorSpec], keep: Tensor | None) -> MatrixBatch:
        return MatrixBatch(group=group, owners=params, params=[F.local(p) for p in params],
                           grads=F.zero_unless(keep, self._in_state_dtype(params, grads)),
                           states=[self.state[p] for p in params], specs=specs,
                           orthogonalize=self._orthogonalizer(group), state_dtype=self._state_dtype,
                           reduce=self._reduce(), keep=keep)

    # -- the AdamW track ------------------------------------------------------------------------------
    @staticmethod
    def adamw_settings(group: dict[str, Any]) -> tuple[float, tuple[float, float], float, float]:
        """``(lr, betas, eps, weight_decay)`` of the AdamW track of ``group``.

        ``adamw_lr`` follows LR schedulers: it is scaled by ``lr/initial_lr`` (schedulers record
        ``initial_lr``), so a per-group schedule drives both tracks."""
        lr = group["lr"]
        if group["adamw_lr"] is not None:
            initial = group.get("initial_lr")
            lr = group["adamw_lr"] * (lr / initial if initial else 1.0)
        return (
            lr,
            tuple(group["adamw_betas"]) if group["adamw_betas"] is not None else tuple(group["betas"]),
            group["adamw_eps"] if group["adamw_eps"] is not None else group["eps"],
            group["adamw_weight_decay"] if group["adamw_weight_decay"] is not None else group["weight_decay"],
        )

    def _adamw_track(self, group: dict, params: list[Tensor], grads: list[Tensor], specs: list[TensorSpec],
                     keep: Tensor | None) -> None:
        """Standard AdamW with bias correction and decoupled weight decay: on torch's fused AdamW kernel
        where it applies (plain tensors whose gradient and moments share the parameter's dtype, a device
        with the kernel: :func:`~hf_rmsuon.functional.fused_adamw_applicable`), else foreach."""
        lr, adam_betas, adam_eps, wd = self.adamw_settings(group)
        states = [self.state[p] for p in params]
        values = [F.local(p) for p in params]  # local shards under FSDP2: the kernel runs on those
        exp_avgs = [state_buffer(st, "exp_avg", p, self._state_dtype(p)) for p, st in zip(params, states)]
        exp_avg_sqs = [state_buffer(st, "exp_avg_sq", p, self._state_dtype(p)) for p, st in zip(params, states)]
        if F.fused_adamw_applicable(values, grads, exp_avgs, exp_avg_sqs, adam_betas):
            # the kernel takes the gate as found_inf: no sanitised copy of the gradients needed
            F.fused_adamw_(values, grads, exp_avgs, exp_avg_sqs, [step_count(st, p) for p, st in zip(params, states)],
                           lr, adam_betas, adam_eps, [wd if s.decay else 0.0 for s in specs], keep)
            return
        exp_avgs, denoms, bias_corrections1 = advance_adam_moments(
            F.zero_unless(keep, self._in_state_dtype(params, grads)), states, adam_betas, adam_eps,
            self._state_dtype, params, keep)
        if keep is not None:  # a skipped step divides the (finite) m/(√v̂+ε) by ∞: U = 0, no extra pass
            bias_corrections1 = torch.where(keep, bias_corrections1, torch.inf)
        updates = F.whiten(exp_avgs, denoms, bias_corrections1)
        decay = [1.0 - lr * wd if s.decay else 1.0 for s in specs]
        F.decay_and_apply_(values, updates, [lr] * len(params), decay, keep)

    # -- orthogonalization ----------------------------------------------------------------------------
    def _orthogonalizer(self, group: dict) -> OrthogonalizeFn:
        """``(inputs, views, shapes, input_norms) → (NS(inputs), ‖inputs‖ or None, ‖NS(inputs)‖)`` with the
        group's settings: whole
        matrices here; under FSDP2 each matrix is gathered on one owner rank, which computes all three;
        under DDP (a data-parallel group) each rank computes a share."""
        dtype = None if group["ns_dtype"] == "auto" else getattr(torch, group["ns_dtype"])
        kernel = F.compiled_newton_schulz() if self.defaults["compile"] else F.newton_schulz
        orthogonalize = functools.partial(F.orthogonalize, steps=group["ns_steps"],
                                          coefficients=tuple(group["ns_coefficients"]), dtype=dtype, kernel=kernel)
        if self.sharding is not None:
            return functools.partial(sharded_orthogonalize, orthogonalize=orthogonalize, layout=self.sharding)
        if self.defaults["split_ns"] and self.data_parallel_group is not None:
            orthogonalize = functools.partial(split_orthogonalize, orthogonalize=orthogonalize,
                                              group=self.data_parallel_group)

        def with_norms(inputs: list[Tensor], views: list[str], shapes: Any,
                       input_norms: bool) -> tuple[list[Tensor], Tensor | None, Tensor]:
            ortho = orthogonalize(inputs, views)
            return ortho, F.whole_norms(inputs) if input_norms else None, F.whole_norms(ortho)

        return with_norms

    # -- diagnostics and state ------------------------------------------------------------------------
    def diagnostics(self) -> dict[str, float]:
        """Scalars describing the last step (read from the device here, not in ``step``)."""
        skipped = self._skipped_steps()
        out: dict[str, float] = {
            "optimizer_steps": float(self.stats["steps"] - skipped),
            "nonfinite_steps": float(skipped),
        }
        for key, value in self._last.items():
            value = value() if callable(value) else value
            out[key] = float(value.item()) if isinstance(value, Tensor) else float(value)
        return {k: v for k, v in out.items() if not math.isnan(v) or k in ("phi", "surrogate_gap")}

    def state_dict(self) -> dict[str, Any]:
        """As torch's, with the optimizer-wide family state (step counts, SAM/AGA/ASI state) inside the
        first param group under ``"family"``: distributed checkpoints (``get_optimizer_state_dict``)
        keep only ``state`` and ``param_groups``, so a top-level key would be lost there."""
        sd = super().state_dict()
        if sd["param_groups"]:
            stats = {**self.stats, "skipped_steps": self._skipped_steps()}
            sd["param_groups"][0] = {**sd["param_groups"][0], "family": {"stats": stats, **self._extra_state()}}
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """As torch's, except that state tensors keep their saved dtype (torch casts floating state to
        the parameter's dtype, which would round float32 moments of bf16 parameters to bf16)."""
        state_dict = dict(state_dict)
        family = state_dict.pop("family", None)  # (checkpoints written before it moved into the groups)
        groups = [dict(g) for g in state_dict["param_groups"]]
        for g in groups:
            family = g.pop("family", family)
        state_dict["param_groups"] = groups
        saved_state = state_dict.pop("state", {})
        super().load_state_dict({**state_dict, "state": {}})  # groups: validation, hooks, param_names
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        by_id = dict(zip(saved_ids, params))
        for key, entries in saved_state.items():
            p = by_id[key]
            self.state[p] = {k: v.detach().to(F.local(p).device, copy=True) if isinstance(v, Tensor) else v
                             for k, v in entries.items()}
            if "step" in entries:  # a device tensor, as the step kernels advance it (older checkpoints: a number)
                self.state[p]["step"] = torch.as_tensor(entries["step"], dtype=torch.float32).to(
                    F.local(p).device, copy=True)
        if family is not None:
            self.stats.update(family.get("stats", {}))
            self._skipped = None  # the loaded count is in stats
            self._load_extra_state(family)

    def _extra_state(self) -> dict[str, Any]:
        """Optimizer-wide state beyond per-parameter tensors (subclasses)."""
        return {}

    def _load_extra_state(self, family: dict[str, Any]) -> None:
        pass


class GradientNormHint:
    """``‖g‖`` of a set of gradients, with each gradient's identity and version counter at the time:
    an in-place change since (or other tensors) makes it not apply."""

    __slots__ = ("total_norm", "versions")

    def __init__(self, total_norm: Tensor, versions: dict[int, int]) -> None:
        self.total_norm = total_norm
        self.versions = versions

    @classmethod
    def record(cls, total_norm: Any, parameters: Iterable[Tensor]) -> GradientNormHint | None:
        # float16 norms overflow at 65504 for finite gradients; DTensor norms may be partial (per rank)
        if (not isinstance(total_norm, Tensor) or total_norm.numel() != 1 or F.local(total_norm) is not total_norm
                or total_norm.dtype not in (torch.float32, torch.float64, torch.bfloat16)):
            return None
        versions = {}
        for p in parameters:
            if p.grad is not None:
                g = F.local(p.grad)
                if g.device != total_norm.device:  # the gate must live with the gradients (no copies)
                    return None
                versions[id(g)] = g._version
        return cls(total_norm.detach().reshape(()), versions)

    def covers(self, grads: Iterable[Tensor]) -> bool:
        """Whether the recorded gradients are exactly ``grads``, unchanged."""
        seen = 0
        for g in grads:
            if self.versions.get(id(g)) != g._version:
                return False
            seen += 1
        return seen == len(self.versions)


def _update_rms(energies: Tensor, step_sizes: list[float], numel: int) -> Tensor:
    """RMS of the applied update ``lr·U`` over all matrix-track values (diagnostics, when read)."""
    moved = energies * torch.tensor(step_sizes, dtype=energies.dtype).to(energies.device)
    return moved.square().sum().div(numel).sqrt()


def _as_groups(params: Any) -> list[dict[str, Any]]:
    """Normalise what torch optimizers accept (a tensor, tensors, ``(name, tensor)`` pairs, groups)."""
    if isinstance(params, Tensor):
        return [{"params": [params]}]
    items = list(params)
    if not items:
        raise ValueError("optimizer got an empty parameter list")
    if isinstance(items[0], dict):
        return [dict(g) for g in items]
    return [{"params": items}]


__all__ = [
    "ADAMW",
    "COMMON_HPARAMS",
    "MATRIX",
    "ROUTING_HPARAMS",
    "FamilyOptimizer",
    "HyperParam",
    "Schema",
    "beta",
    "betas",
]
