"""``RMSuonTrainer``: a ``transformers.Trainer`` for the family, without global hooks."""

from __future__ import annotations

import functools
from typing import Any

from transformers import Trainer

from .install import is_family_optim, original, register_optimizer_names, validate_training_arguments
from .sam_step import optimizer_diagnostics, sam_training_step

register_optimizer_names()


class RMSuonTrainer(Trainer):
    """Builds family optimizers from ``args.optim``/``args.optim_args`` (model-aware routing, lr/betas/
    eps/weight decay from the arguments), runs ARS/ARS2-Neo's SAM second pass inside
    ``training_step`` (exact under gradient accumulation, DDP and mixed precision), and logs the
    optimizer's diagnostics (``optim/energy``, ``optim/phi``, …) through the normal logging, so
    ``report_to`` backends receive them. Any other ``--optim`` behaves as in ``Trainer``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if is_family_optim(self.args.optim) and self.optimizer_cls_and_kwargs is None:
            validate_training_arguments(self.args)  # fail now, not after data loading

    def training_step(self, model, inputs, num_items_in_batch=None):
        base = functools.partial(original(Trainer, "training_step"), self)
        return sam_training_step(self, model, inputs, num_items_in_batch, base)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:
            logs.update(optimizer_diagnostics(self))
        original(Trainer, "log")(self, logs, start_time)
