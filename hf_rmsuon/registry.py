"""The registry: ``--optim`` name → optimizer class, its typed hyperparameter schema, and
``create_optimizer`` (routing + construction)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import Tensor, nn

from .optim import ARS, AdaMuon, AdaRMSuon, ARS2Neo, FAdaRMSuon, FamilyOptimizer, Muon, PureNSMuon, RMSuon
from .optim.base import ROUTING_HPARAMS
from .optim.hparams import Schema, parse_optim_args_string

OPTIMIZERS: dict[str, type[FamilyOptimizer]] = {
    cls.name: cls for cls in (Muon, PureNSMuon, AdaMuon, RMSuon, AdaRMSuon, FAdaRMSuon, ARS, ARS2Neo)
}


#: Recommended learning rate per member: the best of a learning-rate sweep on the WikiText-2 CPU
#: preset (Qwen3 hidden 128; WT2-offline: train wiki.valid, eval the first 1 500 lines of wiki.test;
#: line mode, batch 8, 200 steps, cosine, 5% warm-up, seed 42; eval perplexity per lr):
#:   adamw_torch   1e-3: 304   3e-3: 247   1e-2: 311
#:   muon          5e-3: 164   2e-2: 145   5e-2: 153
#:   adamuon       1e-3: 351   3e-3: 226   1e-2: 183
#:   rmsuon        1e-3: 269   3e-3: 186   1e-2: 179
#:   ada_rmsuon    1e-4: 1200  3e-4: 463   1e-3: 281   3e-3: 206
#:   ars2_neo      1e-4: 1209  3e-4: 468   1e-3: 281   3e-3: 209
#: BENCHMARKS.md's later 100-step sweeps (chosen on a dev slice) agree within ×3 and often prefer
#: larger rates; these are the more conservative values, a starting point rather than a tuned value.
#: ada_rmsuon-style updates ``E·O`` have norm ≈ E·√rank, so wider matrices want smaller rates (the
#: design documents' hidden-512 runs used 1e-4). f_ada_rmsuon and ars share ada_rmsuon's update and
#: take its rate; pure_ns_muon takes muon's.
RECOMMENDED_LR: dict[str, float] = {
    "muon": 2e-2, "pure_ns_muon": 2e-2, "adamuon": 1e-2, "rmsuon": 3e-3, "ada_rmsuon": 3e-3,
    "f_ada_rmsuon": 3e-3, "ars": 3e-3, "ars2_neo": 3e-3,
}

#: One plain-text line per member for ``python -m hf_rmsuon list`` (the class docstrings hold the formulas).
SUMMARIES: dict[str, str] = {
    "muon": "Newton-Schulz-orthogonalized momentum (= torch.optim.Muon)",
    "pure_ns_muon": "orthogonalized raw gradient, no momentum",
    "adamuon": "AdaMuon (comparator): orthogonalized sign momentum, element-wise 2nd moment",
    "rmsuon": "Muon's direction with AdamW's update energy",
    "ada_rmsuon": "orthogonalized Adam-whitened momentum, scaled by its energy",
    "f_ada_rmsuon": "ada_rmsuon with natural (Fisher-projected) weight decay",
    "ars": "ada_rmsuon + manifold-aware SAM (two passes per step)",
    "ars2_neo": "ars + Lazy SAM (sync every k steps), AGA adaptive sync, ASI adaptive rho",
}

#: Member-specific hyperparameters shown in the compact listing (when the member has them).
KEY_HPARAMS = ("momentum", "adjust_lr", "energy_scale", "natural_wd", "rho", "k", "adaptive_sync", "asi")


def recommended_lr(name: str) -> float:
    """The recommended learning rate of family member ``name`` (see ``RECOMMENDED_LR``)."""
    get_optimizer_class(name)  # unknown names fail with the list of valid ones
    return RECOMMENDED_LR[str(name)]


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
    model_or_params: nn.Module | Iterable[Tensor] | Iterable[tuple[str, Tensor]] | Iterable[dict[str, Any]],
    *,
    data_parallel_group: Any = None,
    **hyperparameters: Any,
) -> FamilyOptimizer:
    """Build ``name`` over a model (model-aware routing of its trainable parameters, by name) or over
    tensors, ``named_parameters()`` or param groups (the shape rule; names enable the patterns).

    ``data_parallel_group``: the DDP process group (ranks with identical gradients), for ``split_ns``.
    The routing report is ``optimizer.routing_report`` (``print()`` it).
    """
    cls = get_optimizer_class(name)
    if isinstance(model_or_params, nn.Module):
        model = model_or_params
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not named:
            raise ValueError(f"{type(model).__name__} has no trainable parameters (all requires_grad=False)")
        return cls(named, model=model, data_parallel_group=data_parallel_group, **hyperparameters)
    return cls(model_or_params, data_parallel_group=data_parallel_group, **hyperparameters)


def describe_registry() -> str:
    """Compact listing: one row per optimizer (summary, recommended lr, key defaults)."""
    rows = [("name", "summary", "lr", "key defaults")]
    for name, cls in OPTIMIZERS.items():
        keys = " ".join(f"{k}={cls.schema[k].default}" for k in KEY_HPARAMS if k in cls.schema)
        rows.append((name, SUMMARIES.get(name, ""), f"{RECOMMENDED_LR[name]:g}", keys))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = [f"{a:<{widths[0]}}  {b:<{widths[1]}}  {c:<{widths[2]}}  {d}".rstrip() for a, b, c, d in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)
