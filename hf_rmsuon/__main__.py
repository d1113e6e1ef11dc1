"""``python -m hf_rmsuon list`` — the registry: optimizers and their hyperparameters."""

from __future__ import annotations

import argparse

from .registry import available_optimizers, describe_registry, get_optimizer_class


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hf_rmsuon", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    show = sub.add_parser("list", help="list the optimizers and their hyperparameters")
    show.add_argument("name", nargs="?", help="one optimizer only")
    args = parser.parse_args(argv)
    if args.command == "list":
        if args.name:
            cls = get_optimizer_class(args.name)
            print(f"{args.name}  ({cls.__name__})\n{cls.__doc__}")
        else:
            print(describe_registry())
            print("\nnames:", " ".join(available_optimizers()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
