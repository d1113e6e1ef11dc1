"""Run the benchmarks and write the report.

    python -m benchmarks.run --setting quick                    # make bench-quick (< 15 min)
    python -m benchmarks.run --setting full                     # make bench (~1 h on 2 cores)
    python -m benchmarks.run --setting full --only cost,grokking
    python -m benchmarks.run --setting full --only report       # tables + plots from the recorded JSON

Order: cost (alone, so nothing else of ours competes with its timings), then grokking, then wt2;
each writes ``<out>/results/<name>.json`` as soon as it finishes, and the report is regenerated
after each one, so an interrupted run leaves a report of what completed. Grokking and wt2 run
their independent runs on ``--workers`` single-threaded processes (default 2) and cache every
finished run: running the same command again resumes (``--fresh`` starts over).
"""

from __future__ import annotations

import argparse
import importlib
import os
import time

from . import common

BENCHMARKS = ("cost", "grokking", "wt2")
#: parts run only when named in --only (``scale``: Qwen3-0.6B shapes, ~15-30 min; also ``make bench-scale``)
EXTRA = ("scale",)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n\n")[0])
    p.add_argument("--setting", choices=common.SETTINGS, default="quick")
    p.add_argument("--only", default=",".join(BENCHMARKS),
                   help=f"comma-separated subset of {','.join(BENCHMARKS + EXTRA)},report")
    p.add_argument("--out", default=None,
                   help="output folder (default: the repository for full, runs/bench-quick for quick)")
    p.add_argument("--data_dir", default=None,
                   help="WikiText-2 folder with wiki.valid.tokens/wiki.test.tokens "
                        "(default: $HF_RMSUON_WT2_DIR or <repo>/../shared/data/wikitext-2)")
    p.add_argument("--workers", type=int, default=2, help="parallel single-threaded runs (grokking, wt2)")
    p.add_argument("--fresh", action="store_true", help="ignore cached runs")
    args = p.parse_args(argv)
    args.only = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = set(args.only) - {*BENCHMARKS, *EXTRA, "report"}
    if unknown:
        p.error(f"--only: unknown {sorted(unknown)}; choose from {', '.join(BENCHMARKS + EXTRA)}, report")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    paths = common.Paths.for_setting(args.setting, args.out)
    start = time.perf_counter()
    common.log(f"setting {args.setting}: results → {paths.results}, plots → {paths.plots}, report → {paths.report}")
    from . import report

    for name in BENCHMARKS + EXTRA:
        if name not in args.only:
            continue
        t0 = time.perf_counter()
        module = importlib.import_module(f"benchmarks.{name}")
        kwargs = {"data_dir": args.data_dir} if name != "grokking" else {}
        if name != "cost":
            kwargs.update(workers=args.workers, resume=not args.fresh)
        module.run(args.setting, paths, **kwargs)
        common.log(f"{name} finished in {time.perf_counter() - t0:.0f}s")
        try:  # a report problem must not stop the remaining benchmarks (rerun: --only report)
            report.build(args.setting, paths)
        except Exception as err:
            common.log(f"report failed ({type(err).__name__}: {err}); the JSON results are kept")
    if args.only == ["report"]:
        report.build(args.setting, paths)
    common.log(f"all done in {time.perf_counter() - start:.0f}s; report: {paths.report}")


if __name__ == "__main__":
    common.run_main_guard(main)
