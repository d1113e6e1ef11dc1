"""``optimizer_cls_and_kwargs``: family optimizers for ``Trainer(optimizer_cls_and_kwargs=...)``.

Uses transformers' optimizer *factory protocol* (the Trainer calls ``factory()(model, **kwargs)``),
so routing sees the model. Hyperparameters are resolved in this order, later winning:
class defaults → ``TrainingArguments`` (lr, betas, eps, weight decay) → ``--optim_args`` → overrides.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import logging
import os
from collections.abc import Iterator
from typing import Any

from torch import nn

from ..optim import FamilyOptimizer
from ..registry import (
    RECOMMENDED_LR,
    available_optimizers,
    create_optimizer,
    get_optimizer_class,
    hyperparameter_schema,
    parse_optim_args,
)

#: A child of transformers' library logger: it follows transformers' verbosity (``--log_level``,
#: ``transformers.logging.set_verbosity_info()``) and prints through transformers' handler.
logger = logging.getLogger("transformers.hf_rmsuon")

#: Multi-process commands, quoted by every message that suggests one.
DDP_COMMANDS = (
    "GPUs: `accelerate launch --multi_gpu --num_processes N train.py ...` or "
    "`torchrun --nproc_per_node N train.py ...`; CPU only: add `--use_cpu` to the script's arguments "
    "(`accelerate launch --multi_gpu --num_processes N train.py ... --use_cpu`, or torchrun with "
    "`--use_cpu`) — without it accelerate starts N independent single-process runs"
)

#: True while a Trainer that runs the SAM second pass (RMSuonTrainer, or any after install()) builds
#: its optimizer; the factory refuses a SAM member otherwise, before the first forward.
_SECOND_PASS_PROVIDED: contextvars.ContextVar[bool] = contextvars.ContextVar("hf_rmsuon_second_pass", default=False)
_WARNED: set[tuple[Any, ...]] = set()


@contextlib.contextmanager
def second_pass_provided() -> Iterator[None]:
    """Mark the optimizer built inside as trained by a Trainer that runs the SAM second pass."""
    token = _SECOND_PASS_PROVIDED.set(True)
    try:
        yield
    finally:
        _SECOND_PASS_PROVIDED.reset(token)


def _is_main_process() -> bool:
    return os.environ.get("RANK", "0") == "0"


def _warn_once(key: tuple[Any, ...], message: str) -> None:
    if key not in _WARNED and _is_main_process():
        _WARNED.add(key)
        logger.warning(message)


def _truthy(value: str | None) -> bool:
    return str(value).lower() in ("1", "true", "yes")


FSDP2_COMMANDS = (
    "FSDP2: `accelerate launch --config_file recipes/accelerate_fsdp2.yaml train.py ...` (fsdp_version: 2), "
    "`--fsdp full_shard --fsdp_config '{\"version\": 2}'`, transformers' "
    "`from_pretrained(..., distributed_config=DistributedConfig(fsdp_size=N))`, or `fully_shard` in your own loop"
)


def fsdp_version(args: Any) -> int | None:
    """The FSDP version a run asks for (``args.fsdp``/``fsdp_config`` or Accelerate's environment), or None."""
    config = getattr(args, "fsdp_config", None) or {}
    explicit = config.get("version", config.get("fsdp_version"))
    if getattr(args, "fsdp", None):
        return int(explicit or 2)  # transformers' default is FSDP2
    if _truthy(os.environ.get("ACCELERATE_USE_FSDP")):
        return int(explicit or os.environ.get("FSDP_VERSION", "1"))  # Accelerate's default is FSDP1
    return None


def check_engine_supported(args: Any) -> None:
    """Refuse DeepSpeed ZeRO and FSDP1 before any model or data is loaded: they flatten parameters
    into 1-D partitions, so a matrix-track optimizer would see no matrices and a SAM pass would perturb
    fragments — training wrong without any error. FSDP2 (DTensor parameters) is supported; its layout
    (1-D mesh, ``Shard(0)``) is checked when the optimizer sees the parameters."""
    deepspeed = getattr(args, "deepspeed", None) or _truthy(os.environ.get("ACCELERATE_USE_DEEPSPEED"))
    if deepspeed:
        raise ValueError(
            "hf_rmsuon optimizers do not support DeepSpeed: ZeRO hands client optimizers flat fp32 partitions, "
            "so Newton–Schulz would see fragments instead of weight matrices. For plain Muon use DeepSpeed's "
            "built-in Muon optimizer (\"optimizer\": {\"type\": \"Muon\"} in the DeepSpeed config); for the "
            f"RMSuon family use {FSDP2_COMMANDS}; or DDP: {DDP_COMMANDS}."
        )
    version = fsdp_version(args)
    if version is not None and version != 2:
        raise ValueError(
            f"hf_rmsuon optimizers do not support FSDP version {version} (FSDP1 flattens parameters, so "
            f"matrices would be orthogonalized as fragments). Use {FSDP2_COMMANDS}; or DDP: {DDP_COMMANDS}."
        )


def check_model_supported(model: nn.Module) -> None:
    """Refuse a model wrapped in FSDP1 (flat parameters), whatever route wrapped it."""
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
    except ImportError:  # pragma: no cover - builds without distributed
        return
    if any(isinstance(m, FullyShardedDataParallel) for m in model.modules()):
        raise ValueError(f"hf_rmsuon optimizers do not support FSDP1-wrapped models (flat parameters). Use "
                         f"{FSDP2_COMMANDS}; or DDP: {DDP_COMMANDS}.")


def routing_summary(name: str, report: Any) -> str:
    """One line: tensors per track, and every flagged tensor and routing warning."""
    counts = report.counts()
    tracks = ", ".join(f"{track} {c['tensors']} tensors ({c['numel']:,} values)" for track, c in counts.items())
    flagged = [e.name for e in report.entries if e.flagged]
    line = f"hf_rmsuon {name}: {tracks}"
    if flagged:
        line += f"; flagged (routed by shape, check): {', '.join(flagged)}"
    if report.warnings:
        line += "; " + "; ".join(report.warnings)
    return line + " — full routing report at INFO level (--log_level info)"


def _check_second_pass(name: str, hyperparameters: dict[str, Any]) -> None:
    """A SAM member needs a Trainer that runs the second pass; others only miss the diagnostics."""
    from .install import is_installed

    if _SECOND_PASS_PROVIDED.get() or is_installed():
        return
    cls = get_optimizer_class(name)
    k = hyperparameters.get("k", cls.schema["k"].default if "k" in cls.schema else 0)
    if getattr(cls, "sharpness_aware", False) and k != 0:
        raise RuntimeError(
            f"{name} is a sharpness-aware (SAM) optimizer: each sync step needs a second forward/backward pass, "
            "which a plain transformers Trainer does not run (its optimizer.step() has no closure). Use "
            "hf_rmsuon.RMSuonTrainer (or mix it into your Trainer class: class MyTrainer(RMSuonTrainer, "
            "SFTTrainer)), call hf_rmsuon.install() before creating the Trainer, or start the script with "
            "`python -m hf_rmsuon.run train.py ...`. (k=0 turns SAM off.)"
        )
    _warn_once(("diagnostics",), f"hf_rmsuon: {name} in a plain Trainer trains normally, but its diagnostics "
               "(optim/energy, optim/update_rms, ...) are not logged; use hf_rmsuon.RMSuonTrainer or call "
               "hf_rmsuon.install() to get them.")


def data_parallel_group(model: nn.Module) -> Any:
    """The process group whose ranks hold identical gradients under the Trainer — DDP's, i.e. the
    default group when ``torch.distributed`` runs with several ranks and no parameter is already
    sharded (a DTensor: FSDP2 / tensor parallel). ``None`` otherwise (no work split)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return None
    from torch.distributed.tensor import DTensor

    if any(isinstance(p, DTensor) for p in model.parameters()):
        return None
    return dist.group.WORLD


class FamilyOptimizerFactory:
    """The factory object transformers instantiates and calls with the model."""

    def __call__(self, model: nn.Module, *, optimizer_name: str, **hyperparameters: Any) -> FamilyOptimizer:
        _check_second_pass(optimizer_name, hyperparameters)
        check_model_supported(model)
        optimizer = create_optimizer(optimizer_name, model, data_parallel_group=data_parallel_group(model),
                                     **hyperparameters)
        logger.info("hf_rmsuon: %s with %s", optimizer_name, hyperparameters)
        logger.info("hf_rmsuon routing:\n%s", optimizer.routing_report)
        if _is_main_process():
            logger.warning(routing_summary(optimizer_name, optimizer.routing_report))
        return optimizer


def _default_learning_rate(args: Any) -> float | None:
    """The learning rate ``type(args)`` defaults to (transformers' 5e-5; TRL's configs have their own)."""
    fields = getattr(type(args), "__dataclass_fields__", {})
    field = fields.get("learning_rate")
    return None if field is None or field.default is dataclasses.MISSING else field.default


def _warn_default_learning_rate(name: str, args: Any, lr: float) -> None:
    recommended = RECOMMENDED_LR[name]
    default = _default_learning_rate(args)
    if default is None or lr != default or max(lr, recommended) / max(min(lr, recommended), 1e-30) <= 10:
        return
    _warn_once(("lr", name, lr), (
        f"hf_rmsuon: {name} runs with learning_rate={lr:g}, the default of {type(args).__name__}, which is "
        f"{max(lr, recommended) / min(lr, recommended):.0f}× off the rate recommended for {name}: {recommended:g} "
        f"(measured; see `python -m hf_rmsuon list {name}`). Set --learning_rate {recommended:g} (or your own "
        "value) to use it and silence this warning."
    ))


def _optim_args_for(name: str, args: Any) -> dict[str, Any]:
    """``args.optim_args`` typed for ``name``: they belong to ``name`` when ``args.optim`` is ``name``
    or not a family member; a different family ``args.optim`` with ``optim_args`` is refused."""
    text = getattr(args, "optim_args", None)
    if not text:
        return {}
    optim = str(getattr(args.optim, "value", args.optim))
    if optim != name and optim in available_optimizers():
        raise ValueError(
            f"optimizer_cls_and_kwargs({name!r}, args): args.optim is {optim!r} and args.optim_args={text!r} "
            f"may be meant for it, not for {name!r}. Set args.optim={name!r} (or leave args.optim at a "
            f"non-family value), or pass {name}'s hyperparameters as keyword overrides: "
            f"optimizer_cls_and_kwargs({name!r}, args, k=..., rho=...)."
        )
    try:
        return parse_optim_args(name, text)
    except ValueError as err:
        if optim == name:
            raise
        raise ValueError(f"{err} (args.optim_args are applied to {name!r}, the optimizer named in "
                         f"optimizer_cls_and_kwargs; args.optim={optim!r} is not a family member)") from None


def optimizer_cls_and_kwargs(name: str, args: Any | None = None, **overrides: Any) -> tuple[type, dict[str, Any]]:
    """``(factory, kwargs)`` for ``Trainer(optimizer_cls_and_kwargs=...)``.

    ``args`` (a ``TrainingArguments``) supplies lr, betas, eps and weight decay and the typed
    ``args.optim_args`` (for ``name``; see :func:`_optim_args_for`); ``overrides`` win over both.
    Warns once when the lr is the arguments' own default and ~10× off the recommended rate.
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
        optim_args = _optim_args_for(name, args)
        kwargs.update(optim_args)
        if "lr" not in optim_args and "lr" not in overrides:
            _warn_default_learning_rate(name, args, args.learning_rate)
    kwargs.update(schema.validate(overrides, name))
    return FamilyOptimizerFactory, {"optimizer_name": name, **kwargs}
