"""``install()``: make unmodified transformers scripts accept the family in ``--optim``.

* registers every family name in ``transformers.training_args.OptimizerNames`` (so
  ``TrainingArguments`` and ``HfArgumentParser`` accept them) and a handler in transformers'
  optimizer dispatch (done on import of this package — adding names changes nothing else);
* ``install()`` additionally hooks ``Trainer.training_step`` (the SAM pass), ``Trainer.log``
  (optimizer diagnostics) and ``TrainingArguments.__post_init__`` (typed ``--optim_args`` are
  checked when the arguments are parsed, before any model or data is loaded). Idempotent.
"""

from __future__ import annotations

import functools
from typing import Any

import transformers
from transformers import Trainer, TrainingArguments
from transformers import trainer_optimizer as _dispatch
from transformers.training_args import OptimizerNames

from ..registry import available_optimizers, parse_optim_args
from .factory import optimizer_cls_and_kwargs
from .sam_step import optimizer_diagnostics, sam_training_step

_ORIGINALS = "_hf_rmsuon_original"


def optimizer_name_member(value: str) -> OptimizerNames:
    """Unpickling target for family members of ``OptimizerNames`` (e.g. in ``training_args.bin``):
    importing this module registers the names, so loading works wherever hf_rmsuon is installed."""
    register_optimizer_names()
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


def _handler(name: str):
    return lambda ctx: optimizer_cls_and_kwargs(name, ctx.args)


@functools.cache
def register_optimizer_names() -> None:
    """Add the family names to ``OptimizerNames`` and the optimizer dispatch table (idempotent)."""
    for name in available_optimizers():
        _add_member(OptimizerNames, name)
        _dispatch._OPTIMIZER_HANDLERS.setdefault(name, _handler(name))


def is_family_optim(optim: Any) -> bool:
    return str(getattr(optim, "value", optim)) in available_optimizers()


def validate_training_arguments(args: TrainingArguments) -> None:
    """Typed check of ``--optim_args`` for a family ``--optim`` (raises listing the valid keys)."""
    if is_family_optim(args.optim):
        name = str(getattr(args.optim, "value", args.optim))
        parse_optim_args(name, args.optim_args)
        optimizer_cls_and_kwargs(name, args)  # engine check and value validation


def _patch(owner: type, attr: str, make_wrapper) -> None:
    current = getattr(owner, attr)
    if getattr(current, _ORIGINALS, None) is not None:
        return  # already installed
    wrapper = make_wrapper(current)
    setattr(wrapper, _ORIGINALS, current)
    functools.update_wrapper(wrapper, current)
    setattr(owner, attr, wrapper)


def original(owner: type, attr: str):
    """The unhooked method (so subclasses like RMSuonTrainer never run a hook twice)."""
    current = getattr(owner, attr)
    return getattr(current, _ORIGINALS, current)


def install() -> None:
    """Make every ``transformers.Trainer`` run family optimizers from ``--optim`` (idempotent)."""
    register_optimizer_names()

    def training_step_wrapper(base):
        def training_step(self, model, inputs, num_items_in_batch=None):
            return sam_training_step(self, model, inputs, num_items_in_batch,
                                     functools.partial(base, self))
        return training_step

    def log_wrapper(base):
        def log(self, logs, start_time=None):
            if "loss" in logs:
                logs.update(optimizer_diagnostics(self))
            return base(self, logs, start_time)
        return log

    def post_init_wrapper(base):
        def __post_init__(self):
            base(self)
            validate_training_arguments(self)
        return __post_init__

    _patch(Trainer, "training_step", training_step_wrapper)
    _patch(Trainer, "log", log_wrapper)
    _patch(TrainingArguments, "__post_init__", post_init_wrapper)
    transformers.logging.get_logger("hf_rmsuon")  # share transformers' verbosity settings


def is_installed() -> bool:
    return getattr(Trainer.training_step, _ORIGINALS, None) is not None
