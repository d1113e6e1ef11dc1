"""Grokking benchmark: epochs until modular addition is solved (recipes/grokking.py's
``run_grokking``: (a + b) mod 113, 30% train, one-block transformer, batch 512, betas (0.9, 0.98),
weight decay 1.0).

Protocol (the same for every contender):

1. learning-rate sweep — every value of the grid, one seed (the sweep seed); the chosen lr is the
   one with the fewest epochs to 99% test accuracy (ties, or none reaching it: fewest to 90%, then
   50%, then the highest final test accuracy). Grokking has no split other than train/test, so
   this *is* tuned on test accuracy — for every contender alike, and reported as such;
2. all seeds at the chosen lr (the sweep seed's run is reused), each capped at ``epochs`` and
   stopped once test accuracy reaches 99%. A seed that does not reach a threshold within the cap
   counts as "not reached" (∞ for medians: a median of ∞ is reported as not reached).
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Any

from . import common

NAME = "grokking"
THRESHOLDS = ("0.5", "0.9", "0.99")

#: label → (optimizer, optim_args)
CONTENDERS: dict[str, tuple[str, dict[str, Any]]] = {
    "adamw": ("adamw", {}),
    "muon": ("muon", {}),
    # torch.optim.Muon's other lr scale (Moonshot): lr·0.2·√max(m, n) gives an update RMS of ~0.2·lr,
    # AdamW-sized, so AdamW's learning rate and weight decay mean the same. With the "original" scale the
    # per-element update is ~lr/√n while the decay is lr·wd: under wd = 1.0 the weights shrink to a
    # size that cannot fit the training set (train acc ≤ 0.25 at every lr of the sweep)
    "muon (match_rms_adamw)": ("muon", {"adjust_lr": "match_rms_adamw"}),
    "rmsuon": ("rmsuon", {}),
    "ada_rmsuon": ("ada_rmsuon", {}),
    "ars": ("ars", {}),
    "ars2_neo (Lazy k=5)": ("ars2_neo", {"k": 5}),
    "ars2_neo (Lazy k=5 + AGA)": ("ars2_neo", {"k": 5, "adaptive_sync": True}),
}


@dataclass(frozen=True)
class GrokSetting:
    contenders: tuple[str, ...]
    lrs: tuple[float, ...]
    seeds: tuple[int, ...]  # the first one is the sweep seed
    epochs: int  # cap
    stop_at: float = 0.99
    #: per-contender grids that differ from ``lrs`` (with the reason recorded in the report)
    sweep_lrs: tuple[tuple[str, tuple[float, ...]], ...] = ()
    sweep_note: str = ""

    #: when a row's best lr reached 99% at the edge of its grid, add the next value of ``LADDER``
    #: beyond that edge, up to this many times (the same rule as the WT2 sweep)
    extend_edges: int = 0

    def grid(self, contender: str) -> tuple[float, ...]:
        return dict(self.sweep_lrs).get(contender, self.lrs)


#: half-decade learning-rate ladder used to extend a grid past its edge
LADDER = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1)


def beyond(lr: float, grid: list[float]) -> float | None:
    """The ladder value past ``lr`` when ``lr`` is the top (or bottom) of ``grid``."""
    side = common.at_edge(lr, grid)
    j = min(range(len(LADDER)), key=lambda j: abs(math.log(LADDER[j] / lr))) + side
    return LADDER[j] if side and 0 <= j < len(LADDER) else None


SETTINGS = {
    # make bench-quick: one lr (the one the full sweep chose for these rows), 2 seeds, a cap of 150
    # epochs — enough for the family rows to grok and for AdamW to get close (a few minutes)
    "quick": GrokSetting(("adamw", "ada_rmsuon", "ars2_neo (Lazy k=5)"), (1e-2,), (0, 1), 150),
    "full": GrokSetting(
        tuple(CONTENDERS), (3e-4, 1e-3, 3e-3), (0, 1, 2, 3, 4), 400,
        sweep_lrs=(*((c, (1e-3, 3e-3)) for c in ("ada_rmsuon", "ars", "ars2_neo (Lazy k=5)",
                                                  "ars2_neo (Lazy k=5 + AGA)")),
                   ("muon", (3e-4, 1e-3, 3e-3, 1e-2, 3e-2)), ("rmsuon", (3e-4, 1e-3, 3e-3, 1e-2)),
                   ("muon (match_rms_adamw)", (3e-3, 1e-2))),
        extend_edges=2,
        sweep_note="the grid was changed during the run. (1) lr 3e-4 was dropped for the last four rows (time "
                   "budget): AdamW, Muon and RMSuon had not reached 99% within the cap at 3e-4 (nor at 1e-3), such a "
                   "run costs the full cap (~7 min on the shared machine), and the trend favoured larger lrs. "
                   "(2) Muon and RMSuon, which reached 99% at no lr of the common grid (Muon did not even fit the "
                   "training set: train accuracy ≤ 0.18 — Muon usually wants ~0.02), got larger values: Muon "
                   "1e-2 and 3e-2, RMSuon 1e-2. (3) Then, as in the WT2 sweep, every row whose best lr reached 99% "
                   "at the edge of its grid got the next half-decade value beyond it (up to twice), so that no row "
                   "keeps an edge choice the others were allowed past. (4) Because plain Muon never fitted the training set, "
                   "a second Muon row with torch.optim.Muon's `adjust_lr=\"match_rms_adamw\"` scale (AdamW-sized "
                   "updates, so AdamW's weight decay of 1.0 means the same) was added last, grid 3e-3, 1e-2 (+ edges)",
    ),
}


def grok_unit(optim: str, optim_args: dict[str, Any], lr: float, seed: int, epochs: int,
              stop_at: float) -> dict[str, Any]:
    """One run of the recipe (in a worker process); curves rounded for the JSON."""
    recipe = common.load_recipe("grokking")
    r = recipe.run_grokking(optim, lr, seed, epochs, optim_args=optim_args or None, stop_at=stop_at,
                            device="cpu", progress=False)
    curves = {k: [round(float(v), 5) for v in r["curves"][k]] for k in ("train_acc", "test_acc", "test_loss")}
    return {"optim": optim, "optim_args": optim_args, "lr": lr, "seed": seed, "epochs_cap": epochs,
            "epochs_run": r["epochs_run"], "epochs_to": r["epochs_to"], "final": r["final"], "curves": curves,
            "seconds": r["seconds"], "config": r["config"],
            "summary": f"ep@99%={r['epochs_to']['0.99']} after {r['epochs_run']} epochs"}


def _unit(label: str, lr: float, seed: int, cfg: GrokSetting) -> common.Unit:
    optim, optim_args = CONTENDERS[label]
    return common.Unit(f"grok-{label}-lr{lr:g}-s{seed}", "benchmarks.grokking", "grok_unit",
                       {"optim": optim, "optim_args": optim_args, "lr": lr, "seed": seed, "epochs": cfg.epochs,
                        "stop_at": cfg.stop_at})


def selection_key(run: dict[str, Any]) -> tuple:
    """Smaller is better: epochs to 99%, 90%, 50% (∞ if not reached), then −final test accuracy."""
    e = run["epochs_to"]
    return tuple(math.inf if e[t] is None else e[t] for t in reversed(THRESHOLDS)) + (-run["final"]["test_acc"],)


def spread(values: list[int | None]) -> dict[str, Any]:
    """Median, min, max and quartiles with "not reached" as ∞ (JSON: None)."""
    xs = sorted(math.inf if v is None else float(v) for v in values)

    def fin(x: float) -> float | None:
        return None if math.isinf(x) else x

    if not xs:
        return {}
    q = statistics.quantiles(xs, n=4, method="inclusive") if len(xs) > 1 else [xs[0]] * 3
    return {"median": fin(statistics.median(xs)), "min": fin(xs[0]), "max": fin(xs[-1]), "q1": fin(q[0]),
            "q3": fin(q[2]), "reached": sum(not math.isinf(x) for x in xs), "n": len(xs),
            "values": [fin(x) for x in xs]}


def median_curve(runs: list[dict[str, Any]], key: str, epochs: int) -> list[float]:
    """Per-epoch median over seeds; a run that stopped early (reached 99%) holds its last value."""
    out = []
    for i in range(epochs):
        vals = [r["curves"][key][min(i, len(r["curves"][key]) - 1)] for r in runs]
        out.append(statistics.median(vals))
    return out


def seed_order(cfg: GrokSetting, chosen: dict[str, float], slow: set[str] = frozenset()) -> list[tuple[str, int]]:
    """(contender, seed) in the order they run: seed by seed, so an interrupted run keeps equal seed
    counts; contenders in ``slow`` (their sweep run never reached 99% within the cap, so every seed
    costs the full cap) go last."""
    last = [c for c in cfg.contenders if c in chosen and c in slow]
    first = [c for c in cfg.contenders if c in chosen and c not in last]
    return [(c, s) for group in (first, last) for s in cfg.seeds for c in group]


def summarize(cfg: GrokSetting, chosen: dict[str, float], done: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Per contender over the finished seeds: epochs to each threshold (median, spread), curves."""
    runs: dict[str, list[dict[str, Any]]] = {c: [] for c in chosen}
    failures, missing = [], []
    for c in chosen:
        for s in cfg.seeds:
            r = done.get(_unit(c, chosen[c], s, cfg).key)
            if r is None:
                missing.append({"contender": c, "seed": s})
            elif "error" in r:
                failures.append({"contender": c, "seed": s, "error": r["error"]})
            else:
                runs[c].append({"contender": c, **r})
    summary = {}
    for c, rs in runs.items():
        if not rs:
            continue
        summary[c] = {
            "lr": chosen[c], "seeds": [r["seed"] for r in rs],
            "epochs_to": {t: spread([r["epochs_to"][t] for r in rs]) for t in THRESHOLDS},
            "final_test_acc": {"median": statistics.median(r["final"]["test_acc"] for r in rs),
                               "min": min(r["final"]["test_acc"] for r in rs),
                               "max": max(r["final"]["test_acc"] for r in rs)},
            "seconds_per_epoch": statistics.median(r["seconds"] / max(1, r["epochs_run"]) for r in rs),
            "median_test_acc_curve": [round(v, 5) for v in median_curve(rs, "test_acc", cfg.epochs)],
            "median_train_acc_curve": [round(v, 5) for v in median_curve(rs, "train_acc", cfg.epochs)],
        }
    base = summary.get("adamw", {}).get("epochs_to", {}).get("0.99", {}).get("median")
    for s in summary.values():
        m = s["epochs_to"]["0.99"]["median"]
        s["speedup_vs_adamw_99"] = (base / m) if (base and m) else None
    return {"runs": [r for rs in runs.values() for r in rs], "summary": summary, "failures": failures,
            "missing": missing}


def run(setting: str, paths: common.Paths, workers: int = 2, resume: bool = True) -> dict[str, Any]:
    cfg = SETTINGS[setting]
    start = time.perf_counter()
    cache = paths.cache / NAME
    sweep_seed = cfg.seeds[0]
    result: dict[str, Any] = {"benchmark": NAME, "setting": setting, "config": asdict(cfg),
                              "contenders": {c: {"optim": CONTENDERS[c][0], "optim_args": CONTENDERS[c][1]}
                                             for c in cfg.contenders},
                              "environment": common.environment(), "partial": True}

    def save() -> None:
        result["seconds"] = time.perf_counter() - start
        common.write_json(paths.result(NAME), result)

    # 1. learning-rate sweep (one seed)
    grids = {c: sorted(cfg.grid(c)) for c in cfg.contenders}
    units = [_unit(c, lr, sweep_seed, cfg) for c in cfg.contenders for lr in grids[c]]
    done = common.run_units(units, cache, workers, "grokking sweep", resume)

    def best(c: str) -> dict[str, Any] | None:
        ok = [r for r in (done[_unit(c, lr, sweep_seed, cfg).key] for lr in grids[c]) if "error" not in r]
        return min(ok, key=selection_key) if ok else None

    for _ in range(cfg.extend_edges):  # a best that reached 99% at an edge: one ladder step beyond it
        new = []
        for c in cfg.contenders:
            b = best(c)
            nxt = beyond(b["lr"], grids[c]) if b and b["epochs_to"]["0.99"] is not None and len(grids[c]) > 1 \
                else None
            if nxt is not None:
                grids[c] = sorted([*grids[c], nxt])
                new.append(_unit(c, nxt, sweep_seed, cfg))
        if not new:
            break
        done = {**done, **common.run_units(new, cache, workers, "grokking sweep (edge)", resume)}
    result["grids"] = grids
    sweep, chosen = [], {}
    for c in cfg.contenders:
        rows = [done[_unit(c, lr, sweep_seed, cfg).key] for lr in grids[c]]
        ok = [r for r in rows if "error" not in r]
        for lr, r in zip(grids[c], rows):
            sweep.append({"contender": c, "lr": lr, "seed": sweep_seed, "error": r.get("error"),
                          **({k: r[k] for k in ("epochs_to", "epochs_run", "final", "seconds")} if "error" not in r
                             else {})})
        if ok:
            chosen[c] = min(ok, key=selection_key)["lr"]
    result.update(sweep=sweep, chosen_lr=chosen)
    result.update(summarize(cfg, chosen, done))
    save()
    common.log("grokking: chosen lr " + ", ".join(f"{c} {lr:g}" for c, lr in chosen.items()))

    # 2. every seed at the chosen lr (the JSON is rewritten after every finished run)
    slow = {c for c in chosen if done[_unit(c, chosen[c], sweep_seed, cfg).key]["epochs_to"]["0.99"] is None}
    order = seed_order(cfg, chosen, slow)
    units = [_unit(c, chosen[c], s, cfg) for c, s in order]

    def update(done_now: dict[str, dict[str, Any]]) -> None:
        result.update(summarize(cfg, chosen, {**done, **done_now}))
        save()

    done = {**done, **common.run_units(units, cache, workers, "grokking seeds", resume, on_update=update)}
    result.update(summarize(cfg, chosen, done))
    result["partial"] = bool(result["missing"])
    save()
    for c, s in result["summary"].items():
        e = s["epochs_to"]["0.99"]
        common.log(f"grokking: {c:<28} lr {s['lr']:g}: epochs to 99% median {e['median']} "
                   f"(min {e['min']}, max {e['max']}, reached {e['reached']}/{e['n']})")
    common.log(f"grokking: done in {result['seconds']:.0f}s → {paths.result(NAME)}")
    return result


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="grokking benchmark only (see benchmarks.run)")
    p.add_argument("--setting", choices=list(SETTINGS), default="quick")
    p.add_argument("--out", default=None)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--fresh", action="store_true")
    args = p.parse_args(argv)
    run(args.setting, common.Paths.for_setting(args.setting, args.out), args.workers, not args.fresh)


if __name__ == "__main__":
    common.run_main_guard(main)
