"""The SAM second pass inside the transformers training step (SPEC §6).

The Trainer calls ``training_step`` once per micro-batch. We record every micro-batch of the
current update step (and the RNG state before its forward). After the last one — when Accelerate
syncs gradients, so the base gradient is complete and all-reduced — we ask the optimizer whether this
step syncs; if so we perturb, replay every recorded micro-batch through the *same* ``training_step``
(same loss scaling, autocast and backward; ``no_sync`` on all but the last, so the adversarial
gradient is all-reduced exactly once), and restore. The result is exact SAM under gradient
accumulation and DDP; lazy steps cost one pass.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
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


def sam_training_step(trainer: Any, model: nn.Module, inputs: dict, num_items_in_batch: Any,
                      base_step: TrainingStep) -> torch.Tensor:
    """``training_step`` with the SAM pass; ``base_step`` is transformers' own training step."""
    optimizer = unwrap_optimizer(getattr(trainer, "optimizer", None))
    if not getattr(optimizer, "sharpness_aware", False):
        return base_step(model, inputs, num_items_in_batch)
    window: list[_MicroBatch] = trainer.__dict__.setdefault("_sam_window", [])
    rng = RNGState() if optimizer.defaults.get("replay_rng", True) else None
    loss = base_step(model, inputs, num_items_in_batch)
    window.append(_MicroBatch(inputs, num_items_in_batch, rng, loss.detach()))
    if not trainer.accelerator.sync_gradients:
        return loss
    try:
        _second_pass_if_due(trainer.accelerator, model, optimizer, window, base_step)
    finally:
        window.clear()
    return loss


@dataclass
class _MicroBatch:
    inputs: dict
    num_items_in_batch: Any
    rng: RNGState | None
    loss: torch.Tensor  # as returned by the training step (already scaled for accumulation)


def _second_pass_if_due(accelerator, model, optimizer, window: list[_MicroBatch], base_step) -> None:
    optimizer.reset_sam_pass()  # drop a pass left over from a step the grad scaler skipped
    if not optimizer.sam_pass_due():
        return
    scaler = getattr(accelerator, "scaler", None)
    optimizer.begin_sam_pass(grad_scale=scaler.get_scale() if scaler is not None else None)
    clean = torch.stack([mb.loss.float() for mb in window]).sum()
    adv = torch.zeros((), device=clean.device)
    try:
        with preserved_batchnorm_stats(model):
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
