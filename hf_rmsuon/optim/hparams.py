"""Typed hyperparameter schema.

One declaration per hyperparameter drives constructor validation, the generated signature and
docstring, ``--optim_args`` parsing (strings → typed values) and the registry listing — so the four
can never disagree.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass(frozen=True)
class HyperParam:
    """One hyperparameter: name, type, default, one-line meaning and its valid range."""

    name: str
    kind: str  # "float" | "int" | "bool" | "choice" | "betas" | "optional_betas" | "floats3" | "patterns" | "optional_float"
    default: Any
    doc: str
    choices: tuple[str, ...] = ()
    minimum: float | None = None
    maximum: float | None = None  # exclusive upper bound when ``open_max`` (betas use [0, 1))
    open_max: bool = False
    extra_check: Callable[[Any], str | None] | None = field(default=None, compare=False)

    # -- validation -------------------------------------------------------------------------------
    def validate(self, value: Any) -> Any:
        """Return the normalised value or raise ``ValueError`` naming the argument and the fix."""
        value = self._coerce(value)
        if self.kind in ("float", "int", "optional_float") and value is not None:
            self._check_range(value)
        if self.kind in ("betas", "optional_betas") and value is not None:
            for b in value:
                self._check_range(b)
        if self.kind == "choice" and value not in self.choices:
            raise ValueError(f"{self.name}={value!r} is not valid; choose one of {list(self.choices)}")
        if self.extra_check is not None:
            problem = self.extra_check(value)
            if problem:
                raise ValueError(f"{self.name}={value!r}: {problem}")
        return value

    def _check_range(self, value: float) -> None:
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{self.name} must be finite, got {value}")
        if self.minimum is not None and value < self.minimum:
            raise ValueError(f"{self.name} must be >= {self.minimum}, got {value}")
        if self.maximum is not None:
            bad = value >= self.maximum if self.open_max else value > self.maximum
            if bad:
                bracket = ")" if self.open_max else "]"
                raise ValueError(
                    f"{self.name} must be in [{self.minimum}, {self.maximum}{bracket}, got {value}"
                )

    def _coerce(self, value: Any) -> Any:
        if isinstance(value, torch.dtype) and self.kind == "choice":
            value = str(value).removeprefix("torch.")  # torch.float32 → "float32", as a PyTorch user writes it
        if isinstance(value, str) and self.kind not in ("choice", "patterns"):
            return self.parse(value)
        kind = self.kind
        if kind.startswith("optional_") and value is None:
            return None
        try:
            if kind == "float":
                if isinstance(value, bool):
                    raise TypeError
                return float(value)
            if kind == "optional_float":
                return None if value is None else float(value)
            if kind == "int":
                if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                    raise TypeError
                return int(value)
            if kind == "bool":
                if not isinstance(value, bool):
                    raise TypeError
                return value
            if kind in ("betas", "optional_betas", "floats3"):
                seq = tuple(float(v) for v in value)
                expected = 3 if kind == "floats3" else 2
                if len(seq) != expected:
                    raise TypeError
                return seq
            if kind == "patterns":
                if isinstance(value, str):
                    return tuple(p for p in value.split(":") if p)
                return tuple(str(v) for v in value)
            return value
        except (TypeError, ValueError):
            raise ValueError(f"{self.name} expects {self.type_doc}, got {value!r}") from None

    # -- strings (``--optim_args``) ---------------------------------------------------------------
    def parse(self, text: str) -> Any:
        """Parse the ``--optim_args`` string form (lists use ``:``, e.g. ``betas=0.9:0.95``)."""
        text = text.strip()
        try:
            if self.kind == "float":
                return float(text)
            if self.kind == "optional_float":
                return None if text.lower() in ("none", "") else float(text)
            if self.kind == "int":
                return int(text)
            if self.kind == "bool":
                lowered = text.lower()
                if lowered in ("1", "true", "yes", "on"):
                    return True
                if lowered in ("0", "false", "no", "off"):
                    return False
                raise ValueError
            if self.kind == "optional_betas" and text.lower() in ("none", ""):
                return None
            if self.kind in ("betas", "optional_betas", "floats3"):
                return self._coerce([float(v) for v in text.split(":")])
            if self.kind == "patterns":
                return self._coerce(text)
            return text
        except ValueError:
            raise ValueError(f"{self.name} expects {self.type_doc}, got {text!r}") from None

    @property
    def type_doc(self) -> str:
        return {
            "float": "a number",
            "optional_float": "a number or none",
            "int": "an integer",
            "bool": "true or false",
            "choice": "one of " + "|".join(self.choices),
            "betas": "two numbers in [0, 1) (string form b1:b2)",
            "optional_betas": "none or two numbers in [0, 1) (string form b1:b2)",
            "floats3": "three numbers (string form a:b:c)",
            "patterns": "regular expressions (string form p1:p2)",
        }[self.kind]


# -- constructors for common shapes of hyperparameter -------------------------------------------------


def nonneg(name: str, default: float, doc: str) -> HyperParam:
    return HyperParam(name, "float", default, doc, minimum=0.0)


def betas(name: str, default: tuple[float, float], doc: str) -> HyperParam:
    return HyperParam(name, "betas", default, doc, minimum=0.0, maximum=1.0, open_max=True)


def beta(name: str, default: float, doc: str) -> HyperParam:
    return HyperParam(name, "float", default, doc, minimum=0.0, maximum=1.0, open_max=True)


def choice(name: str, default: str, choices: Iterable[str], doc: str) -> HyperParam:
    return HyperParam(name, "choice", default, doc, choices=tuple(choices))


def flag(name: str, default: bool, doc: str) -> HyperParam:
    return HyperParam(name, "bool", default, doc)


def integer(name: str, default: int, doc: str, minimum: int = 0) -> HyperParam:
    return HyperParam(name, "int", default, doc, minimum=minimum)


def _positive_eps(value: float) -> str | None:
    return None if value > 0 else "must be > 0 (it keeps the denominator away from zero)"


def eps(name: str, default: float, doc: str) -> HyperParam:
    return HyperParam(name, "float", default, doc, minimum=0.0, extra_check=_positive_eps)


def _positive_or_none(value: float | None) -> str | None:
    return None if value is None or value > 0 else "must be > 0 (it keeps the denominator away from zero)"


def optional(name: str, kind: str, doc: str) -> HyperParam:
    """A hyperparameter whose default ``None`` means "the same as the matrix track's"."""
    if kind == "betas":
        return HyperParam(name, "optional_betas", None, doc, minimum=0.0, maximum=1.0, open_max=True)
    if kind == "eps":
        return HyperParam(name, "optional_float", None, doc, minimum=0.0, extra_check=_positive_or_none)
    return HyperParam(name, "optional_float", None, doc, minimum=0.0)


class Schema:
    """An ordered set of :class:`HyperParam` with validation of whole keyword sets."""

    def __init__(self, params: Iterable[HyperParam]):
        self.params: dict[str, HyperParam] = {}
        for p in params:
            self.params[p.name] = p  # later declarations override earlier ones (subclass defaults)

    def __iter__(self):
        return iter(self.params.values())

    def __contains__(self, name: str) -> bool:
        return name in self.params

    def __getitem__(self, name: str) -> HyperParam:
        return self.params[name]

    def extended(self, *params: HyperParam) -> Schema:
        return Schema([*self.params.values(), *params])

    def defaults(self) -> dict[str, Any]:
        return {p.name: p.default for p in self}

    def validate(self, values: Mapping[str, Any], owner: str) -> dict[str, Any]:
        """Check names and values; unknown names raise listing the valid ones."""
        unknown = sorted(set(values) - set(self.params))
        if unknown:
            raise ValueError(
                f"{owner} got unknown hyperparameter(s) {unknown}; valid ones are: {sorted(self.params)}"
            )
        return {name: self.params[name].validate(v) for name, v in values.items()}

    def parse_strings(self, values: Mapping[str, str], owner: str) -> dict[str, Any]:
        """Typed parse of ``{key: "string"}`` (the ``--optim_args`` form), then validation."""
        unknown = sorted(set(values) - set(self.params))
        if unknown:
            raise ValueError(
                f"--optim_args for {owner}: unknown key(s) {unknown}; valid keys are: {sorted(self.params)}"
            )
        return {k: self.params[k].validate(self.params[k].parse(v)) for k, v in values.items()}

    def describe(self) -> str:
        """A table for docs and ``python -m hf_rmsuon list``."""
        width = max(len(p.name) for p in self)
        lines = []
        for p in self:
            lines.append(f"  {p.name:<{width}}  {p.default!s:<22} {p.doc}")
        return "\n".join(lines)


def parse_optim_args_string(text: str | None) -> dict[str, str]:
    """Split ``"k1=v1,k2=v2"`` into a dict of strings (whitespace ignored); malformed items raise."""
    if not text:
        return {}
    out: dict[str, str] = {}
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        if len(item.split()) > 1 and item.count("=") > 1:
            raise ValueError(
                f"--optim_args items are separated by commas, not spaces: got {item!r}; write e.g. "
                f"--optim_args \"{','.join(item.split())}\""
            )
        item = "".join(item.split())
        if "=" not in item:
            raise ValueError(
                f"--optim_args item {item!r} is not key=value; write e.g. --optim_args \"rho=0.05,k=2,betas=0.9:0.95\""
            )
        key, value = item.split("=", 1)
        if key in out:
            raise ValueError(f"--optim_args sets {key!r} twice")
        out[key] = value
    return out
