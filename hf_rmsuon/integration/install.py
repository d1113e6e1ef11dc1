"""``install()``: make unmodified transformers scripts run the family from ``--optim``.

``import hf_rmsuon`` already registers the names (``names.py``: ``TrainingArguments`` and
``HfArgumentParser`` accept them, and transformers' optimizer dispatch builds them).
``install()`` additionally hooks

* ``Trainer.training_step`` (the SAM pass), ``Trainer.log`` (optimizer diagnostics) and
  ``Trainer._get_grad_norm`` (its gradient norm doubles as the optimizer's finiteness check);
* ``TrainingArguments.__post_init__`` (typed ``--optim_args`` are checked when the arguments are
  parsed, before any model or data is loaded; an unknown ``optim`` gets "did you mean");
* ``HfArgumentParser.error`` (an invalid ``--optim`` choice gets "did you mean").

Idempotent. Subclasses that override these methods and call ``super()`` keep working: the hooks
sit at the ``Trainer`` level, below them.
"""

from __future__ import annotations

import functools
from typing import Any

from transformers import HfArgumentParser, Trainer, TrainingArguments
from transformers.training_args import OptimizerNames

from ..registry import available_optimizers, parse_optim_args
from ..transformers_names import optimizer_name_member, register_optimizer_names, suggest
from .factory import optimizer_cls_and_kwargs
from .sam_step import grad_norm_with_hint, log_with_diagnostics, sam_training_step

__all__ = ["install", "is_installed", "optimizer_name_member", "original", "register_optimizer_names"]

_ORIGINALS = "_hf_rmsuon_original"


def is_family_optim(optim: Any) -> bool:
    return str(getattr(optim, "value", optim)) in available_optimizers()


def validate_training_arguments(args: TrainingArguments) -> None:
    """Typed check of ``--optim_args`` for a family ``--optim`` (raises listing the valid keys)."""
    if is_family_optim(args.optim):
        name = str(getattr(args.optim, "value", args.optim))
        parse_optim_args(name, args.optim_args)
        optimizer_cls_and_kwargs(name, args)  # engine check, value validation, lr warning


def optim_hint(value: str) -> str:
    """"did you mean" for an unknown ``--optim`` value, and where the family is listed."""
    names = [m.value for m in OptimizerNames]
    return (suggest(value, names) + " The RMSuon family: " + ", ".join(available_optimizers())
            + " (details: python -m hf_rmsuon list).").lstrip()


def _patch(owner: type, attr: str, make_wrapper) -> None:
    current = getattr(owner, attr)
    if getattr(current, _ORIGINALS, None) is not None:
        return  # already installed
    wrapper = make_wrapper(current)
    functools.update_wrapper(wrapper, current)
    setattr(wrapper, _ORIGINALS, current)
    setattr(owner, attr, wrapper)


def original(owner: type, attr: str):
    """The unhooked method."""
    current = getattr(owner, attr)
    return getattr(current, _ORIGINALS, current)


def install() -> None:
    """Make every ``transformers.Trainer`` run family optimizers from ``--optim`` (idempotent)."""
    register_optimizer_names()

    def training_step_wrapper(base):
        def training_step(self, model, inputs, num_items_in_batch=None):
            return sam_training_step(self, model, inputs, num_items_in_batch, functools.partial(base, self))
        return training_step

    def log_wrapper(base):
        def log(self, logs, start_time=None):
            return log_with_diagnostics(self, logs, start_time, functools.partial(base, self))
        return log

    def grad_norm_wrapper(base):
        def _get_grad_norm(self, model, grad_norm=None):
            return grad_norm_with_hint(self, model, grad_norm, functools.partial(base, self))
        return _get_grad_norm

    def post_init_wrapper(base):
        def __post_init__(self):
            try:
                base(self)
            except ValueError as err:
                optim = str(getattr(self.optim, "value", self.optim))
                if optim not in {m.value for m in OptimizerNames} and optim in str(err):
                    raise ValueError(f"{err}\n{optim_hint(optim)}") from None
                raise
            validate_training_arguments(self)
        return __post_init__

    def error_wrapper(base):
        def error(self, message):
            if "argument --optim:" in message and "invalid choice" in message:
                value = message.split("invalid choice:", 1)[1].split("(", 1)[0].strip().strip("'\"")
                message = f"{message}\n{optim_hint(value)}"
            return base(self, message)
        return error

    _patch(Trainer, "training_step", training_step_wrapper)
    _patch(Trainer, "log", log_wrapper)
    if hasattr(Trainer, "_get_grad_norm"):  # transformers' per-step gradient-norm pass (clip and log)
        _patch(Trainer, "_get_grad_norm", grad_norm_wrapper)
    _patch(TrainingArguments, "__post_init__", post_init_wrapper)
    _patch(HfArgumentParser, "error", error_wrapper)


def is_installed() -> bool:
    return getattr(Trainer.training_step, _ORIGINALS, None) is not None
