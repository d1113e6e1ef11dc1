"""Launcher: run an unmodified transformers training script with the family installed.

    python -m hf_rmsuon.run train.py --optim ars2_neo --optim_args "rho=0.05,k=2" ...
    accelerate launch -m hf_rmsuon.run train.py ...
    torchrun --nproc_per_node 2 -m hf_rmsuon.run train.py ...
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
