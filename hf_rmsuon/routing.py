"""Parameter routing: one :class:`TensorSpec` per tensor, decided once, used by every path.

A spec says which *track* a tensor is on (``matrix``: orthogonalized; ``adamw``: AdamW), through which
*matrix view* it is orthogonalized, whether weight decay applies to it, and why. The optimizers call
:meth:`Router.route` for every tensor they are given — from a model, ``named_parameters()``, bare
tensors, param groups or ``add_param_group`` — so there is exactly one routing decision per tensor.

Routing is model-aware when a model is known (module types, ``get_input_embeddings()``,
``get_output_embeddings()``, PEFT adapter names) and falls back to the seeds' shape rule otherwise.
Every decision is recorded with its reason in a :class:`RoutingReport`; guesses are flagged.

Matrix views (``TensorSpec.view``):

* ``matrix`` — a 2-D weight, as it is;
* ``flatten`` — ``(out, in·∏kernel)``: convolution weights (Conv1d/2d/3d) and any other ≥3-D tensor
  not declared a stack;
* ``stack`` — a stack of matrices over the last two dims, orthogonalized per slice: fused per-head or
  per-expert weights, declared by module type (``*Experts`` modules, e.g. transformers' MoE experts) or
  by ``stack_patterns``; with bare tensors, the seeds' (and research code's) rule for 3-D tensors.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field

from torch import Tensor, nn

from .functional import VIEW_FLATTEN, VIEW_MATRIX, VIEW_NONE, VIEW_STACK, matrix_shape

MATRIX = "matrix"
ADAMW = "adamw"
TRACKS = (MATRIX, ADAMW)


#: Seeds' shape rule, used when no module tells: matrix track iff ndim ≥ 2 and max(shape) < 10000.
SHAPE_RULE_MAX_DIM = 10000
LORA_POLICIES = ("both", "B", "none")

_LORA_FACTOR = re.compile(r"(?:^|\.)lora_(A|B)(?:\.|$)")
_LORA_EMBEDDING_FACTOR = re.compile(r"(?:^|\.)lora_embedding_(A|B)(?:\.|$)")
_PEFT_WRAPPER_SUFFIX = re.compile(r"\.(modules_to_save\.[^.]+|original_module|base_layer)$")
#: Module classes whose direct ≥3-D parameters are stacks of matrices (transformers' fused MoE experts).
STACK_MODULE_CLASS = re.compile(r"Experts$")


# --------------------------------------------------------------------------------------------------
# Specs and the report
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TensorSpec:
    """Everything the update needs to know about one tensor besides its values."""

    name: str
    shape: tuple[int, ...]
    track: str
    view: str  # VIEW_* (VIEW_NONE on the AdamW track)
    decay: bool  # whether the group's weight decay applies
    reason: str
    flagged: bool = False  # a guess the user should look at

    @property
    def matrix_shape(self) -> tuple[int, int]:
        return matrix_shape(self.shape, self.view)

    @property
    def view_doc(self) -> str:
        if self.track != MATRIX:
            return VIEW_NONE
        rows, cols = self.matrix_shape
        if self.view == VIEW_STACK:
            return f"{math.prod(self.shape[:-2])}×({rows}, {cols})"
        return f"({rows}, {cols})"


@dataclass
class RoutingReport:
    """Which tensor went where, through which view, and why. ``print(report)`` gives a table."""

    entries: list[TensorSpec] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def track_of(self, name: str) -> str:
        return self.spec_of(name).track

    def spec_of(self, name: str) -> TensorSpec:
        for e in self.entries:
            if e.name == name:
                return e
        raise KeyError(name)

    def counts(self) -> dict[str, dict[str, int]]:
        out = {MATRIX: {"tensors": 0, "numel": 0}, ADAMW: {"tensors": 0, "numel": 0}}
        for e in self.entries:
            out[e.track]["tensors"] += 1
            out[e.track]["numel"] += math.prod(e.shape)
        return out

    def summary(self) -> str:
        """One line: counts per track and how many entries need a look."""
        c = self.counts()
        flagged = sum(e.flagged for e in self.entries)
        line = (f"matrix track: {c[MATRIX]['tensors']} tensors, {c[MATRIX]['numel']:,} values; "
                f"adamw track: {c[ADAMW]['tensors']} tensors, {c[ADAMW]['numel']:,} values")
        return line + (f"; {flagged} flagged" if flagged else "")

    def __str__(self) -> str:
        width = max((len(e.name) for e in self.entries), default=9)
        lines = [f"{'parameter':<{width}}  {'shape':<18} {'track':<7} {'view':<16} reason"]
        for e in self.entries:
            mark = "  <-- check" if e.flagged else ""
            decay = "" if e.decay else " (no decay)"
            lines.append(f"{e.name:<{width}}  {e.shape!s:<18} {e.track:<7} {e.view_doc:<16} {e.reason}{decay}{mark}")
        lines.append(self.summary())
        lines += [f"warning: {w}" for w in self.warnings]
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# The router
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RoutingOptions:
    """User options of routing (all ``--optim_args`` keys)."""

    lora_policy: str = "both"
    adamw_patterns: tuple[str, ...] = ()
    matrix_patterns: tuple[str, ...] = ()
    stack_patterns: tuple[str, ...] = ()
    no_decay_1d: bool = True

    def __post_init__(self) -> None:
        for key in ("adamw_patterns", "matrix_patterns", "stack_patterns"):  # "a:b" or a list → a tuple
            value = getattr(self, key)
            object.__setattr__(self, key, tuple(value.split(":")) if isinstance(value, str) else tuple(value))
        if self.lora_policy not in LORA_POLICIES:
            raise ValueError(f"lora_policy={self.lora_policy!r} is not valid; choose one of {list(LORA_POLICIES)}")
        for key in ("adamw_patterns", "matrix_patterns", "stack_patterns"):
            for pattern in getattr(self, key):
                try:
                    re.compile(pattern)
                except re.error as err:
                    raise ValueError(f"{key}: {pattern!r} is not a valid regular expression ({err})") from None


def _module_param_names(model: nn.Module, module: nn.Module | None) -> set[str]:
    if module is None:
        return set()
    ids = {id(p) for p in module.parameters()}
    return {n for n, p in model.named_parameters() if id(p) in ids}


def _owner_module(name: str) -> str:
    """Module path of a parameter with PEFT wrapper segments stripped, so that ``modules_to_save`` /
    ``original_module`` copies of a head or embedding map to the module they copy."""
    base = name.rsplit(".", 1)[0] if "." in name else name
    return _PEFT_WRAPPER_SUFFIX.sub("", base)


class Router:
    """Routes tensors to specs. Model-aware when constructed with a model; the shape rule otherwise.

    Rules, first match wins: ``track`` forced by the param group → user patterns (``adamw_patterns`` /
    ``matrix_patterns``, regexes searched in the name) → ndim < 2 → embeddings (input, output head,
    tied, ``nn.Embedding``, LoRA embedding factors, PEFT ``modules_to_save`` copies) → LoRA factors per
    ``lora_policy`` → Linear / Conv / stacked-expert weights → the shape rule (flagged when a model
    was given but no module explained the tensor).
    """

    def __init__(self, model: nn.Module | None = None, options: RoutingOptions | None = None) -> None:
        self.model = model
        self.options = options or RoutingOptions()
        self._adamw_re = [re.compile(p) for p in self.options.adamw_patterns]
        self._matrix_re = [re.compile(p) for p in self.options.matrix_patterns]
        self._stack_re = [re.compile(p) for p in self.options.stack_patterns]
        self.used_patterns: set[str] = set()
        self.report = RoutingReport()
        self._names: dict[int, str] = {}
        self._layer_kind: dict[int, str] = {}  # id(weight) → "Linear" | "Conv2d" | "stack:<module class>"
        self._embedding_names: tuple[set[str], set[str], set[str]] = (set(), set(), set())
        self._head_modules: set[str] = set()
        if model is not None:
            self._learn(model)

    def _learn(self, model: nn.Module) -> None:
        self._names = {}
        for name, p in model.named_parameters(remove_duplicate=False):
            self._names.setdefault(id(p), name)
        for module in model.modules():
            weight = getattr(module, "weight", None)
            if isinstance(module, nn.Linear) and isinstance(weight, Tensor):
                self._layer_kind[id(weight)] = "Linear"
            elif isinstance(module, nn.modules.conv._ConvNd) and isinstance(weight, Tensor):
                cls = type(module).__name__
                self._layer_kind[id(weight)] = cls if cls.startswith("Conv") else f"Conv{weight.ndim - 2}d-like {cls}"
            elif type(module).__name__ == "Conv1D" and isinstance(weight, Tensor) and weight.ndim == 2:
                self._layer_kind[id(weight)] = "Linear-like Conv1D"  # transformers' GPT-2 layer: a transposed Linear
            if STACK_MODULE_CLASS.search(type(module).__name__):
                for p in module.parameters(recurse=False):
                    if p.ndim >= 3:
                        self._layer_kind[id(p)] = f"stack:{type(module).__name__}"
        inputs: set[str] = set()
        outputs: set[str] = set()
        for getter, target in (("get_input_embeddings", inputs), ("get_output_embeddings", outputs)):
            fn = getattr(model, getter, None)
            if callable(fn):
                try:
                    target |= _module_param_names(model, fn())
                except (NotImplementedError, AttributeError):
                    pass
        others: set[str] = set()
        for mod_name, module in model.named_modules():
            if isinstance(module, nn.Embedding | nn.EmbeddingBag):
                prefix = f"{mod_name}." if mod_name else ""
                others |= {prefix + n for n, _ in module.named_parameters(recurse=False)}
        self._embedding_names = (inputs, outputs, others)
        self._head_modules = {_owner_module(n) for n in inputs | outputs | others}

    # -- routing -----------------------------------------------------------------------------------
    def name_of(self, p: Tensor, given: str | None, fallback: str) -> str:
        return given or self._names.get(id(p)) or fallback

    def route(self, p: Tensor, name: str, *, forced_track: str | None = None,
              explicit_weight_decay: bool = False) -> TensorSpec:
        """The spec of one tensor; recorded in :attr:`report`."""
        track, reason, flagged = self._decide(p, name, forced_track)
        if track == MATRIX and p.ndim < 2:
            raise ValueError(
                f"{name!r} (shape {tuple(p.shape)}) was put on the matrix track by {reason}; only tensors "
                "with ndim >= 2 can be orthogonalized — route it to the AdamW track"
            )
        view, view_reason, view_flagged = self._view(p, name) if track == MATRIX else (VIEW_NONE, "", False)
        decay = explicit_weight_decay or p.ndim >= 2 or not self.options.no_decay_1d
        spec = TensorSpec(name, tuple(p.shape), track, view, decay, reason + view_reason, flagged or view_flagged)
        self.report.entries.append(spec)
        return spec

    def _decide(self, p: Tensor, name: str, forced_track: str | None) -> tuple[str, str, bool]:
        if forced_track is not None:
            if forced_track not in TRACKS:
                raise ValueError(f"param group track={forced_track!r} is not valid; use 'matrix' or 'adamw'")
            return forced_track, "param group's track", False
        for regexes, track in ((self._adamw_re, ADAMW), (self._matrix_re, MATRIX)):
            for rx in regexes:
                if rx.search(name):
                    self.used_patterns.add(rx.pattern)
                    return track, f"user pattern {rx.pattern!r}", False
        if p.ndim < 2:
            return ADAMW, "ndim < 2 (bias, norm, scale, DoRA magnitude)", False
        inputs, outputs, embeddings = self._embedding_names
        if _LORA_EMBEDDING_FACTOR.search(name):
            return ADAMW, "LoRA embedding factor", False
        if name in inputs:
            return ADAMW, "input embedding" + (" (tied to output head)" if name in outputs else ""), False
        if name in outputs:
            return ADAMW, "output head", False
        if name in embeddings:
            return ADAMW, "embedding", False
        if self.model is not None and _owner_module(name) in self._head_modules:
            return ADAMW, "PEFT copy of an embedding/head (modules_to_save)", False
        lora = _LORA_FACTOR.search(name)
        if lora:
            factor = lora.group(1)
            on_matrix = self.options.lora_policy == "both" or (self.options.lora_policy == "B" and factor == "B")
            return (MATRIX if on_matrix else ADAMW), f"LoRA {factor} factor (lora_policy={self.options.lora_policy})", False
        for rx in self._stack_re:
            if rx.search(name):  # a declared stack of matrices: the matrix track (view chosen below)
                return MATRIX, "declared stack", False
        kind = self._layer_kind.get(id(p))
        if kind is not None:
            return MATRIX, (f"stacked weights of {kind[6:]}" if kind.startswith("stack:") else f"{kind} weight"), False
        on_matrix = max(p.shape) < SHAPE_RULE_MAX_DIM
        track = MATRIX if on_matrix else ADAMW
        reason = f"shape rule (ndim {p.ndim}, max dim {'<' if on_matrix else '>='} {SHAPE_RULE_MAX_DIM})"
        # With a model, no module explained this tensor: a guess. Bare tensors have only the shape rule.
        return track, reason, self.model is not None

    def _view(self, p: Tensor, name: str) -> tuple[str, str, bool]:
        if p.ndim == 2:
            return VIEW_MATRIX, "", False
        for rx in self._stack_re:
            if rx.search(name):
                self.used_patterns.add(rx.pattern)
                return VIEW_STACK, f"; per-slice stack (stack_patterns {rx.pattern!r})", False
        kind = self._layer_kind.get(id(p), "")
        if kind.startswith("stack:"):
            return VIEW_STACK, "", False
        if kind.startswith("Conv"):
            return VIEW_FLATTEN, "", False
        if self.model is None and p.ndim == 3:
            # The seeds' shape rule (and the research code's batched Newton–Schulz) treat a bare 3-D
            # tensor as a stack; a Conv1d weight passed without its model cannot be told apart.
            return VIEW_STACK, "; 3-D: per-slice stack (pass the model to route conv weights as (out, -1))", True
        if self.model is None:
            return VIEW_FLATTEN, f"; {p.ndim}-D: the conv view (out, -1)", False
        return VIEW_FLATTEN, f"; {p.ndim}-D: viewed as (out, -1) (declare stacks with stack_patterns)", True

    def finish(self) -> RoutingReport:
        """Add the warnings that need every tensor seen (unused patterns, guesses)."""
        report = self.report
        report.warnings = []  # recomputed from every tensor seen so far (finish runs again after add_param_group)
        for pattern in [*self.options.adamw_patterns, *self.options.matrix_patterns, *self.options.stack_patterns]:
            if pattern not in self.used_patterns:
                report.warnings.append(f"routing pattern {pattern!r} matched no trainable parameter")
        flagged = [e.name for e in report.entries if e.flagged]
        if flagged:
            report.warnings.append(
                f"routing: {len(flagged)} tensor(s) routed by a guess (shape rule or an undeclared ≥3-D view): "
                f"{flagged[:5]}{' …' if len(flagged) > 5 else ''}; override with adamw_patterns/matrix_patterns/"
                "stack_patterns"
            )
        return report


def route_model(model: nn.Module, **options: object) -> RoutingReport:
    """The routing report for a model's trainable parameters (what ``create_optimizer`` would do)."""
    router = Router(model, RoutingOptions(**options))
    seen: set[int] = set()
    for name, p in model.named_parameters():
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            router.route(p, name)
    return router.finish()


def route_tensors(params: Iterable[Tensor] | Iterable[tuple[str, Tensor]], **options: object) -> RoutingReport:
    """The routing report for bare (or named) tensors: the shape rule."""
    router = Router(None, RoutingOptions(**options))
    for i, item in enumerate(params):
        name, p = item if isinstance(item, tuple) else (f"param{i}", item)
        router.route(p, name)
    return router.finish()

