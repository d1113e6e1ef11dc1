"""hf_rmsuon — the RMSuon optimizer family for the HuggingFace stack.

Layers (dependencies point down): ``integration`` (transformers/Accelerate/PEFT) → ``registry`` →
``optim`` (one class per algorithm, a chain of stages) → ``routing`` (one spec per tensor) →
``functional`` (pure tensor math).
"""

from .optim import ARS, AdaMuon, AdaRMSuon, ARS2Neo, FAdaRMSuon, FamilyOptimizer, Muon, PureNSMuon, RMSuon
from .registry import (
    available_optimizers,
    create_optimizer,
    get_optimizer_class,
    parse_optim_args,
    recommended_lr,
)
from .routing import RoutingReport, route_model, route_tensors

__version__ = "0.1.0"


def _register_optimizer_names() -> None:
    """Make ``TrainingArguments(optim="ars2_neo")`` work after a bare ``import hf_rmsuon``: the names
    are added to transformers' ``OptimizerNames`` when transformers loads it (never imported here, so
    the optimizers still import — quickly — without transformers)."""
    import importlib.util

    if importlib.util.find_spec("transformers") is not None:
        from .transformers_names import register_when_imported

        register_when_imported()


_register_optimizer_names()

__all__ = [
    "ARS", "AdaMuon", "AdaRMSuon", "ARS2Neo", "FAdaRMSuon", "FamilyOptimizer", "Muon", "PureNSMuon", "RMSuon",
    "RoutingReport", "available_optimizers", "create_optimizer", "get_optimizer_class", "parse_optim_args",
    "route_model", "route_tensors",
    # transformers integration (imported on first use)
    "RMSuonTrainer", "install", "optimizer_cls_and_kwargs", "recommended_lr",
]


def __getattr__(name: str):
    # The transformers integration is imported lazily so the optimizers work without transformers.
    if name in ("optimizer_cls_and_kwargs", "RMSuonTrainer", "install"):
        from . import integration

        return getattr(integration, name)
    raise AttributeError(f"module 'hf_rmsuon' has no attribute {name!r}")
