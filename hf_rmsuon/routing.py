"""Parameter routing: which tensors are orthogonalized (matrix track) and which get AdamW.

Model-aware when a model is given (module types, ``get_input_embeddings()``,
``get_output_embeddings()``, PEFT adapter names); the seeds' shape rule when only tensors are given.
Every decision is recorded with its reason in a :class:`RoutingReport`, and anything guessed is
flagged there — misrouting is never silent.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn

from .optim.base import ADAMW, MATRIX, SHAPE_RULE_MAX_DIM, shape_rule_track

LORA_POLICIES = ("both", "B", "none")

_LORA_FACTOR = re.compile(r"(?:^|\.)lora_(A|B)(?:\.|$)")
_LORA_EMBEDDING_FACTOR = re.compile(r"(?:^|\.)lora_embedding_(A|B)(?:\.|$)")


@dataclass
class RoutedTensor:
    name: str
    shape: tuple[int, ...]
    track: str
    reason: str
    flagged: bool = False  # a guess the user should look at


@dataclass
class RoutingReport:
    """Which tensor went where, and why. ``print(report)`` gives a table with totals."""

    entries: list[RoutedTensor] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def track_of(self, name: str) -> str:
        for e in self.entries:
            if e.name == name:
                return e.track
        raise KeyError(name)

    def counts(self) -> dict[str, dict[str, int]]:
        out = {MATRIX: {"tensors": 0, "numel": 0}, ADAMW: {"tensors": 0, "numel": 0}}
        for e in self.entries:
            out[e.track]["tensors"] += 1
            n = 1
            for d in e.shape:
                n *= d
            out[e.track]["numel"] += n
        return out

    def __str__(self) -> str:
        width = max((len(e.name) for e in self.entries), default=4)
        lines = [f"{'parameter':<{width}}  {'shape':<18} {'track':<7} reason"]
        for e in self.entries:
            mark = "  <-- check" if e.flagged else ""
            lines.append(f"{e.name:<{width}}  {e.shape!s:<18} {e.track:<7} {e.reason}{mark}")
        c = self.counts()
        lines.append(
            f"matrix track: {c[MATRIX]['tensors']} tensors, {c[MATRIX]['numel']:,} values; "
            f"adamw track: {c[ADAMW]['tensors']} tensors, {c[ADAMW]['numel']:,} values"
        )
        lines += [f"warning: {w}" for w in self.warnings]
        return "\n".join(lines)


def _compile(patterns: Iterable[str] | None) -> list[re.Pattern]:
    return [re.compile(p) for p in (patterns or ())]


def _module_param_names(model: nn.Module, module: nn.Module | None) -> set[str]:
    if module is None:
        return set()
    ids = {id(p) for p in module.parameters()}
    return {n for n, p in model.named_parameters() if id(p) in ids}


def _embedding_like_names(model: nn.Module) -> tuple[set[str], set[str], set[str]]:
    """Names of input-embedding, output-head and other embedding parameters (tied ones included)."""
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
    return inputs, outputs, others


_PEFT_WRAPPER_SUFFIX = re.compile(r"\.(modules_to_save\.[^.]+|original_module|base_layer)$")


def _owner_module(name: str) -> str:
    """Module path of a parameter with PEFT wrapper segments stripped, so that ``modules_to_save`` /
    ``original_module`` copies of a head or embedding map to the module they copy."""
    base = name.rsplit(".", 1)[0] if "." in name else name
    return _PEFT_WRAPPER_SUFFIX.sub("", base)


def route_model(
    model: nn.Module,
    *,
    lora_policy: str = "both",
    adamw_patterns: Sequence[str] = (),
    matrix_patterns: Sequence[str] = (),
    no_decay_1d: bool = True,
) -> tuple[list[dict[str, Any]], RoutingReport]:
    """Route a model's trainable parameters. Returns ``(param_groups, report)``.

    Rules, first match wins: user patterns (``adamw_patterns`` / ``matrix_patterns``, regexes searched
    in the parameter name) → ndim < 2 → embeddings (input, output head, tied, ``nn.Embedding``,
    LoRA embedding factors, PEFT ``modules_to_save`` copies) → LoRA factors per ``lora_policy``
    → weights of Linear/Conv modules → any other ≥2-D tensor by the shape rule (flagged).
    With ``no_decay_1d`` (the transformers Trainer's convention) 1-D tensors get ``weight_decay=0``.
    """
    if lora_policy not in LORA_POLICIES:
        raise ValueError(f"lora_policy={lora_policy!r} is not valid; choose one of {list(LORA_POLICIES)}")
    report = RoutingReport()
    adamw_re, matrix_re = _compile(adamw_patterns), _compile(matrix_patterns)
    inputs, outputs, embeddings = _embedding_like_names(model)
    head_modules = {_owner_module(n) for n in inputs | outputs | embeddings}
    layer_param_ids = {
        id(m.weight)
        for m in model.modules()
        if isinstance(m, nn.Linear | nn.modules.conv._ConvNd) and getattr(m, "weight", None) is not None
    }
    used_patterns: set[str] = set()
    seen: set[int] = set()
    groups = {MATRIX: [], ADAMW: []}

    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue  # frozen, or a tied duplicate (named_parameters already de-duplicates)
        seen.add(id(p))
        track, reason, flagged = _decide(
            name, p, adamw_re, matrix_re, used_patterns, inputs, outputs, embeddings, head_modules,
            layer_param_ids, lora_policy,
        )
        if track == MATRIX and p.ndim < 2:
            raise ValueError(f"matrix_patterns routed the {p.ndim}-D tensor {name!r} to the matrix track; "
                             "only ndim >= 2 tensors can be orthogonalized")
        groups[track].append(p)
        report.entries.append(RoutedTensor(name, tuple(p.shape), track, reason, flagged))

    for pat in [*adamw_patterns, *matrix_patterns]:
        if pat not in used_patterns:
            report.warnings.append(f"routing pattern {pat!r} matched no trainable parameter")
    flagged = [e.name for e in report.entries if e.flagged]
    if flagged:
        report.warnings.append(
            f"{len(flagged)} tensor(s) routed by the shape rule only (no Linear/Conv/embedding module): "
            f"{flagged[:5]}{' …' if len(flagged) > 5 else ''}; override with adamw_patterns/matrix_patterns"
        )
    param_groups = [{"params": groups[MATRIX], "track": MATRIX}] if groups[MATRIX] else []
    decayed = [p for p in groups[ADAMW] if p.ndim >= 2 or not no_decay_1d]
    undecayed = [p for p in groups[ADAMW] if p.ndim < 2 and no_decay_1d]
    if decayed:
        param_groups.append({"params": decayed, "track": ADAMW})
    if undecayed:
        param_groups.append({"params": undecayed, "track": ADAMW, "weight_decay": 0.0})
    return param_groups, report


def _decide(name, p, adamw_re, matrix_re, used, inputs, outputs, embeddings, head_modules, layer_ids,
            lora_policy) -> tuple[str, str, bool]:
    for regexes, track in ((adamw_re, ADAMW), (matrix_re, MATRIX)):
        for rx in regexes:
            if rx.search(name):
                used.add(rx.pattern)
                return track, f"user pattern {rx.pattern!r}", False
    if p.ndim < 2:
        return ADAMW, "ndim < 2 (bias, norm, scale, DoRA magnitude)", False
    if _LORA_EMBEDDING_FACTOR.search(name):
        return ADAMW, "LoRA embedding factor", False
    if name in inputs:
        return ADAMW, "input embedding" + (" (tied to output head)" if name in outputs else ""), False
    if name in outputs:
        return ADAMW, "output head", False
    if name in embeddings:
        return ADAMW, "embedding", False
    if _owner_module(name) in head_modules:
        return ADAMW, "PEFT copy of an embedding/head (modules_to_save)", False
    lora = _LORA_FACTOR.search(name)
    if lora:
        factor = lora.group(1)
        on_matrix = lora_policy == "both" or (lora_policy == "B" and factor == "B")
        return (MATRIX if on_matrix else ADAMW), f"LoRA {factor} factor (lora_policy={lora_policy})", False
    if id(p) in layer_ids:
        return MATRIX, "Linear/Conv weight", False
    track = shape_rule_track(p)
    return track, f"shape rule (ndim {p.ndim}, max dim {'<' if track == MATRIX else '>='} {SHAPE_RULE_MAX_DIM})", True


def route_tensors(params: Iterable[Tensor] | Iterable[dict[str, Any]]) -> tuple[list[dict[str, Any]], RoutingReport]:
    """Route bare tensors (or param groups without a ``track``) by the seeds' shape rule."""
    params = list(params)
    report = RoutingReport()
    if params and isinstance(params[0], dict):
        groups = []
        for gi, group in enumerate(params):
            if "track" in group:
                groups.append(dict(group))
                for i, p in enumerate(group["params"]):
                    report.entries.append(RoutedTensor(f"group{gi}.{i}", tuple(p.shape), group["track"], "given"))
                continue
            split: dict[str, list[Tensor]] = {MATRIX: [], ADAMW: []}
            for i, p in enumerate(group["params"]):
                tr = shape_rule_track(p)
                split[tr].append(p)
                report.entries.append(RoutedTensor(f"group{gi}.{i}", tuple(p.shape), tr, "shape rule"))
            groups += [{**group, "params": ps, "track": tr} for tr, ps in split.items() if ps]
        return groups, report
    split = {MATRIX: [], ADAMW: []}
    for i, p in enumerate(params):
        tr = shape_rule_track(p)
        split[tr].append(p)
        report.entries.append(RoutedTensor(f"param{i}", tuple(p.shape), tr, "shape rule"))
    return [{"params": ps, "track": tr} for tr, ps in split.items() if ps], report
