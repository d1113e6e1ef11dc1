"""The shared skeleton of every family optimizer: two tracks, validation, the AdamW track,
non-finite guarding, diagnostics and the optimizer-wide state that ``state_dict`` carries.

A subclass supplies only its *matrix-track rule* (:meth:`FamilyOptimizer._matrix_updates`) and its
hyperparameter schema; everything else is here, once.
"""

from __future__ import annotations

import functools
import inspect
import math
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

from .. import functional as F
from .distributed import data_parallel_world, split_orthogonalize
from .hparams import HyperParam, Schema, beta, betas, choice, eps, flag, integer, nonneg

MATRIX = "matrix"
ADAMW = "adamw"
TRACKS = (MATRIX, ADAMW)

#: Seeds' shape rule, used when only tensors are given: matrix track iff ndim ≥ 2 and max(shape) < 10000.
SHAPE_RULE_MAX_DIM = 10000

COMMON_HPARAMS = (
    nonneg("lr", 1e-3, "learning rate (both tracks)"),
    betas("betas", (0.9, 0.999), "Adam moment decay rates (β1, β2)"),
    eps("eps", 1e-8, "Adam denominator ε"),
    nonneg("weight_decay", 0.01, "decoupled weight decay: p ← p·(1 − lr·wd)"),
    integer("ns_steps", 5, "Newton–Schulz iterations", minimum=1),
    HyperParam("ns_coefficients", "floats3", F.NS_COEFFICIENTS, "quintic Newton–Schulz coefficients (a, b, c)"),
    choice("ns_dtype", "auto", ("auto", "bfloat16", "float32"), "Newton–Schulz compute dtype (auto: per device)"),
    choice("on_nonfinite", "skip", ("skip", "raise"), "non-finite gradient: skip the whole step, or raise"),
    flag("split_ns", True, "under torch.distributed, each rank orthogonalizes a share and results are gathered"),
    flag("compile", False, "torch.compile the Newton–Schulz kernel (off by default)"),
)


def shape_rule_track(p: Tensor) -> str:
    """The seeds' fallback rule for bare tensors."""
    return MATRIX if p.ndim >= 2 and max(p.shape) < SHAPE_RULE_MAX_DIM else ADAMW


class FamilyOptimizer(torch.optim.Optimizer):
    """Base class: a matrix track (subclass rule) and an AdamW track, in one ``torch.optim.Optimizer``.

    Param groups carry a ``"track"`` key (``"matrix"`` or ``"adamw"``). Groups given without one are
    split by the seeds' shape rule; :func:`hf_rmsuon.create_optimizer` routes model-aware instead.
    """

    #: registry name (``--optim`` value)
    name: str = ""
    schema: Schema = Schema(COMMON_HPARAMS)
    #: whether the matrix track gets ``p ← p·(1 − lr·wd)`` (False for natural weight decay)
    decoupled_matrix_decay: bool = True

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # Give each class an honest signature and a generated hyperparameter table for help().
        # The signature lives on the class: most subclasses share one inherited ``__init__`` function,
        # so a signature stored on it would be overwritten by whichever subclass is defined last.
        params = [inspect.Parameter("params", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
        params += [inspect.Parameter(p.name, inspect.Parameter.KEYWORD_ONLY, default=p.default) for p in cls.schema]
        cls.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
        if cls.__doc__ and "Hyperparameters:" not in cls.__doc__:
            cls.__doc__ = inspect.cleandoc(cls.__doc__) + "\n\nHyperparameters:\n" + cls.schema.describe()

    def __init__(self, params: Iterable[Tensor] | Iterable[dict[str, Any]], **hyperparameters: Any) -> None:
        owner = type(self).__name__
        defaults = self.schema.defaults()
        defaults.update(self.schema.validate(hyperparameters, owner))
        self._check_defaults(defaults)
        self.stats: dict[str, Any] = {"steps": 0, "skipped_steps": 0}
        self._warned_nonfinite = False
        self._last: dict[str, Tensor | float] = {}
        super().__init__(params, defaults)

    # -- construction ---------------------------------------------------------------------------------
    def _check_defaults(self, defaults: dict[str, Any]) -> None:
        """Hook for cross-argument checks (subclasses)."""

    #: hyperparameters that define one optimizer-wide computation and so cannot differ per group
    global_hparams: tuple[str, ...] = ("on_nonfinite", "split_ns", "compile")

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        owner = type(self).__name__
        group = dict(param_group)
        params = group["params"]
        params = [params] if isinstance(params, Tensor) else list(params)
        extra = {k: v for k, v in group.items() if k not in ("params", "track", "name", "names")}
        for key in self.global_hparams:
            if key in extra and extra[key] != self.defaults[key]:
                raise ValueError(
                    f"{key} is optimizer-wide in {owner}; set it on the constructor, not per param group"
                )
        group.update(self.schema.validate({k: v for k, v in extra.items() if k in self.schema}, owner))
        for p in params:
            if not isinstance(p, Tensor):
                raise TypeError(f"{owner} params must be tensors, got {type(p).__name__}")
            if torch.is_complex(p):
                raise ValueError(f"{owner} does not support complex parameters (got dtype {p.dtype})")
        track = group.get("track")
        if track is None:
            # Split by the shape rule, preserving the group's other settings.
            by_track: dict[str, list[Tensor]] = {MATRIX: [], ADAMW: []}
            for p in params:
                by_track[shape_rule_track(p)].append(p)
            for tr, ps in by_track.items():
                if ps:
                    super().add_param_group({**{k: v for k, v in group.items() if k != "names"},
                                             "params": ps, "track": tr})
            return
        if track not in TRACKS:
            raise ValueError(f"param group track={track!r} is not valid; use 'matrix' or 'adamw'")
        if track == MATRIX:
            for p in params:
                if p.ndim < 2:
                    raise ValueError(
                        f"{owner}: a {p.ndim}-D parameter of shape {tuple(p.shape)} was put on the matrix "
                        "track; only tensors with ndim >= 2 can be orthogonalized — route it to 'adamw'"
                    )
        group["params"] = params
        super().add_param_group(group)

    # -- the step -------------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One update. ``closure`` (optional) re-evaluates the loss and calls backward."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._guarded_update()
        return loss

    def _guarded_update(self) -> bool:
        """Apply one update unless a gradient is non-finite. Returns whether the update ran."""
        gathered = self._gather()
        if not self._grads_finite(gathered):
            return False
        self.stats["steps"] += 1
        self._update(gathered)
        return True

    def _gather(self) -> list[tuple[dict, list[Tensor], list[Tensor]]]:
        """``(group, params, grads)`` for params that have gradients; validates gradient kinds."""
        out = []
        for group in self.param_groups:
            params, grads = [], []
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
                params.append(p)
                grads.append(p.grad)
            if params:
                out.append((group, params, grads))
        return out

    def _grads_finite(self, gathered: list[tuple[dict, list[Tensor], list[Tensor]]]) -> bool:
        """One device reduction and one host read for the whole step."""
        return self._accept_gradients(bool(self._finite_flag(gathered)))

    @staticmethod
    def _finite_flag(gathered: list[tuple[dict, list[Tensor], list[Tensor]]]) -> Tensor:
        """Whether every gradient is finite, as a 0-d bool tensor on the device (no host read)."""
        grads = [g for _, _, gs in gathered for g in gs]
        if not grads:
            return torch.tensor(True)
        # An L2 norm accumulated in float32 propagates inf/NaN and is the cheapest full reduction
        # (≈10× faster than an inf-norm on CPU). It overflows only for |g| ≳ 1e19, which is treated
        # as non-finite too — such a gradient is broken anyway.
        low = [g for g in grads if g.dtype in (torch.float16, torch.bfloat16)]
        full = [g for g in grads if g.dtype not in (torch.float16, torch.bfloat16)]
        norms = list(torch._foreach_norm(full)) if full else []
        if low:
            norms += torch._foreach_norm(low, 2, dtype=torch.float32)
        return torch.isfinite(torch.stack([n.float() for n in norms])).all()

    def _accept_gradients(self, finite: bool) -> bool:
        """Apply the ``on_nonfinite`` policy: True to go on with the step."""
        if finite:
            return True
        if self.defaults["on_nonfinite"] == "raise":
            raise FloatingPointError(
                f"{type(self).__name__}: non-finite gradient (inf/NaN); parameters and state were left "
                "untouched. Pass on_nonfinite='skip' to skip such steps instead."
            )
        self.stats["skipped_steps"] += 1
        if not self._warned_nonfinite:
            warnings.warn(
                f"{type(self).__name__}: non-finite gradient — skipping this step for all parameters "
                "(counted in diagnostics()['nonfinite_steps']; warned once)",
                RuntimeWarning,
                stacklevel=3,
            )
            self._warned_nonfinite = True
        return False

    def _update(self, gathered: list[tuple[dict, list[Tensor], list[Tensor]]]) -> None:
        norms: list[Tensor] = []
        step_sizes: list[float] = []
        numel = 0
        for group, params, grads in gathered:
            states = [self.state[p] for p in params]
            if group["track"] == MATRIX:
                updates, lrs = self._matrix_updates(group, params, grads, states)
                lrs = lrs if isinstance(lrs, list) else [lrs] * len(params)
                norms += F.frobenius_norms(updates)  # before apply: the updates may be scaled in place
                step_sizes += lrs
                numel += sum(p.numel() for p in params)
                if self.decoupled_matrix_decay:
                    F.decoupled_decay_(params, group["lr"], group["weight_decay"])
                F.apply_updates_(params, updates, lrs)
            else:
                self._adamw_track(group, params, grads, states)
        if norms:
            # a handful of whole-list kernels; read on the host only by diagnostics()
            energy = torch.stack(norms)
            self._last["energy"] = energy.mean()
            moved = energy * torch.tensor(step_sizes, dtype=energy.dtype, device=energy.device)
            self._last["update_rms"] = moved.square().sum().div(numel).sqrt()

    # -- tracks -----------------------------------------------------------------------------------------
    def _matrix_updates(
        self, group: dict, params: list[Tensor], grads: list[Tensor], states: list[dict]
    ) -> tuple[list[Tensor], float | list[float]]:
        """The matrix-track rule: return ``U`` per parameter and the learning rate(s) to apply."""
        raise NotImplementedError

    @staticmethod
    def _adam_moments(
        group: dict, params: list[Tensor], grads: list[Tensor], states: list[dict]
    ) -> tuple[list[Tensor], list[Tensor], int]:
        """Advance ``m, v`` and the step count; return ``(m list, √v̂+ε list, t)``.

        Params of a group advance together, so they share ``t`` (a param that first gets a gradient
        later starts its own count; the group's maximum is only used for groups in lock-step).
        """
        beta1, beta2 = group["betas"]
        for p, st in zip(params, states):
            if "exp_avg" not in st:
                st["step"] = 0
                st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            st["step"] += 1
        exp_avgs = [st["exp_avg"] for st in states]
        exp_avg_sqs = [st["exp_avg_sq"] for st in states]
        F.update_moments_(exp_avgs, exp_avg_sqs, grads, beta1, beta2)
        steps = {st["step"] for st in states}
        if len(steps) == 1:
            t = steps.pop()
            _, bc2 = F.bias_corrections(t, beta1, beta2)
            return exp_avgs, F.rms_denominators(exp_avg_sqs, bc2, group["eps"]), t
        # Mixed step counts (rare: params that started receiving gradients late): per tensor.
        denoms = [F.rms_denominators([v], F.bias_corrections(st["step"], beta1, beta2)[1], group["eps"])[0]
                  for v, st in zip(exp_avg_sqs, states)]
        return exp_avgs, denoms, -1

    @staticmethod
    def _whitened(group: dict, exp_avgs: list[Tensor], denoms: list[Tensor], t: int,
                  states: list[dict]) -> list[Tensor]:
        """``m̂/(√v̂+ε)`` honouring per-tensor step counts."""
        beta1 = group["betas"][0]
        if t > 0:
            return F.whiten(exp_avgs, denoms, F.bias_corrections(t, beta1, 0.0)[0])
        return [F.whiten([m], [d], 1.0 - beta1 ** st["step"])[0] for m, d, st in zip(exp_avgs, denoms, states)]

    def _adamw_track(self, group: dict, params: list[Tensor], grads: list[Tensor], states: list[dict]) -> None:
        """Standard AdamW with bias correction and decoupled weight decay."""
        exp_avgs, denoms, t = self._adam_moments(group, params, grads, states)
        updates = self._whitened(group, exp_avgs, denoms, t, states)
        F.decoupled_decay_(params, group["lr"], group["weight_decay"])
        F.apply_updates_(params, updates, group["lr"])

    def _ns(self, group: dict, tensors: list[Tensor]) -> list[Tensor]:
        """Orthogonalize the group's matrices (batched by shape; split across DDP ranks if enabled)."""
        dtype = None if group["ns_dtype"] == "auto" else getattr(torch, group["ns_dtype"])
        kernel = F.compiled_newton_schulz() if self.defaults["compile"] else F.newton_schulz
        orthogonalize = functools.partial(F.orthogonalize, steps=group["ns_steps"],
                                          coefficients=tuple(group["ns_coefficients"]), dtype=dtype, kernel=kernel)
        if self.defaults["split_ns"] and data_parallel_world() > 1:
            return split_orthogonalize(tensors, orthogonalize)
        return orthogonalize(tensors)

    # -- diagnostics and state ------------------------------------------------------------------------
    def diagnostics(self) -> dict[str, float]:
        """Scalars describing the last step (read from the device here, not in ``step``)."""
        out: dict[str, float] = {
            "optimizer_steps": float(self.stats["steps"]),
            "nonfinite_steps": float(self.stats["skipped_steps"]),
        }
        for key, value in self._last.items():
            out[key] = float(value.item()) if isinstance(value, Tensor) else float(value)
        return {k: v for k, v in out.items() if not math.isnan(v) or k in ("phi", "surrogate_gap")}

    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        sd["family"] = {"stats": dict(self.stats), **self._extra_state()}
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        family = state_dict.pop("family", None)
        super().load_state_dict(state_dict)
        if family is not None:
            self.stats.update(family.get("stats", {}))
            self._load_extra_state(family)

    def _extra_state(self) -> dict[str, Any]:
        """Optimizer-wide state beyond per-parameter tensors (subclasses)."""
        return {}

    def _load_extra_state(self, family: dict[str, Any]) -> None:
        pass


__all__ = [
    "ADAMW",
    "COMMON_HPARAMS",
    "MATRIX",
    "FamilyOptimizer",
    "HyperParam",
    "Schema",
    "beta",
    "betas",
    "shape_rule_track",
]
