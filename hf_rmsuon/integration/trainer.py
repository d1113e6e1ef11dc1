"""``RMSuonTrainer``: a ``transformers.Trainer`` for the family, without global hooks — and a mixin.

Every method defers to ``super()``, so it composes with other Trainer subclasses in either order::

    class MySFT(RMSuonTrainer, SFTTrainer): ...   # SAM replay runs through SFTTrainer.training_step
    class MySFT(SFTTrainer, RMSuonTrainer): ...   # SFTTrainer's step wraps the whole SAM step
"""

from __future__ import annotations

from typing import Any

from transformers import Trainer

from ..transformers_names import register_optimizer_names
from .factory import second_pass_provided
from .install import is_family_optim, validate_training_arguments
from .sam_step import grad_norm_with_hint, log_with_diagnostics, sam_training_step

register_optimizer_names()


class RMSuonTrainer(Trainer):
    """Builds family optimizers from ``args.optim``/``args.optim_args`` (model-aware routing, lr/betas/
    eps/weight decay from the arguments), runs ARS/ARS2-Neo's SAM second pass inside
    ``training_step`` (exact under gradient accumulation, DDP and mixed precision), and logs the
    optimizer's diagnostics (``optim/energy``, ``optim/phi``, …) through the normal logging, so
    ``report_to`` backends receive them; the gradient norm the Trainer takes before each step (to clip
    and log it) doubles as the optimizer's finiteness check. Any other ``--optim`` behaves as in ``Trainer``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if is_family_optim(self.args.optim) and self.optimizer_cls_and_kwargs is None:
            validate_training_arguments(self.args)  # fail now, not after data loading

    def create_optimizer(self, *args: Any, **kwargs: Any):
        with second_pass_provided():  # SAM members are welcome: this trainer runs the second pass
            return super().create_optimizer(*args, **kwargs)

    def training_step(self, model, inputs, num_items_in_batch=None):
        return sam_training_step(self, model, inputs, num_items_in_batch, super().training_step)

    def _get_grad_norm(self, model, grad_norm=None):
        return grad_norm_with_hint(self, model, grad_norm, super()._get_grad_norm)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        return log_with_diagnostics(self, logs, start_time, super().log)
