"""``python -m hf_rmsuon list [NAME]`` — the family: what each member is, its recommended learning
rate and its hyperparameters (with the ``--optim_args`` syntax)."""

from __future__ import annotations

import argparse
import sys

from .registry import (
    RECOMMENDED_LR,
    ROUTING_HPARAMS,
    SUMMARIES,
    available_optimizers,
    describe_registry,
    get_optimizer_class,
)

#: Hyperparameters that a transformers Trainer takes from TrainingArguments, not from the class defaults.
FROM_TRAINING_ARGS = {
    "lr": "--learning_rate (transformers' default 5e-05)",
    "betas": "--adam_beta1/--adam_beta2 (0.9, 0.999)",
    "eps": "--adam_epsilon (1e-08)",
    "weight_decay": "--weight_decay (0.0)",
}


def _default(value: object) -> str:
    if isinstance(value, tuple):
        return ":".join(str(v) for v in value) if value else "(none)"
    return str(value)


def describe_optimizer(name: str) -> str:
    """Every hyperparameter of ``name``: default, type, meaning, and what a Trainer uses instead."""
    cls = get_optimizer_class(name)
    params = list(cls.schema) + [p for p in ROUTING_HPARAMS if p.name not in cls.schema]
    width = max(len(p.name) for p in params)
    dwidth = max(len(_default(p.default)) for p in params)
    lines = [
        f"{name} ({cls.__name__}): {SUMMARIES.get(name, '')}",
        f"recommended learning rate: {RECOMMENDED_LR[name]:g}",
        "",
        f"{'key':<{width}}  {'default':<{dwidth}}  meaning",
    ]
    for p in params:
        lines.append(f"{p.name:<{width}}  {_default(p.default):<{dwidth}}  {p.doc} — {p.type_doc}")
        if p.name in FROM_TRAINING_ARGS:
            lines.append(f"{'':<{width}}  {'':<{dwidth}}  in a Trainer: from {FROM_TRAINING_ARGS[p.name]}")
    example = ",".join(f"{k}={v}" for k, v in (("rho", "0.05"), ("k", "5")) if k in cls.schema) or "ns_steps=5"
    lines += [
        "",
        f"--optim_args syntax: key=value pairs separated by commas, lists with ':' — e.g.\n"
        f"  --optim {name} --optim_args \"{example},betas=0.9:0.95\" --learning_rate {RECOMMENDED_LR[name]:g}",
        f"Python: hf_rmsuon.create_optimizer({name!r}, model, lr={RECOMMENDED_LR[name]:g}, ...)",
    ]
    return "\n".join(lines)


def unknown_name_message(name: str) -> str:
    from .transformers_names import suggest

    return (f"unknown optimizer {name!r}.{suggest(name, available_optimizers())} "
            f"Available: {', '.join(available_optimizers())}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hf_rmsuon", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    show = sub.add_parser("list", help="the optimizers (one line each), or one optimizer's hyperparameters")
    show.add_argument("name", nargs="?", help="one optimizer: its full hyperparameter table")
    args = parser.parse_args(argv)
    if args.command == "list":
        if args.name:
            if args.name not in available_optimizers():
                print(f"error: {unknown_name_message(args.name)}", file=sys.stderr)
                return 2
            print(describe_optimizer(args.name))
        else:
            print(describe_registry())
            print("\nlr: recommended learning rate (measured, see BENCHMARKS.md). In a transformers Trainer, lr, "
                  "betas, eps and weight decay\ncome from TrainingArguments (--learning_rate default 5e-05, "
                  "--weight_decay 0.0), not from the optimizer's defaults.\n"
                  "One optimizer's hyperparameters and the --optim_args syntax: python -m hf_rmsuon list NAME")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
