"""``optimizer_cls_and_kwargs``: family optimizers for ``Trainer(optimizer_cls_and_kwargs=...)``.

Uses transformers' optimizer *factory protocol* (the Trainer calls ``factory()(model, **kwargs)``),
so routing sees the model. Hyperparameters are resolved in this order, later winning:
class defaults → ``TrainingArguments`` (lr, betas, eps, weight decay) → ``--optim_args`` → overrides.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from torch import nn

from ..optim import FamilyOptimizer
from ..registry import create_optimizer, get_optimizer_class, hyperparameter_schema, parse_optim_args

logger = logging.getLogger("hf_rmsuon")


def _truthy(value: str | None) -> bool:
    return str(value).lower() in ("1", "true", "yes")


def check_engine_supported(args: Any) -> None:
    """Refuse DeepSpeed ZeRO and FSDP1: they shard or flatten parameters, so a matrix-track
    optimizer would orthogonalize fragments and a SAM pass would perturb shards — training wrong
    without any error. FSDP2 (DTensor) support is a later goal."""
    deepspeed = getattr(args, "deepspeed", None) or _truthy(os.environ.get("ACCELERATE_USE_DEEPSPEED"))
    if deepspeed:
        raise ValueError(
            "hf_rmsuon optimizers do not support DeepSpeed (ZeRO shards and flattens parameters, so "
            "Newton–Schulz would see fragments instead of weight matrices). Train with DDP instead: "
            "`accelerate launch --multi_gpu ...` without --use_deepspeed / --deepspeed."
        )
    fsdp = getattr(args, "fsdp", None) or _truthy(os.environ.get("ACCELERATE_USE_FSDP"))
    if fsdp:
        config = getattr(args, "fsdp_config", None) or {}
        version = str(config.get("version", config.get("fsdp_version", os.environ.get("FSDP_VERSION", "1"))))
        raise ValueError(
            f"hf_rmsuon optimizers do not support FSDP (version {version}): FSDP1 flattens parameters and "
            "FSDP2/DTensor support is not implemented yet, so matrices would be orthogonalized per shard. "
            "Train with DDP instead (`accelerate launch --multi_gpu ...`, no --fsdp)."
        )


class FamilyOptimizerFactory:
    """The factory object transformers instantiates and calls with the model."""

    def __call__(self, model: nn.Module, *, optimizer_name: str, **hyperparameters: Any) -> FamilyOptimizer:
        optimizer = create_optimizer(optimizer_name, model, **hyperparameters)
        logger.info("hf_rmsuon: %s with %s", optimizer_name, hyperparameters)
        logger.info("hf_rmsuon routing:\n%s", optimizer.routing_report)
        return optimizer


def optimizer_cls_and_kwargs(name: str, args: Any | None = None, **overrides: Any) -> tuple[type, dict[str, Any]]:
    """``(factory, kwargs)`` for ``Trainer(optimizer_cls_and_kwargs=...)``.

    ``args`` (a ``TrainingArguments``) supplies lr, betas, eps and weight decay, and — when
    ``args.optim`` is ``name`` — the typed ``args.optim_args``; ``overrides`` win over both.
    """
    get_optimizer_class(name)  # unknown names fail here, listing the valid ones
    schema = hyperparameter_schema(name)
    kwargs: dict[str, Any] = {}
    if args is not None:
        check_engine_supported(args)
        from_args = {
            "lr": args.learning_rate,
            "betas": (args.adam_beta1, args.adam_beta2),
            "eps": args.adam_epsilon,
            "weight_decay": args.weight_decay,
        }
        kwargs.update(schema.validate({k: v for k, v in from_args.items() if k in schema}, name))
        if str(getattr(args.optim, "value", args.optim)) == name:
            kwargs.update(parse_optim_args(name, args.optim_args))
    kwargs.update(schema.validate(overrides, name))
    return FamilyOptimizerFactory, {"optimizer_name": name, **kwargs}
