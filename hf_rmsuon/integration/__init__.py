"""transformers / Accelerate / PEFT integration (depends on the registry; nothing depends on it)."""

from ..transformers_names import register_optimizer_names
from .factory import FamilyOptimizerFactory, check_engine_supported, optimizer_cls_and_kwargs
from .install import install, is_installed
from .sam_step import optimizer_diagnostics, sam_training_step, unwrap_optimizer
from .trainer import RMSuonTrainer

register_optimizer_names()

__all__ = [
    "FamilyOptimizerFactory", "RMSuonTrainer", "check_engine_supported", "install", "is_installed",
    "optimizer_cls_and_kwargs", "optimizer_diagnostics", "register_optimizer_names", "sam_training_step",
    "unwrap_optimizer",
]
