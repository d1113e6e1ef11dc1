"""The family's names in transformers' ``OptimizerNames`` and optimizer dispatch — and nothing else.

Part of the transformers integration, but outside ``hf_rmsuon.integration`` (which imports
``transformers.Trainer``) to stay light: ``import hf_rmsuon`` arms :func:`register_when_imported`, so the names are added as
soon as transformers loads ``training_args`` (``TrainingArguments(optim="ars2_neo")`` then works
after a bare ``import hf_rmsuon``), without importing transformers itself — the optimizers keep
working, and importing fast, where transformers is absent or unused.
"""

from __future__ import annotations

import difflib
import importlib.abc
import importlib.machinery
import sys
from collections.abc import Callable, Sequence
from typing import Any

from .registry import available_optimizers

_TRAINING_ARGS = "transformers.training_args"
_DISPATCH = "transformers.trainer_optimizer"


def optimizer_name_member(value: str) -> Any:
    """Unpickling target for family members of ``OptimizerNames`` (e.g. in ``training_args.bin``):
    loading works wherever hf_rmsuon is installed, whether or not it was imported first."""
    from transformers.training_args import OptimizerNames

    _register_enum_members(OptimizerNames)
    return OptimizerNames(value)


def _add_member(enum_cls: type, value: str) -> None:
    if value in enum_cls._value2member_map_:
        return
    member = str.__new__(enum_cls, value)
    member._name_ = value.upper()
    member._value_ = value
    member.__objclass__ = enum_cls
    member._sort_order_ = len(enum_cls._member_names_)
    # Pickle as a call into hf_rmsuon rather than OptimizerNames("ars2_neo"), which only resolves
    # after registration: `torch.load("training_args.bin")` then needs nothing but hf_rmsuon installed.
    member.__reduce_ex__ = lambda proto, v=value: (optimizer_name_member, (v,))
    enum_cls._member_map_[member._name_] = member
    enum_cls._value2member_map_[value] = member
    enum_cls._member_names_.append(member._name_)


def _register_enum_members(enum_cls: type) -> None:
    for name in available_optimizers():
        _add_member(enum_cls, name)


def _handler(name: str) -> Callable[[Any], Any]:
    def handler(ctx: Any) -> Any:
        from .integration.factory import optimizer_cls_and_kwargs

        return optimizer_cls_and_kwargs(name, ctx.args)

    return handler


def _register_handlers(dispatch_module: Any) -> None:
    for name in available_optimizers():
        dispatch_module._OPTIMIZER_HANDLERS.setdefault(name, _handler(name))


def register_optimizer_names() -> None:
    """Add the family names to ``OptimizerNames`` and transformers' optimizer dispatch (idempotent;
    imports transformers)."""
    from transformers import trainer_optimizer
    from transformers.training_args import OptimizerNames

    _register_enum_members(OptimizerNames)
    _register_handlers(trainer_optimizer)


class _AfterImport(importlib.abc.MetaPathFinder):
    """Runs a callback right after one module has been executed (a post-import hook)."""

    def __init__(self, callbacks: dict[str, Callable[[Any], None]]) -> None:
        self.callbacks = callbacks

    def find_spec(self, fullname: str, path: Sequence[str] | None, target: Any = None) -> Any:
        callback = self.callbacks.get(fullname)
        if callback is None:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_register(module: Any) -> None:
            exec_module(module)
            callback(module)

        spec.loader.exec_module = exec_then_register  # this module's own loader instance
        return spec


_HOOK: _AfterImport | None = None


def register_when_imported() -> None:
    """Register now for the transformers modules already imported, and right after import for the
    others (idempotent; never imports transformers)."""
    global _HOOK
    callbacks = {
        _TRAINING_ARGS: lambda module: _register_enum_members(module.OptimizerNames),
        _DISPATCH: _register_handlers,
    }
    pending = {}
    for name, callback in callbacks.items():
        if name in sys.modules:
            callback(sys.modules[name])
        else:
            pending[name] = callback
    if pending and _HOOK is None:
        _HOOK = _AfterImport(pending)
        sys.meta_path.insert(0, _HOOK)


def suggest(name: str, candidates: Sequence[str]) -> str:
    """``" Did you mean 'x'?"`` for the closest candidate (or ``""``), ignoring case and ``_``/``-``."""
    def key(s: str) -> str:
        return s.lower().replace("-", "").replace("_", "")

    by_key = {key(c): c for c in candidates}
    close = difflib.get_close_matches(key(name), list(by_key), n=1, cutoff=0.6)
    return f" Did you mean {by_key[close[0]]!r}?" if close else ""
