"""The registry: ``--optim`` name → optimizer class, its typed hyperparameter schema, and
``create_optimizer`` (routing + construction)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import Tensor, nn

from .optim import ARS, AdaMuon, AdaRMSuon, ARS2Neo, FAdaRMSuon, FamilyOptimizer, Muon, PureNSMuon, RMSuon
from .optim.base import ADAMW
from .optim.hparams import HyperParam, Schema, choice, flag, parse_optim_args_string
from .routing import LORA_POLICIES, route_model, route_tensors

OPTIMIZERS: dict[str, type[FamilyOptimizer]] = {
    cls.name: cls for cls in (Muon, PureNSMuon, AdaMuon, RMSuon, AdaRMSuon, FAdaRMSuon, ARS, ARS2Neo)
}

#: Options consumed by routing (model-aware construction), accepted next to every optimizer's own.
ROUTING_HPARAMS = Schema([
    choice("lora_policy", "both", LORA_POLICIES, "LoRA factors on the matrix track: both, B only, none"),
    HyperParam("adamw_patterns", "patterns", (), "regexes of parameter names forced onto the AdamW track"),
    HyperParam("matrix_patterns", "patterns", (), "regexes of parameter names forced onto the matrix track"),
    HyperParam("adamw_lr", "optional_float", None, "learning rate of the AdamW track (default: lr)", minimum=0.0),
    flag("no_decay_1d", True, "no weight decay on 1-D tensors (biases, norms), as transformers does"),
])


def available_optimizers() -> list[str]:
    """The registry names (the ``--optim`` values)."""
    return list(OPTIMIZERS)


def get_optimizer_class(name: str) -> type[FamilyOptimizer]:
    try:
        return OPTIMIZERS[str(name)]
    except KeyError:
        raise ValueError(f"unknown optimizer {name!r}; available: {available_optimizers()}") from None


def hyperparameter_schema(name: str) -> Schema:
    """Everything ``name`` accepts: the class's hyperparameters plus the routing options."""
    return get_optimizer_class(name).schema.extended(*ROUTING_HPARAMS)


def parse_optim_args(name: str, text: str | None) -> dict[str, Any]:
    """Typed ``--optim_args`` (``"rho=0.05,k=2,betas=0.9:0.95"``); unknown keys list the valid ones."""
    return hyperparameter_schema(name).parse_strings(parse_optim_args_string(text), name)


def create_optimizer(
    name: str,
    model_or_params: nn.Module | Iterable[Tensor] | Iterable[dict[str, Any]],
    **hyperparameters: Any,
) -> FamilyOptimizer:
    """Build ``name`` over a model (model-aware routing) or tensors/param groups (shape rule).

    The routing report is attached as ``optimizer.routing_report`` (``print()`` it).
    """
    cls = get_optimizer_class(name)
    routing = {k: hyperparameters.pop(k) for k in list(hyperparameters) if k in ROUTING_HPARAMS}
    routing = ROUTING_HPARAMS.validate(routing, name)
    opts = {**ROUTING_HPARAMS.defaults(), **routing}
    model = model_or_params if isinstance(model_or_params, nn.Module) else None
    if model is not None:
        groups, report = route_model(
            model, lora_policy=opts["lora_policy"], adamw_patterns=opts["adamw_patterns"],
            matrix_patterns=opts["matrix_patterns"], no_decay_1d=opts["no_decay_1d"],
        )
        if not groups:
            raise ValueError(f"{type(model).__name__} has no trainable parameters (all requires_grad=False)")
    else:
        if opts["adamw_patterns"] or opts["matrix_patterns"] or routing.get("lora_policy"):
            raise ValueError("adamw_patterns/matrix_patterns/lora_policy need parameter names: pass the model "
                             "to create_optimizer instead of its tensors")
        groups, report = route_tensors(model_or_params)
    if opts["adamw_lr"] is not None:
        for group in groups:
            if group["track"] == ADAMW:
                group["lr"] = opts["adamw_lr"]
    optimizer = cls(groups, **hyperparameters)
    optimizer.routing_report = report
    if model is not None and hasattr(optimizer, "attach_model"):
        optimizer.attach_model(model)
    return optimizer


def describe_registry() -> str:
    """Human-readable listing of every optimizer and its hyperparameters."""
    blocks = []
    for name, cls in OPTIMIZERS.items():
        summary = (cls.__doc__ or "").strip().splitlines()[0]
        blocks.append(f"{name}  ({cls.__name__})\n  {summary}\n{cls.schema.describe()}")
    blocks.append("routing options (every optimizer):\n" + ROUTING_HPARAMS.describe())
    return "\n\n".join(blocks)
