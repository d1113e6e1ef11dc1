"""The SAM second pass inside the transformers training step (SPEC §6).

The Trainer calls ``training_step`` once per micro-batch. We record every micro-batch of the
current update step (and the RNG state before its forward). After the last one — when Accelerate
syncs gradients, so the base gradient is complete and all-reduced — we ask the optimizer whether this
step syncs; if so we perturb, replay every recorded micro-batch through the *same* ``training_step``
(same loss scaling, autocast and backward; ``no_sync`` on all but the last, so the adversarial
gradient is all-reduced exactly once), and restore. The result is exact SAM under gradient
accumulation and DDP; lazy steps cost one pass.

"The same training step" is the one below the hook in the trainer's MRO (``super().training_step``
of ``RMSuonTrainer``, the original ``Trainer.training_step`` under ``install()``); whatever a subclass
does above the hook wraps the whole step, replay included, so it runs once. The replay leaves no trace
in the trainer's bookkeeping: metric accumulators that ``compute_loss`` fills (TRL's ``_metrics``,
``_total_train_tokens``, …) are restored to their state before the replay (:class:`TrainerBookkeeping`).
"""

from __future__ import annotations

import contextlib
import copy
import numbers
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..optim.sam import RNGState, preserved_batchnorm_stats

TrainingStep = Callable[[nn.Module, dict, Any], torch.Tensor]


def unwrap_optimizer(optimizer: Any) -> Any:
    """The family optimizer inside Accelerate's (and similar) wrappers."""
    while optimizer is not None and hasattr(optimizer, "optimizer") and not hasattr(optimizer, "sam_pass_due"):
        optimizer = optimizer.optimizer
    return optimizer


_ACTIVE = "_hf_rmsuon_sam_step_active"


def sam_training_step(trainer: Any, model: nn.Module, inputs: dict, num_items_in_batch: Any,
                      base_step: TrainingStep) -> torch.Tensor:
    """``training_step`` with the SAM pass; ``base_step`` is the training step below the hook.

    Re-entrant calls (the hook reached twice in one step, e.g. ``RMSuonTrainer`` with ``install()``,
    or the replay passing through a second hook) just run ``base_step``."""
    if trainer.__dict__.get(_ACTIVE):
        return base_step(model, inputs, num_items_in_batch)
    trainer.__dict__[_ACTIVE] = True
    try:
        return _sam_training_step(trainer, model, inputs, num_items_in_batch, base_step)
    finally:
        trainer.__dict__[_ACTIVE] = False


def _sam_training_step(trainer: Any, model: nn.Module, inputs: dict, num_items_in_batch: Any,
                       base_step: TrainingStep) -> torch.Tensor:
    optimizer = unwrap_optimizer(getattr(trainer, "optimizer", None))
    if not getattr(optimizer, "sharpness_aware", False):
        return base_step(model, inputs, num_items_in_batch)
    window: list[_MicroBatch] = trainer.__dict__.setdefault("_sam_window", [])
    rng = RNGState() if optimizer.defaults.get("replay_rng", True) else None
    # The step below may change the dict it is given (TRL sets inputs["use_cache"]); replay the original.
    recorded = copy.copy(inputs) if isinstance(inputs, Mapping) else inputs
    loss = base_step(model, inputs, num_items_in_batch)
    window.append(_MicroBatch(recorded, num_items_in_batch, rng, loss.detach()))
    if not trainer.accelerator.sync_gradients:
        return loss
    try:
        _second_pass_if_due(trainer, model, optimizer, window, base_step)
    finally:
        window.clear()
    return loss


class TrainerBookkeeping:
    """Snapshot of a trainer's plain-data attributes — numbers, and dicts/lists/tuples of numbers
    and strings, such as TRL's ``_metrics`` (``{"train": {"num_tokens": [...]}}``) and
    ``_total_train_tokens`` — restored in place after the replay, so the adversarial pass is not
    counted in any metric. Generic on purpose: any ``compute_loss`` that records into such an
    attribute is covered; objects and anything holding tensors (models, the accelerator, the state,
    records of tensors) are left alone. Taken around the replayed forward/backward passes only."""

    #: Attributes always snapshotted when present (TRL's trainers), even if not plain data.
    KNOWN = ("_metrics", "_total_train_tokens", "_textual_logs", "_step")

    def __init__(self, trainer: Any) -> None:
        self.trainer = trainer
        self.saved: dict[str, Any] = {}
        for key, value in vars(trainer).items():
            if key.startswith("_hf_rmsuon") or key == "_sam_window":
                continue
            if key in self.KNOWN or self._plain(value):
                try:
                    self.saved[key] = copy.deepcopy(value)
                except Exception:  # not copyable: not bookkeeping we can restore
                    continue

    @classmethod
    def _plain(cls, value: Any, depth: int = 0) -> bool:
        """Numbers, or containers of numbers/strings (top-level flags and strings are configuration,
        not bookkeeping)."""
        if isinstance(value, numbers.Number) and not isinstance(value, bool):
            return True
        if value is None or isinstance(value, (str, bool)):
            return depth > 0
        if depth > 3:
            return False
        if isinstance(value, dict):
            return all(isinstance(k, (str, int)) and cls._plain(v, depth + 1) for k, v in value.items())
        if isinstance(value, (list, tuple)):
            return all(cls._plain(v, depth + 1) for v in value)
        return False

    def restore(self) -> None:
        for key, saved in self.saved.items():
            current = self.trainer.__dict__.get(key)
            if isinstance(current, dict) and isinstance(saved, dict):
                _restore_dict(current, saved)
            elif isinstance(current, list) and isinstance(saved, list):
                current[:] = saved
            else:
                self.trainer.__dict__[key] = saved

    @contextlib.contextmanager
    def restored(self) -> Iterator[None]:
        try:
            yield
        finally:
            self.restore()


def _restore_dict(current: dict, saved: dict) -> None:
    """``current`` becomes ``saved`` in place (nested dicts too), keeping the objects others may hold."""
    for key in list(current):
        if key not in saved:
            del current[key]
    for key, value in saved.items():
        if isinstance(current.get(key), dict) and isinstance(value, dict):
            _restore_dict(current[key], value)
        elif isinstance(current.get(key), list) and isinstance(value, list):
            current[key][:] = value
        else:
            current[key] = value


@dataclass
class _MicroBatch:
    inputs: dict
    num_items_in_batch: Any
    rng: RNGState | None
    loss: torch.Tensor  # as returned by the training step (already scaled for accumulation)


def _second_pass_if_due(trainer, model, optimizer, window: list[_MicroBatch], base_step) -> None:
    accelerator = trainer.accelerator
    optimizer.reset_sam_pass()  # drop a pass left over from a step the grad scaler skipped
    if not optimizer.sam_pass_due():
        return
    scaler = getattr(accelerator, "scaler", None)
    optimizer.begin_sam_pass(grad_scale=scaler.get_scale() if scaler is not None else None)
    clean = torch.stack([mb.loss.float() for mb in window]).sum()
    adv = torch.zeros((), device=clean.device)
    try:
        with preserved_batchnorm_stats(model), TrainerBookkeeping(trainer).restored():
            for i, mb in enumerate(window):
                if mb.rng is not None:
                    mb.rng.restore()
                last = i == len(window) - 1
                with contextlib.nullcontext() if last else accelerator.no_sync(model):
                    adv = adv + base_step(model, mb.inputs, mb.num_items_in_batch).detach().float()
    finally:
        optimizer.end_sam_pass(*_reduced_losses(accelerator, clean, adv))


def _reduced_losses(accelerator, clean, adv):
    """Mean over ranks, so ASI's ρ — which shapes the next perturbation — is identical everywhere."""
    both = torch.stack([clean.detach().float(), adv.float()])
    both = accelerator.reduce(both, reduction="mean")
    return both[0], both[1]


def optimizer_diagnostics(trainer: Any) -> dict[str, float]:
    """The family optimizer's diagnostics as ``optim/<name>`` log entries (empty for others)."""
    optimizer = unwrap_optimizer(getattr(trainer, "optimizer", None))
    if optimizer is None or not hasattr(optimizer, "diagnostics"):
        return {}
    return {f"optim/{k}": v for k, v in optimizer.diagnostics().items()}


def grad_norm_with_hint(trainer: Any, model: nn.Module, grad_norm: Any, base_grad_norm: Callable[..., Any]) -> Any:
    """``Trainer._get_grad_norm`` — the pass over every gradient that clips and/or logs ``‖g‖`` before
    each optimizer step — handing the norm to a family optimizer, whose step then takes its finiteness
    gate from it instead of another pass (``FamilyOptimizer.accept_gradient_norm``; it checks that the
    norm covers exactly its gradients, unmodified, and ignores it otherwise)."""
    norm = base_grad_norm(model, grad_norm=grad_norm)
    accept = getattr(unwrap_optimizer(getattr(trainer, "optimizer", None)), "accept_gradient_norm", None)
    if accept is not None:
        accept(norm, model.parameters())
    return norm


_LOG_ACTIVE = "_hf_rmsuon_log_active"


def log_with_diagnostics(trainer: Any, logs: dict[str, float], start_time: float | None,
                         base_log: Callable[[dict[str, float], float | None], None]) -> None:
    """``Trainer.log`` with the optimizer's diagnostics added to training-loss entries, once even when
    the hook is reached twice (``RMSuonTrainer`` with ``install()``)."""
    if trainer.__dict__.get(_LOG_ACTIVE):
        return base_log(logs, start_time)
    trainer.__dict__[_LOG_ACTIVE] = True
    try:
        if "loss" in logs:
            logs.update(optimizer_diagnostics(trainer))
        return base_log(logs, start_time)
    finally:
        trainer.__dict__[_LOG_ACTIVE] = False
