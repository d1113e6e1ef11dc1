"""Launcher: run an unmodified transformers training script with the family installed.

    python -m hf_rmsuon.run train.py --optim ars2_neo --optim_args "rho=0.05,k=2" ...
    accelerate launch --multi_gpu --num_processes 2 -m hf_rmsuon.run train.py ...    # 2 GPUs (DDP)
    torchrun --nproc_per_node 2 -m hf_rmsuon.run train.py ...
    accelerate launch --multi_gpu --num_processes 2 -m hf_rmsuon.run train.py ... --use_cpu  # CPU DDP

On a machine without GPUs the script must also get --use_cpu (a TrainingArguments flag), or
accelerate starts independent single-process runs instead of one DDP run.

The optimizers, their recommended learning rates and every --optim_args key:
    python -m hf_rmsuon list            # all members, one line each
    python -m hf_rmsuon list ars2_neo   # one member: hyperparameters, defaults, --optim_args syntax
"""

from __future__ import annotations

import os
import runpy
import sys


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        raise SystemExit(0 if argv else 2)
    script = argv[0]
    if not os.path.isfile(script):
        raise SystemExit(f"hf_rmsuon.run: no such script: {script!r} (usage: python -m hf_rmsuon.run SCRIPT ARGS)")
    from .integration import install

    install()
    sys.argv = [script, *argv[1:]]
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
