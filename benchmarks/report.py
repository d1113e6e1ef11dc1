"""BENCHMARKS.md and the PNG plots, generated from the recorded JSON (``<out>/results/*.json``):
every number in a table and every line in a plot comes from the same files.

    python -m benchmarks.report --setting full      # BENCHMARKS.md + benchmarks/plots/*.png
    python -m benchmarks.report --setting quick     # runs/bench-quick/{BENCHMARKS.md,plots/}
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
from pathlib import Path
from typing import Any

from . import common

CLAIMS = {
    "grokking": "grokking about 4× sooner than AdamW (epoch 228 → 54)",
    "wt2": "WikiText-2 perplexity after 5 epochs: AdaRMSuon 83.9 and ARS 80.9 against AdamW 104.7",
    "lazy": "lazy SAM (ARS2-Neo) at a fraction of SAM's cost",
}
#: WT2 row → the grokking row with the same optimizer and options
GROK_NAME = {"ada_rmsuon (reference)": "ada_rmsuon", "ars (k=1)": "ars"}
FAMILY_GROK = ("muon", "muon (match_rms_adamw)", "rmsuon", "ada_rmsuon", "ars", "ars2_neo (Lazy k=5)", "ars2_neo (Lazy k=5 + AGA)")


def load(paths: common.Paths) -> dict[str, Any]:
    data = {}
    for name in ("cost", "grokking", "wt2", "reference", "scale", "fsdp2"):
        path = paths.result(name)
        if path.is_file():
            data[name] = common.read_json(path)
    return data


# --------------------------------------------------------------------------------------------------
# formatting helpers
# --------------------------------------------------------------------------------------------------


def f(x: Any, digits: int = 2) -> str:
    if x is None:
        return "—"
    if isinstance(x, float) and (math.isnan(x) or math.isinf(x)):
        return "∞" if x > 0 else "nan"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def table(head: list[str], rows: list[list[Any]], align: str | None = None) -> str:
    align = align or "l" + "r" * (len(head) - 1)
    sep = ["---:" if a == "r" else "---" for a in align]
    lines = ["| " + " | ".join(head) + " |", "| " + " | ".join(sep) + " |"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def epochs_cell(s: dict[str, Any], cap: int) -> str:
    """median (min–max), not-reached seeds shown as >cap."""
    if not s:
        return "—"

    def one(v: float | None) -> str:
        return f">{cap}" if v is None else f"{v:.0f}"

    return f"{one(s['median'])} ({one(s['min'])}–{one(s['max'])}; {s['reached']}/{s['n']})"


def run_minutes(name: str, d: dict[str, Any]) -> float:
    """Wall-clock minutes of all recorded runs (resumed runs included; the runs were sequential per
    process, and grokking and wt2 ran side by side, one process each)."""
    if name == "grokking":
        keys = {(r["contender"], r["lr"], r["seed"]) for r in d.get("sweep", [])}
        secs = sum(r.get("seconds", 0) for r in d.get("sweep", []))
        secs += sum(r.get("seconds", 0) for r in d.get("runs", []) if (r["contender"], r["lr"], r["seed"]) not in keys)
        return secs / 60
    if name == "wt2":
        runs = [*d.get("sweep", []), *d.get("main", {}).values(), *d.get("extra_seeds", []), *d.get("long", {}).values()]
        return sum(r.get("train_seconds") or 0 for r in runs) / 60
    return d.get("seconds", 0) / 60


def finite(x: float | None) -> float:
    """``x`` for sorting: missing or NaN sorts last."""
    return x if x is not None and not math.isnan(x) else math.inf


def edge(lr: float | None, grid: list[float]) -> str:
    return " *(edge)*" if lr is not None and common.at_edge(lr, grid) else ""


def rel(path: Path, base: Path) -> str:
    return os.path.relpath(path, base)


# --------------------------------------------------------------------------------------------------
# plots
# --------------------------------------------------------------------------------------------------


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_cost(cost: dict[str, Any], out: Path) -> list[Path]:
    plt = _plt()
    files = []
    rows = cost["optimizer_step"]["rows"]
    names = list(rows)
    med = [rows[n]["wall"]["median_ms"] for n in names]
    lo = [rows[n]["wall"]["median_ms"] - rows[n]["wall"]["q1_ms"] for n in names]
    hi = [rows[n]["wall"]["q3_ms"] - rows[n]["wall"]["median_ms"] for n in names]
    cpu = [rows[n]["cpu"]["median_ms"] for n in names]
    fig, ax = plt.subplots(figsize=(9, 0.38 * len(names) + 1.5))
    y = range(len(names))
    ax.barh([i + 0.2 for i in y], med, height=0.4, xerr=[lo, hi], label="wall-clock (median, IQR)", color="C0")
    ax.barh([i - 0.2 for i in y], cpu, height=0.4, label="thread CPU time (median)", color="C1", alpha=0.7)
    ax.set_yticks(list(y), names)
    ax.invert_yaxis()
    ax.set_xlabel("optimizer.step() time [ms]")
    ax.set_title(f"Optimizer step on the CPU Qwen3 preset's {cost['optimizer_step']['n_params']:,} parameters\n"
                 "(1 thread, interleaved rounds, random gradients)")
    ax.legend(loc="upper right", framealpha=0.95)
    fig.tight_layout()
    files.append(out / "cost_optimizer_step.png")
    fig.savefig(files[-1], dpi=110)
    plt.close(fig)

    rows = cost["training_step"]["rows"]
    names = list(rows)
    fig, ax = plt.subplots(figsize=(9, 0.5 * len(names) + 1.6))
    for i, n in enumerate(names):
        r = rows[n]
        ax.barh(i, r["wall"]["mean_ms"], height=0.6, color="C0", alpha=0.5,
                label="mean step (all steps)" if i == 0 else None)
        for kind, color, mark in (("lazy", "C2", "o"), ("sync", "C3", "s"), ("plain", "C1", "D")):
            if f"wall_{kind}" in r:
                ax.plot(r[f"wall_{kind}"]["median_ms"], i, mark, color=color, ms=8,
                        label=f"median {kind} step" if not any(
                            f"wall_{kind}" in rows[m] for m in names[:i]) else None)
    ax.set_yticks(range(len(names)), names)
    ax.invert_yaxis()
    ax.set_xlabel("training step (forward + backward + step) [ms]")
    ax.set_title(f"Training-step wall-clock, CPU preset, batch {cost['training_step']['batch_size']}×"
                 f"{cost['training_step']['context_length']} (1 thread)")
    ax.legend(loc="upper right", fontsize=8, framealpha=0.95)
    fig.tight_layout()
    files.append(out / "cost_training_step.png")
    fig.savefig(files[-1], dpi=110)
    plt.close(fig)

    rows = cost["optimizer_step"]["rows"]
    names = [n for n in rows if n not in ("muon (ns fp32)", "muon (ns auto)", "ada_rmsuon (ns fp32)")]
    fig, ax = plt.subplots(figsize=(8, 0.35 * len(names) + 1.4))
    ax.barh(range(len(names)), [rows[n]["memory"]["bytes_per_param"] for n in names], color="C4")
    for i, n in enumerate(names):
        ax.text(rows[n]["memory"]["bytes_per_param"] + 0.1, i, f"{rows[n]['memory']['bytes_per_param']:.1f}",
                va="center", fontsize=8)
    ax.set_yticks(range(len(names)), names)
    ax.invert_yaxis()
    ax.set_xlabel("optimizer state [bytes per model parameter] (fp32 parameters: 4 bytes each)")
    ax.set_title("Optimizer-state memory after the timed steps")
    fig.tight_layout()
    files.append(out / "cost_memory.png")
    fig.savefig(files[-1], dpi=110)
    plt.close(fig)
    return files


def plot_grokking(grok: dict[str, Any], out: Path) -> list[Path]:
    plt = _plt()
    files = []
    summary = grok.get("summary", {})
    if not summary:
        return files
    cap = grok["config"]["epochs"]
    fig, ax = plt.subplots(figsize=(9, 5))
    for i, (c, s) in enumerate(summary.items()):
        curve = s["median_test_acc_curve"]
        ax.plot(range(1, len(curve) + 1), curve, label=f"{c} (lr {s['lr']:g})", color=f"C{i}",
                ls="--" if c == "adamw" else "-")
    ax.axhline(0.99, color="grey", lw=0.8, ls=":")
    ax.set_xlabel("epoch")
    ax.set_ylabel("test accuracy (median over seeds)")
    ax.set_xlim(1, cap)
    ax.set_xscale("log")
    n = max(len(s["seeds"]) for s in summary.values())
    ax.set_title(f"Grokking (a+b) mod 113: median test accuracy over {n} seeds\n"
                 "(a run stopped at 99% holds its last value)")
    ax.legend(fontsize=8, loc="upper left")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    files.append(out / "grokking_curves.png")
    fig.savefig(files[-1], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(9, 4.5))
    names = list(summary)
    for i, c in enumerate(names):
        for t, mark, dx in (("0.5", "^", -0.25), ("0.9", "s", 0.0), ("0.99", "o", 0.25)):
            vals = summary[c]["epochs_to"][t]["values"]
            xs = [v if v is not None else cap * 1.06 for v in vals]
            ys = [i + dx + (0.03 * (k - len(vals) / 2) if v is None else 0) for k, v in enumerate(vals)]
            ax.scatter(xs, ys, marker=mark, color=f"C{['0.5', '0.9', '0.99'].index(t)}", alpha=0.7,
                       label=f"epochs to {float(t):.0%}" if i == 0 else None)
    ax.axvline(cap, color="grey", ls=":", lw=0.8)
    ax.text(cap * 1.06, -0.6, "not\nreached", color="grey", fontsize=8, ha="center")
    ax.set_yticks(range(len(names)), names)
    ax.set_ylim(len(names) - 0.5, -0.9)
    ax.set_xlim(0, cap * 1.12)
    ax.set_xlabel("epochs (each seed; points right of the cap never reached the threshold)")
    ax.set_title("Grokking: epochs to 50/90/99% test accuracy, per seed")
    ax.legend(fontsize=8, loc="upper left")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    files.append(out / "grokking_epochs.png")
    fig.savefig(files[-1], dpi=110)
    plt.close(fig)
    return files


def plot_wt2(wt2: dict[str, Any], out: Path) -> list[Path]:
    plt = _plt()
    files = []
    main = {c: r for c, r in wt2.get("main", {}).items() if "error" not in r}
    if main:
        fig, axes = plt.subplots(1, 2, figsize=(13, 5))
        for i, (c, r) in enumerate(main.items()):
            style = "--" if c == "adamw" else ("-" if i < 10 else "-.")
            for ax, split in zip(axes, ("test", "dev")):
                pts = r["curves"][split]
                if pts:
                    ax.plot([p[0] for p in pts], [p[2] for p in pts], style, marker=".", color=f"C{i % 10}",
                            label=f"{c} (lr {r['lr']:.2g})")
        sub = wt2["config"]["test_subset"]
        axes[0].set_title(f"WT2-offline: test perplexity (first {sub} test chunks) vs step" if sub
                          else "WT2-offline: test perplexity vs step")
        axes[1].set_title("held-out dev (last 5% of the training lines) perplexity vs step")
        for ax in axes:
            ax.set_xlabel("optimizer step (batch 8 × 128 tokens)")
            ax.set_ylabel("perplexity")
            ax.set_yscale("log")
            ax.grid(alpha=0.3, which="both")
        lows = [p[2] for r in main.values() for p in r["curves"]["test"]]
        if lows:
            axes[0].set_ylim(min(lows) * 0.95, min(lows) * 3)
        lows = [p[2] for r in main.values() for p in r["curves"]["dev"]]
        if lows:
            axes[1].set_ylim(min(lows) * 0.95, min(lows) * 3)
        axes[0].legend(fontsize=7)
        fig.tight_layout()
        files.append(out / "wt2_curves.png")
        fig.savefig(files[-1], dpi=110)
        plt.close(fig)
    long = {c: r for c, r in wt2.get("long", {}).items() if "error" not in r}
    if long:
        fig, axes = plt.subplots(1, 3, figsize=(17, 4.8))
        colors = {c: f"C{i}" for i, c in enumerate(dict.fromkeys(r.get("contender", n) for n, r in long.items()))}
        for name, r in long.items():
            color = colors[r.get("contender", name)]
            factor = r.get("lr_factor", 1.0)  # solid: the sweep's lr; dashed/dotted: smaller; dash-dot: larger
            ls = "-" if factor == 1 else "-." if factor > 1 else "--" if factor > 0.2 else ":"
            label = f"{name} (lr {r['lr']:.2g})"
            for ax, split in zip(axes, ("test", "dev")):
                pts = r["curves"][split]
                ax.plot([p[1] for p in pts], [p[2] for p in pts], ls=ls, marker=".", color=color, label=label)
            tl = r["curves"]["train_loss"]
            spe = r["steps_per_epoch"]
            axes[2].plot([p[0] / spe for p in tl], [math.exp(p[1]) for p in tl], ls=ls, color=color, alpha=0.8,
                         label=label)
        axes[0].set_title("long runs: test perplexity (whole file) vs epoch")
        axes[1].set_title("dev perplexity vs epoch (early stopping reads this)")
        axes[2].set_title("training perplexity exp(loss) vs epoch")
        for ax in axes[:2]:
            ax.set_ylabel("perplexity")
            lows = [p[2] for r in long.values() for p in r["curves"]["test" if ax is axes[0] else "dev"]
                    if math.isfinite(p[2])]
            if lows:
                ax.set_ylim(min(lows) * 0.95, min(lows) * 2.2)
        for ax in axes:
            ax.set_xlabel("epoch")
        axes[2].set_yscale("log")
        for ax in axes:
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize=7)
        fig.tight_layout()
        files.append(out / "wt2_overfitting.png")
        fig.savefig(files[-1], dpi=110)
        plt.close(fig)
    return files


# --------------------------------------------------------------------------------------------------
# sections
# --------------------------------------------------------------------------------------------------


def recipe_lrs() -> str:
    """The recipes' per-optimizer default learning rates, as quoted in the recommendations."""
    table_ = common.load_recipe("_common").RECOMMENDED_LR
    return ", ".join(f"{name} {lr:g}" for name, lr in table_.items() if not name.endswith("_fused"))


def long_selected(wt2: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per contender, the long run chosen on dev (its best-dev epoch is where early stopping stops)."""
    summary = wt2.get("summary", {})
    long = summary.get("long", {})
    chosen = summary.get("long_selected", {})
    return {c: long[n] for c, n in chosen.items() if n in long}


def long_ratio(wt2: dict[str, Any]) -> str:
    """The long-horizon comparison (closer to the claim's 5 epochs than the 400-step table): test ppl at
    each contender's best-dev epoch, lr picked on dev among the long runs' rates."""
    sel = long_selected(wt2)
    a = sel.get("adamw", {})
    if not a.get("test_at_best_dev"):
        return ""
    out = [f"{c} {r['test_at_best_dev']:.1f} ({r['test_at_best_dev'] / a['test_at_best_dev']:.2f}×, lr {r['lr']:.2g}, "
           f"epoch {r['best_dev_epoch']:.0f})" for c, r in sel.items() if c != "adamw" and r.get("test_at_best_dev")]
    return (f" Over {a['epochs']:.0f} epochs with early stopping on dev (lr picked on dev among the long runs'): AdamW "
            f"{a['test_at_best_dev']:.1f} (lr {a['lr']:.2g}, epoch {a['best_dev_epoch']:.0f}); " + "; ".join(out)
            + ".") if out else ""


def sam_grid(wt2: dict[str, Any]) -> list[dict[str, Any]]:
    """ARS2-Neo settings compared at the comparison budget: the two SAM rows of the main table and the
    ρ/k variants, each as {k, rho, dev, test, sync, seconds, name}."""
    from hf_rmsuon.registry import hyperparameter_schema, parse_optim_args

    from .wt2 import CONTENDERS, SAM_BASE

    rows = wt2.get("summary", {}).get("rows", {})
    out = []

    def opts(name: str, args: str) -> dict[str, float]:  # k and ρ as the optimizer reads its --optim_args
        optim = CONTENDERS[name][0]
        values = {**hyperparameter_schema(optim).defaults(), **parse_optim_args(optim, args)}
        return {"k": values["k"], "rho": values["rho"]}

    for name in ("ars (k=1)", "ars2_neo (Lazy k=5)"):
        r = rows.get(name)
        if r and not r.get("error"):
            args = wt2["contenders"][name]["optim_args"]
            out.append({"name": name, **opts(name, args), "dev": r["final_dev_ppl"], "test": r["final_test_ppl"],
                        "sync": r.get("sync_ratio"), "seconds": r.get("train_seconds"), "lr": r["lr"]})
    for name, r in wt2.get("summary", {}).get("sam_variants", {}).items():
        out.append({"name": f"ars2_neo ({name})", **opts(SAM_BASE, r["optim_args"]), "dev": r["final_dev_ppl"],
                    "test": r["final_test_ppl"], "sync": r.get("sync_ratio"), "seconds": r.get("train_seconds"),
                    "lr": r["lr"]})
    return out


def verdicts(data: dict[str, Any]) -> tuple[list[str], list[str]]:
    """(claim lines, recommendation lines), derived from the data."""
    claims, recs = [], []
    grok = data.get("grokking", {})
    gs = grok.get("summary", {})
    if gs and "adamw" in gs:
        cap = grok["config"]["epochs"]
        a = gs["adamw"]["epochs_to"]["0.99"]["median"]
        fam = {c: gs[c]["epochs_to"]["0.99"]["median"] for c in FAMILY_GROK if c in gs}
        reached = {c: m for c, m in fam.items() if m is not None}
        named = {c: m for c, m in reached.items() if c.startswith(("ada_rmsuon", "ars"))}  # the claim's optimizers
        if reached:
            best = min(reached, key=reached.get)
            a_txt = f"{a:.0f}" if a else f">{cap} (not reached)"

            def speedup(m: float) -> float:
                return (a if a else cap) / m

            ratio = statistics.median(speedup(m) for m in named.values()) if named else speedup(reached[best])
            verdict = "**held**" if ratio >= 3 else ("**partly held**" if ratio >= 1.5 else "**did not hold**")
            others = ", ".join(f"{c} {f(m, 0) if m else '>' + str(cap)}" for c, m in fam.items())
            claims.append(
                f"- Grokking — claim: {CLAIMS['grokking']}. Here: AdamW median {a_txt} epochs to 99% test accuracy; "
                f"the AdaRMSuon/ARS members {min(named.values()):.0f}–{max(named.values()):.0f} "
                f"({'≥' if not a else ''}{ratio:.1f}× sooner, median over them) → {verdict}"
                + (f"; fastest family member {best} {reached[best]:.0f} ({speedup(reached[best]):.1f}×)" if best not in
                   named else "")
                + (" — orthogonalized updates of AdamW's size grok at least as fast without the AdaRMSuon/ARS machinery, so "
                   "the speed-up is not specific to the claim's optimizers" if best.startswith("muon") else "")
                + f". All family medians: {others}." if named else
                f"- Grokking — claim: {CLAIMS['grokking']}. Here: AdamW median {a_txt}; fastest family member {best} "
                f"{reached[best]:.0f} → {verdict}. All family medians: {others}.")
        else:
            claims.append(f"- Grokking — claim: {CLAIMS['grokking']}. Here no family member reached 99% within "
                          f"{cap} epochs (median) → **did not hold**.")
    elif grok:
        claims.append("- Grokking — incomplete (see the grokking section).")
    else:
        claims.append("- Grokking — **not measured** (no results/grokking.json).")

    wt2 = data.get("wt2", {})
    rows = wt2.get("summary", {}).get("rows", {})
    if rows and rows.get("adamw", {}).get("final_test_ppl"):
        a = rows["adamw"]["final_test_ppl"]
        parts = []
        ratios = {}
        for c in ("ada_rmsuon (reference)", "ada_rmsuon (rms)", "ars (k=1)", "ars2_neo (Lazy k=5)"):
            if rows.get(c, {}).get("final_test_ppl"):
                ratios[c] = rows[c]["final_test_ppl"] / a
                parts.append(f"{c} {rows[c]['final_test_ppl']:.1f} ({ratios[c]:.2f}× AdamW)")
        best_ratio = min(ratios.values()) if ratios else None
        best_all = min(rows, key=lambda c: finite(rows[c].get("final_test_ppl")))
        extra = ""
        if best_all not in ratios and best_all != "adamw" and rows[best_all].get("final_test_ppl"):
            extra = (f" At {wt2['config']['main_steps']} steps the best row is {best_all}: "
                     f"{rows[best_all]['final_test_ppl']:.1f} "
                     f"({rows[best_all]['final_test_ppl'] / a:.2f}× AdamW) — the gain over AdamW is not specific to "
                     "the AdaRMSuon/ARS members.")
        verdict = ("**held (relative gain of similar size)**" if best_ratio is not None and best_ratio <= 0.85 else
                   "**partly held (smaller gain)**" if best_ratio is not None and best_ratio < 0.97 else
                   "**did not hold**")
        sel = long_selected(wt2)
        la = sel.get("adamw", {})
        named_long = {c: r["test_at_best_dev"] / la["test_at_best_dev"] for c, r in sel.items()
                      if c.startswith(("ada_rmsuon", "ars")) and r.get("test_at_best_dev") and la.get("test_at_best_dev")}
        if named_long:
            lr_ = min(named_long.values())
            long_verdict = ("**held**" if lr_ <= 0.85 else "**partly held (smaller gain)**" if lr_ < 0.97 else
                            "**did not hold**")
            verdict = (f"{verdict} at {wt2['config']['main_steps']} steps; at the long horizon ({la['epochs']:.0f} "
                       f"epochs, early stopping on dev) best AdaRMSuon/ARS ratio {lr_:.2f}× AdamW → {long_verdict}")
        claims.append(
            f"- WT2 — claim: {CLAIMS['wt2']} (ratios 0.80 and 0.77). Here (CPU model, WT2-offline, "
            f"{wt2['config']['main_steps']} steps ≈ {f(rows['adamw'].get('epochs'))} epochs): AdamW {a:.1f}; "
            + "; ".join(parts) + f" → {verdict}.{extra}" + long_ratio(wt2)
            + " Absolute perplexities are not comparable with the claim's (smaller model, 1/10 of the data).")
    elif wt2:
        claims.append("- WT2 — incomplete (see the WT2 section).")
    else:
        claims.append("- WT2 — **not measured** (no results/wt2.json).")

    long = long_selected(wt2)
    if long:
        bits = []
        for c, r in long.items():
            if r.get("best_test_ppl") and r.get("final_test_ppl"):
                if r["final_test_ppl"] > r["best_test_ppl"] * 1.01:
                    bits.append(f"{c} (lr {r['lr']:.2g}) over-fits: best test ppl {r['best_test_ppl']:.1f} at epoch "
                                f"{r['best_epoch']:.0f}, {r['final_test_ppl']:.1f} at epoch {r['epochs']:.0f}")
                else:
                    bits.append(f"{c} does not over-fit within {r['epochs']:.0f} epochs (test ppl "
                                f"{r['final_test_ppl']:.1f} at the end, its best)")
        claims.append("- Over-fitting on WT2 (the documents describe it): " + "; ".join(bits) + ".")

    cost = data.get("cost", {})
    if cost:
        tr = cost["summary"]["training_step_ratios"]
        k5 = tr.get("ars2_neo (k=5, Lazy)", {})
        k1 = tr.get("ars2_neo (k=1)", {})
        if k5 and k1:
            frac = k5["mean_vs_ada_rmsuon"] / k1["mean_vs_ada_rmsuon"]
            overhead_k5 = k5["mean_vs_ada_rmsuon"] - 1
            overhead_k1 = k1["mean_vs_ada_rmsuon"] - 1
            quality = ""
            if rows.get("ars (k=1)", {}).get("final_test_ppl") and rows.get("ars2_neo (Lazy k=5)", {}).get(
                    "final_test_ppl"):
                quality = (f" Quality at equal steps (WT2 test ppl): k=1 {rows['ars (k=1)']['final_test_ppl']:.1f}, "
                           f"Lazy k=5 {rows['ars2_neo (Lazy k=5)']['final_test_ppl']:.1f}.")
            verdict = "**held**" if overhead_k5 <= 0.5 * overhead_k1 else "**did not hold**"
            claims.append(
                f"- Lazy SAM — claim: {CLAIMS['lazy']}. Here a Lazy k=5 run's mean training step is "
                f"{k5['mean_vs_ada_rmsuon']:.2f}× an ada_rmsuon step against {k1['mean_vs_ada_rmsuon']:.2f}× for "
                f"SAM on every step (k=1): {frac:.2f} of SAM's step time, {overhead_k5 / overhead_k1:.0%} of its "
                f"overhead → {verdict}.{quality}")
    else:
        claims.append("- Lazy SAM cost — **not measured** (no results/cost.json).")

    # recommendations
    chosen_w = wt2.get("chosen_lr", {})
    chosen_g = grok.get("chosen_lr", {})
    if chosen_w or chosen_g:
        lines = []
        for c in [*chosen_w, *(g for g in chosen_g if g not in GROK_NAME.values() and g not in chosen_w)]:
            w = f"{chosen_w[c]:.3g}" if c in chosen_w else "—"
            gname = GROK_NAME.get(c, c)
            g = f"{chosen_g[gname]:.3g}" if gname in chosen_g else "—"
            if gs.get(gname, {}).get("epochs_to", {}).get("0.99", {}).get("reached") == 0:
                g = "none grokked"
            lines.append(f"{c} {w} / {g}")
        grid = wt2.get("grid", {})
        edges = [c for c, lr in chosen_w.items() if c in grid and len(grid[c]) > 1 and lr in (min(grid[c]), max(grid[c]))]
        recs.append("- Learning rates, WT2 (chosen on the held-out dev slice) / grokking (chosen by epochs to 99%): "
                    + "; ".join(lines) + ". The recipes' defaults when `--learning_rate` is not given "
                    "(`recipes/_common.py`: " + recipe_lrs() + ") are more conservative than some of these "
                    "100-step choices; the long runs' smaller-lr rows show what a multi-epoch budget prefers"
                    + (f"; still at the top of the (extended) WT2 grid: {', '.join(edges)}" if edges else "") + ".")
    if rows.get("ada_rmsuon (reference)") and rows.get("ada_rmsuon (rms)"):
        ref, rms = rows["ada_rmsuon (reference)"], rows["ada_rmsuon (rms)"]
        better = "reference" if ref["final_dev_ppl"] <= rms["final_dev_ppl"] else "rms"
        recs.append(f"- `energy_scale`: **{better}** (dev ppl reference {ref['final_dev_ppl']:.1f} at lr "
                    f"{ref['lr']:.3g}, rms {rms['final_dev_ppl']:.1f} at lr {rms['lr']:.3g}; each at its own swept lr). "
                    "`reference` needs ~√rank smaller learning rates than AdamW; `rms` takes AdamW-like ones.")
    grid = sam_grid(wt2)
    spreads = [(max(v) - min(v)) / statistics.fmean(v) for r in rows.values()
               if len(v := [x for x in r.get("final_test_ppl_values") or [] if math.isfinite(x)]) > 1]
    noise = (f" One seed each; the 2-seed rows of the comparison differ by up to {max(spreads):.1%} between seeds, "
             "so smaller gaps are noise." if spreads else " One seed each.")
    by_k = {g["k"]: g for g in grid if g["rho"] == 0.1}
    if len(by_k) > 1:
        best = min(by_k.values(), key=lambda g: finite(g["dev"]))
        lazy = [g for g in by_k.values() if g["k"] > 1 and g["dev"] <= best["dev"] * 1.02]
        pick = max(lazy, key=lambda g: g["k"]) if lazy else best
        agarow = rows.get("ars2_neo (Lazy k=5 + AGA)")
        aga = (f"; Lazy k=5 + AGA {agarow['final_dev_ppl']:.1f} (sync ratio {f(agarow.get('sync_ratio'))})"
               if agarow else "")
        recs.append(f"- `k`: **{pick['k']}** — the largest k within 2% of the best dev ppl (best: k={best['k']}); "
                    "dev ppl at equal steps, ρ = 0.1: "
                    + ", ".join(f"k={k} {g['dev']:.1f}" for k, g in sorted(by_k.items())) + f"{aga}; "
                    "a sync step costs ~2 forward–backward passes, a Lazy step ~1 (cost above)." + noise)
    by_rho = {g["rho"]: g for g in grid if g["k"] == 5}
    if len(by_rho) > 1:
        best = min(by_rho.values(), key=lambda g: finite(g["dev"]))
        recs.append(f"- `rho`: **{best['rho']:g}** — dev ppl at k = 5: "
                    + ", ".join(f"ρ={r:g} {g['dev']:.1f}" for r, g in sorted(by_rho.items()))
                    + f" (ρ varied with the lr fixed at {best['lr']:.3g}).{noise}")
    else:
        recs.append("- `rho`: 0.1 (the default) — ρ was **not swept** here; every SAM row uses it.")
    lg = long_selected(wt2)
    a, fam = lg.get("adamw"), {c: r for c, r in lg.items() if c != "adamw" and r.get("best_dev_epoch")}
    if a and a.get("best_dev_epoch") and fam:
        ep = [r["best_dev_epoch"] for r in fam.values()]
        train = [math.exp(r["final_train_loss"]) for r in fam.values() if r.get("final_train_loss") is not None]
        worst = max(fam.items(), key=lambda kv: kv[1]["final_test_ppl"] / kv[1]["best_test_ppl"])
        smaller = [c for c, r in lg.items() if r.get("lr_factor", 1.0) < 1]
        recs.append(
            "- Multi-epoch training on small data: evaluate every epoch on a held-out split and keep the best "
            "checkpoint (`load_best_model_at_end=True`). On dev, AdamW peaked at epoch "
            f"{a['best_dev_epoch']:.0f}, the family rows at epochs {min(ep):.0f}–{max(ep):.0f}: they fit the "
            f"training set faster (final train ppl {min(train):.0f}–{max(train):.0f} vs AdamW's "
            f"{math.exp(a['final_train_loss']):.0f}) and over-fit harder (final / best test ppl up to "
            f"{worst[1]['final_test_ppl'] / worst[1]['best_test_ppl']:.2f} for {worst[0]}, AdamW "
            f"{a['final_test_ppl'] / a['best_test_ppl']:.2f})."
            + (f" For several epochs, use a smaller lr than a 100-step sweep picks: {len(smaller)} of {len(lg)} "
               "contenders did better on dev at a third of it or less." if smaller else ""))
    return claims, recs


def cost_section(cost: dict[str, Any], plots: dict[str, str]) -> list[str]:
    out = ["## Cost", ""]
    env = cost["environment"]
    out.append(f"Measured in one process, 1 thread, on the {cost['optimizer_step']['n_params']:,} parameters of the CPU "
               f"Qwen3 preset ({cost['preset_source']}; {cost['optimizer_step']['matrix_params']:,} on the matrix "
               f"track), rounds interleaved (the contenders take turns, start rotating), "
               f"{cost['config']['opt_rounds']} timed rounds after {cost['config']['opt_warmup']} warm-up. "
               f"Load average at start {f(env['load_average'][0])} on {env['cpu_count']} cores (other work shared "
               "the machine): wall-clock is what a user sees, thread CPU time is the less noisy check.")
    out += ["", "### Optimizer step", ""]
    s = cost["summary"]["optimizer_step_ratios"]
    rows = []
    for n, r in cost["optimizer_step"]["rows"].items():
        kinds = ", ".join(f"{k} {r[f'wall_{k}']['median_ms']:.1f}" for k in ("lazy", "sync") if f"wall_{k}" in r)
        rows.append([n, f(r["wall"]["median_ms"]), f"{f(r['wall']['q1_ms'])}–{f(r['wall']['q3_ms'])}",
                     f(r["cpu"]["median_ms"]), f(s[n]["vs_adamw"]), f(s[n]["vs_torch_muon"]), kinds or "—"])
    out.append(table(["optimizer", "median ms", "IQR ms", "CPU ms", "× AdamW", "× torch Muon+AdamW",
                      "by step kind (median ms)"], rows, "lrrrrrl"))
    out += ["", "SAM rows: on sync steps the second pass is recorded (untimed) and `step()` timed alone; a Lazy "
            "step is timed whole (it injects the stored shear force; with AGA it also computes φ). "
            "`torch Muon + AdamW`: `torch.optim.Muon` (bf16 Newton–Schulz) on the matrix track and "
            "`torch.optim.AdamW(foreach)` on the rest, routed exactly like ours. `ns auto` = "
            f"{cost['ns_dtype']['default_cpu_dtype']} on this CPU.", "",
            f"![optimizer step]({plots.get('cost_optimizer_step', '')})", ""]

    out += ["### Issue-6 targets", ""]
    t = cost["summary"]["issue6_targets"]
    desc = {
        "muon_vs_torch_muon_same_dtype": "muon step / torch Muon+AdamW step (both bf16 NS)",
        "ada_rmsuon_vs_muon": "ada_rmsuon step / muon step (default NS dtype)",
        "lazy_step_vs_ada_rmsuon": "ars2_neo Lazy training step (median) / ada_rmsuon training step (median)",
        "k5_mean_step_vs_ada_rmsuon": "ars2_neo k=5 mean training step / ada_rmsuon mean training step",
        "k1_mean_step_vs_ada_rmsuon": "ars2_neo k=1 mean training step / ada_rmsuon mean training step",
    }
    out.append(table(["target", "measured (wall-clock)", "required", "met?", "CPU time", "paired / robust"],
                     [[desc.get(k, k), f(v["value"], 3), f"{v['op']} {v['target']}", "yes" if v["met"] else "**no**",
                       f(v.get("cpu"), 3), f(v.get("paired"), 3)] for k, v in t.items()], "lrrlrr"))
    tr = cost["summary"]["training_step_ratios"]
    out += ["", "The verdict uses the wall-clock ratio (medians; means for the k=5 and k=1 runs). Cross-checks "
            "from the same samples: *CPU time* — the same ratio by thread CPU time (insensitive to other "
            "processes on the machine); *paired / robust* — the median over rounds of the ratio of the two "
            "steps taken back to back (for the k=5 mean: the mean rebuilt 4:1 from the medians of its lazy "
            "and sync steps)."]

    out += ["", "### Training step", ""]
    trs = cost["training_step"]
    out.append(f"Forward + backward + `step(closure)`, batch {trs['batch_size']} × {trs['context_length']} tokens from "
               f"{trs['batches']}; {cost['config']['train_steps']} timed steps per contender after "
               f"{cost['config']['train_warmup']} untimed (one k=5 cycle), interleaved.")
    out.append("")
    rows = []
    for n, r in trs["rows"].items():
        q = tr[n]
        rows.append([n, f(r["wall"]["mean_ms"], 1), f(r["wall"]["median_ms"], 1),
                     f(r.get("wall_lazy", {}).get("median_ms"), 1), f(r.get("wall_sync", {}).get("median_ms"), 1),
                     f(r["sync_fraction"]), f(q["mean_vs_ada_rmsuon"], 3), f(q["mean_vs_adamw"], 3)])
    out.append(table(["optimizer", "mean ms", "median ms", "lazy median", "sync median", "sync fraction",
                      "mean × ada_rmsuon", "mean × AdamW"], rows))
    out += ["", f"![training step]({plots.get('cost_training_step', '')})", ""]

    out += ["### Newton–Schulz compute dtype", ""]
    ns = cost["ns_dtype"]
    rows = []
    for label, e in ns.items():
        if not isinstance(e, dict):
            continue
        rows.append([label, e["n_matrices"], ", ".join(e["shapes"]), f(e["bfloat16"]["wall"]["median_ms"]),
                     f(e["float32"]["wall"]["median_ms"]), f(e["fp32_over_bf16"]),
                     f"{e['max_rel_error_vs_fp64']['bfloat16']:.1e} / {e['max_rel_error_vs_fp64']['float32']:.1e}"])
    out.append(table(["shapes of", "matrices", "shapes", "bf16 ms", "fp32 ms", "fp32 / bf16",
                      "max rel. error vs fp64 (bf16 / fp32)"], rows, "lrlrrrr"))
    flags = ", ".join(env.get("cpu_flags", [])) or "—"
    out += ["", f"`F.orthogonalize` (same-shape batches, 5 quintic steps). CPU flags: {flags}. The default "
            f"(`ns_dtype=\"auto\"`) is **{ns['default_cpu_dtype']}** on this CPU: bf16 where the CPU has native "
            "bf16 matmul (AVX512-BF16/AMX) or on accelerators, fp32 otherwise; both stay selectable. "
            "The error column compares each result with the same iteration in float64: bf16 rounding costs "
            "~1e-2 relative, small next to the quintic iteration's own deviation from the exact orthogonal factor "
            "(its singular values land in ~[0.7, 1.2] by design).", ""]

    out += ["### Optimizer-state memory", ""]
    rows = []
    for n, r in cost["optimizer_step"]["rows"].items():
        m = r["memory"]
        keys = ", ".join(f"{k} {v / 1e6:.2f} MB" for k, v in m["by_key"].items() if v >= 1000)
        held = m.get("sam_buffer_bytes_per_param")
        rows.append([n, f(m["bytes_per_param"]), f(m["matrix_bytes_per_matrix_param"]), f"{m['bytes'] / 1e6:.2f}",
                     keys, "no" if not m["sam_pass_held_after_step"] else "**yes**",
                     f(held) if held else "—"])
    out.append(table(["optimizer", "bytes / param", "matrix-track bytes / matrix param", "MB", "state tensors",
                      "SAM pass held after step", "SAM buffers (bytes / param)"], rows, "lrrrllr"))
    out += ["", "fp32 parameters; counted after the timed steps (so the shear force of Lazy/AGA is present). "
            "No recorded second pass outlives its step; SAM members keep the sync step's weight-copy (and, with "
            "Lazy/AGA, base-gradient) buffers for reuse (`keep_buffers=True`, the default; `False` frees them "
            "after each sync step).", "",
            f"![memory]({plots.get('cost_memory', '')})", ""]
    return out


def grokking_section(grok: dict[str, Any], plots: dict[str, str]) -> list[str]:
    cfg = grok["config"]
    out = ["## Grokking", ""]
    out.append(f"`recipes/grokking.py` (`run_grokking`): (a + b) mod 113, 30% of the pairs for training, one "
               f"transformer block, batch 512, betas (0.9, 0.98), weight decay 1.0 (every parameter), cap "
               f"{cfg['epochs']} epochs, a run stops once test accuracy reaches {cfg['stop_at']:.0%}. "
               f"Learning-rate grid {', '.join(f'{x:g}' for x in cfg['lrs'])} for every contender (changes below), one seed "
               f"(seed {cfg['seeds'][0]}); then seeds {', '.join(map(str, cfg['seeds']))} at the chosen lr (the "
               "sweep seed's run is reused). Grokking has only train and test: the lr is chosen by epochs to 99% "
               "**test** accuracy on the sweep seed, the same way for every contender.")
    if grok.get("missing"):
        miss = grok["missing"]
        out += ["", f"**Partial: {len(miss)} seed runs missing** (not finished in the time budget): "
                + ", ".join(f"{m['contender']} seed {m['seed']}" for m in miss) + "."]
    elif grok.get("partial"):
        out += ["", "**Partial: only the sweep finished; the seed runs are missing.**"]
    if cfg.get("sweep_note"):
        out += ["", f"Deviation from the protocol: {cfg['sweep_note']}."]
    out += ["", "### Learning-rate sweep (seed 0)", "",
            "epochs to 50 / 90 / 99% test accuracy; `>N` = not reached in the N epochs run", ""]
    by = {}
    for r in grok.get("sweep", []):
        by.setdefault(r["contender"], {})[r["lr"]] = r
    rows = []
    lrs_all = sorted({lr for d in by.values() for lr in d} | set(cfg["lrs"]))
    for c, d in by.items():
        cells = []
        for lr in lrs_all:
            r = d.get(lr)
            if r is None or r.get("error"):
                cells.append("not run" if r is None else "error")
                continue
            e = r["epochs_to"]
            cells.append(" / ".join(f(e[t], 0) if e[t] is not None else f">{r['epochs_run']}"
                                    for t in ("0.5", "0.9", "0.99")))
        ch = grok.get("chosen_lr", {}).get(c)
        if ch is None:
            cells.append("—")
        elif all(r.get("error") or r["epochs_to"]["0.99"] is None for r in d.values()):
            cells.append(f"{ch:g} (none reached 99%: tie-break)")
        else:
            cells.append(f"{ch:g}" + edge(ch, list(d)))
        rows.append([c, *cells])
    out.append(table(["contender", *[f"lr {lr:g}: ep to 50/90/99%" for lr in lrs_all], "chosen lr"], rows))
    out += ["", "*(edge)*: the chosen lr is at the edge of the grid, so a value beyond it might be better still."]
    s = grok.get("summary", {})
    if s:
        out += ["", "### Epochs to 50 / 90 / 99% test accuracy", "",
                "median (min–max; seeds that reached it / seeds); `>cap` = not reached within the cap", ""]
        rows = []
        for c, r in s.items():
            rows.append([c, f"{r['lr']:g}", *[epochs_cell(r["epochs_to"][t], cfg["epochs"]) for t in ("0.5", "0.9",
                                                                                                       "0.99")],
                         f(r.get("speedup_vs_adamw_99"), 1) + ("×" if r.get("speedup_vs_adamw_99") else ""),
                         f(r["final_test_acc"]["median"], 3), f(r["seconds_per_epoch"], 2)])
        out.append(table(["contender", "lr", "epochs to 50%", "epochs to 90%", "epochs to 99%",
                          "speed-up vs AdamW (99%)", "final test acc (median)", "s / epoch"], rows))
        out += ["", f"![grokking curves]({plots.get('grokking_curves', '')})", "",
                f"![grokking epochs]({plots.get('grokking_epochs', '')})", ""]
    if grok.get("failures"):
        out += ["", "Failed runs: " + ", ".join(f"{x['contender']} seed {x['seed']}" for x in grok["failures"]), ""]
    return out


def wt2_section(wt2: dict[str, Any], plots: dict[str, str]) -> list[str]:
    cfg = wt2["config"]
    out = ["## WT2-offline", ""]
    sub = f"its first {cfg['test_subset']} chunks" if cfg["test_subset"] else "all of it"
    out.append(
        "`recipes/wikitext2.py --preset cpu` (Qwen3, hidden 128, 2 layers, 4 heads, MLP 512, tied embeddings, "
        "~1.05 M parameters; byte-level BPE 4096 trained on the training lines), *chunk* mode (128-token blocks), "
        "batch 8, cosine schedule with 5% warm-up, the recipe's per-optimizer weight decay/betas. "
        "**Train**: the first 95% of the lines of `wiki.valid.tokens`; **dev**: the last 5% (the learning rate "
        "is chosen on dev and nowhere else); **test**: `wiki.test.tokens`, only reported (curves on "
        f"{sub}, final perplexity on the whole file{'' if cfg['final_full_test'] else ' — quick setting: on the curve subset'}). "
        f"Equal budgets: sweep {cfg['sweep_steps']} steps, comparison {cfg['main_steps']} steps; perplexity = "
        "exp(mean next-token loss over real tokens).")
    if wt2.get("partial"):
        missing = wt2.get("missing") or [p for p in ("sweep", "main", "long", "extra_seeds") if p not in wt2]
        out += ["", f"**Partial — not finished in the time budget: {', '.join(missing)}.**"]
    out += ["", "### Learning-rate sweep (dev perplexity, seed 0)", ""]
    by: dict[str, dict[float, Any]] = {}
    for r in wt2.get("sweep", []):
        by.setdefault(r["contender"], {})[r["lr"]] = r
    rows = []
    for c, d in by.items():
        cells = [f"{lr:.3g}: " + (f(r.get("final_dev_ppl")) if not r.get("error") else "error")
                 for lr, r in sorted(d.items())]
        ch = wt2.get("chosen_lr", {}).get(c)
        rows.append([c, *cells, f"{ch:.3g}" + edge(ch, list(d)) if ch is not None else "—"])
    n = max((len(r) for r in rows), default=2) - 2
    rows = [r[:-1] + [""] * (n + 2 - len(r)) + r[-1:] for r in rows]  # shorter grids
    out.append(table(["contender", *[f"lr {i + 1}" for i in range(n)], "chosen"], rows, "l" + "r" * (n + 1)))
    ext = cfg.get("extend_edges", 0)
    centres = {c: v["lr_centre"] for c, v in wt2.get("contenders", {}).items() if not v.get("lr_from")}
    out += ["", f"Grid: centre × {', '.join(f'{x:.3g}' for x in cfg['lr_factors'])} (centres: "
            + ", ".join(f"{c} {lr:.2g}" for c, lr in centres.items()) + ")"
            + (f"; where the best lr was at an edge of the grid, the grid was extended by one ×3 step beyond "
               f"it, up to {ext} times." if ext else ".")]
    out += ["", "Each cell: learning rate: final dev perplexity. *(edge)*: the chosen lr is at the edge of the "
            "grid, so a value beyond it might be better still. The sweep is short "
            f"({cfg['sweep_steps']} steps), which favours larger learning rates than the longer comparison "
            "would."]
    inherited = [f"{c} ← {src}" for c, src in
                 ((c, v.get("lr_from")) for c, v in wt2.get("contenders", {}).items()) if src]
    if inherited:
        out += ["", "Not swept, learning rate taken from the row with the same update rule: " + "; ".join(inherited)
                + "."]
    rows_s = wt2.get("summary", {}).get("rows", {})
    if rows_s:
        key = "test (whole file)" if cfg["final_full_test"] else f"test (first {cfg['test_subset']} chunks)"
        out += ["", f"### Comparison at {cfg['main_steps']} steps", ""]
        rows = []
        for c, r in sorted(rows_s.items(), key=lambda kv: finite(kv[1].get("final_test_ppl"))):
            vals = r.get("final_test_ppl_values") or []
            spread = f" ({min(vals):.1f}–{max(vals):.1f})" if len(vals) > 1 else ""
            ppl = r.get("final_test_ppl")
            cell = "**diverged (NaN)**" if ppl is not None and math.isnan(ppl) else f(ppl) + spread
            rows.append([c, f"{r['lr']:.3g}" + (" ←" if r.get("lr_from") else ""), cell, len(r.get("seeds", [])),
                         f(r.get("vs_adamw"), 3), f(r.get("final_dev_ppl")), f(r.get("best_test_subset_ppl")),
                         f(r.get("epochs")), f(r.get("sync_ratio")), f(r.get("train_seconds"), 0)])
        out.append(table(["contender", "lr", f"final ppl, {key}", "seeds", "× AdamW", "final dev ppl",
                          "best ppl on the curve subset", "epochs", "SAM sync ratio", "train s"], rows))
        out += ["", "← : learning rate taken from the row with the same update rule (not swept itself). "
                "Several seeds: mean (min–max). Rows are sorted by test perplexity for reading only; nothing "
                "was chosen by it (the rows that got a second seed were AdamW and the best family rows by dev ppl).",
                "", f"![wt2 curves]({plots.get('wt2_curves', '')})", ""]
    grid = sam_grid(wt2)
    if wt2.get("summary", {}).get("sam_variants"):
        out += [f"### ARS2-Neo settings: ρ and k ({cfg['main_steps']} steps)", ""]
        rows = [[g["name"], g["k"], f"{g['rho']:g}", f"{g['lr']:.3g}", f(g["dev"]), f(g["test"]), f(g["sync"]),
                 f(g["seconds"], 0)] for g in sorted(grid, key=lambda g: (g["k"], g["rho"]))]
        out.append(table(["run", "k", "ρ", "lr", "final dev ppl", "final test ppl", "sync ratio", "train s"], rows))
        out += ["", "One change at a time around ARS2-Neo's Lazy k=5, ρ=0.1, all at that row's learning rate, one "
                "seed; chosen on dev (the Summary). `ars (k=1)` is SAM on every step. Train seconds come from "
                "runs sharing the machine — the cost section has the controlled ratios.", ""]
    long = wt2.get("summary", {}).get("long", {})
    if long:
        selected = set(wt2.get("summary", {}).get("long_selected", {}).values())
        out += [f"### Over-fitting and the long horizon: {cfg['long_epochs']} epochs", ""]
        rows = [[name + (" ✓" if name in selected else ""), f"{r['lr']:.3g}", f(r.get("best_dev_ppl")),
                 f(r.get("best_dev_epoch"), 0), f(r.get("test_at_best_dev")), f(r["best_test_ppl"]),
                 f(r["best_epoch"], 0), f(r["final_test_ppl"]),
                 f(r["final_test_ppl"] / r["best_test_ppl"] if r["best_test_ppl"] else None, 3),
                 f(math.exp(r["final_train_loss"]) if r["final_train_loss"] is not None else None)]
                for name, r in long.items()]
        out.append(table(["run", "lr", "best dev ppl", "at epoch", "test ppl there", "best test ppl", "at epoch",
                          "final test ppl", "final / best test", "final train ppl"], rows))
        factors = cfg.get("long_lr_factors") or [1.0]
        tried: dict[str, list[float]] = {}
        for r in long.values():
            tried.setdefault(r["contender"], []).append(r.get("lr_factor", 1.0))
        at_edge = [x for x in selected if common.at_edge(long[x].get("lr_factor", 1.0), tried[long[x]["contender"]])]
        out += ["", "Dev and whole-file test perplexity once per epoch (cosine schedule over all epochs). Learning "
                "rates: the 100-step sweep's choice" + (" and a third of it (a longer horizon prefers smaller ones)"
                                                          if len(factors) > 1 else "")
                + ("; where the dev-best run was at an edge of those, one more ×3 step beyond it"
                   if cfg.get("long_extend_edges") else "") + ". "
                "**✓** = per contender, the run with the best dev perplexity; *test ppl there* (test at that "
                "run's best-dev epoch, i.e. early stopping on dev) is the long-horizon comparison in the Summary. "
                "Best test ppl is shown for the over-fitting picture only; nothing is chosen by it."
                + (f" Still at an edge of the rates tried for that contender (a rate beyond it might do better; "
                   f"not run): {', '.join(sorted(at_edge))}." if at_edge else ""),
                "", f"![wt2 over-fitting]({plots.get('wt2_overfitting', '')})", ""]
    elif cfg.get("long_contenders"):
        out += ["", "Over-fitting runs: **missing** (not finished).", ""]
    return out


def build(setting: str, paths: common.Paths) -> Path:
    data = load(paths)
    if "cost" in data:  # ratios and verdicts recomputed from the recorded samples
        from .cost import summarize

        data["cost"]["summary"] = summarize(data["cost"])
    if "wt2" in data:  # likewise: the long-horizon reading and the SAM grid follow the current code
        from . import wt2

        data["wt2"]["summary"] = wt2.summarize(data["wt2"], wt2.WT2Setting(**data["wt2"]["config"]))
    paths.plots.mkdir(parents=True, exist_ok=True)
    files: list[Path] = []
    if "cost" in data:
        files += plot_cost(data["cost"], paths.plots)
    if "grokking" in data:
        files += plot_grokking(data["grokking"], paths.plots)
    if "wt2" in data:
        files += plot_wt2(data["wt2"], paths.plots)
    base = paths.report.parent
    plots = {p.stem: rel(p, base) for p in files}

    cmd = "make bench" if setting == "full" else "make bench-quick"
    lines = [f"# Benchmarks ({setting} setting)", "",
             "Generated by `benchmarks/report.py` from the recorded data in "
             f"`{rel(paths.results, base)}/*.json`; tables and plots come from the same files. "
             "The family's documents make three claims; this file checks them on a 2-core CPU."
             + (" The scale benchmark also ran on a GPU ([Scale on a GPU](#scale-on-a-gpu))."
                if any(paths.results.glob("scale_cuda_*.json")) else ""), ""]
    claims, recs = verdicts(data)
    lines += ["## Summary", ""]
    if setting != "full":
        sizes = [f"{len(data['grokking']['config']['seeds'])} grokking seeds, one lr, cap "
                 f"{data['grokking']['config']['epochs']} epochs"] if "grokking" in data else []
        sizes += [f"WT2 runs of {data['wt2']['config']['main_steps']} steps"
                  + ("" if data["wt2"]["config"].get("long_contenders") else ", no long runs")] if "wt2" in data else []
        lines += [f"**Reduced ({setting}) setting**: the same pipeline, tables and plots on runs too small to "
                  f"judge the claims ({'; '.join(sizes) or 'no results'}); the verdicts below are computed the same "
                  "way but mean little. The committed full-setting results are in the repository's BENCHMARKS.md.",
                  ""]
    lines += [*claims, "", "Recommended defaults that follow:", "", *recs, ""]
    if "reference" in data:
        lines += ["The comparisons above use this project's protocol. The same claims re-run under the family's "
                  "research code's protocol (sentence mode with padding in the loss, constant lr, no clipping; the "
                  "per-head grokking model), with each claim's recorded numbers and confounds: "
                  "[Reference protocol](#reference-protocol-the-research-codes-experiments-re-run).", ""]
    lines += ["Caveats (by design, read before the numbers):", "",
              "- One 2-core CPU shared with other work; every run single-threaded. Cost ratios come from "
              "interleaved rounds in one process (robust to drifts); absolute times are not.",
              "- WT2-offline is ~1/10 of WikiText-2's training text and the model is the ~1 M-parameter CPU "
              "preset, trained for a few hundred steps (plus 8-epoch runs for six rows) — not the "
              "claims' reference model after 5 epochs of full WT2. Compare ratios to AdamW, not perplexities.",
              "- Learning rates come from a short sweep with one seed (WT2: on the dev slice; grokking: by epochs "
              "to 99% test accuracy, grokking having no other split). ρ and k were varied one at a time on WT2 "
              "only; α and the AGA constants were not swept. A 100-step sweep favours larger learning rates than the 400-step comparison would.",
              "- Grokking runs stop at the cap; `>cap` means not reached, and such seeds count as ∞ in medians.",
              "- Grokking and WT2 ran as resumable jobs (every finished run is cached and reused), restarted a few "
              "times on the way — the learning-rate grids were widened mid-run (see each section) — while "
              "`hf_rmsuon` received performance-only commits; the command and commit of the last resume are in "
              "the environment table, the logs in `benchmarks/results/full-*.log`.",
              ""]
    missing = [n for n in ("cost", "grokking", "wt2") if n not in data or data[n].get("partial")]
    if missing:
        lines += [f"**Missing or partial here: {', '.join(missing)}** — see the sections below.", ""]
    env = next((data[n]["environment"] for n in ("cost", "grokking", "wt2") if n in data), None)
    lines += ["## Reproduce", "", "```bash", f"{cmd}                      # = python -m benchmarks.run --setting {setting}",
              f"python -m benchmarks.run --setting {setting} --only cost        # one benchmark",
              f"python -m benchmarks.run --setting {setting} --only report      # tables + plots from the JSON",
              "```", "",
              "Options: `--data_dir` (default `$HF_RMSUON_WT2_DIR` or `<repo>/../shared/data/wikitext-2`), "
              "`--workers` (parallel single-threaded runs, default 2), `--fresh` (ignore cached runs; "
              "by default an interrupted run resumes), `--out`. `make bench-quick` runs the reduced setting "
              "(same code, far smaller runs) into `runs/bench-quick/`: 229 s from scratch on this machine "
              "(measured 2026-11-22, idle, 2 workers).", ""]
    if env:
        lines += ["## Environment", "", table(["", ""], [
            ["python", env["python"]], ["torch", env["torch"]], ["transformers", env["transformers"]],
            ["hf_rmsuon git", env["hf_rmsuon_git"] + (" (+ uncommitted changes)" if env["hf_rmsuon_dirty"] else "")],
            ["CPU", f"{env['cpu_model']}, {env['cpu_count']} cores ({env['platform']})"],
            ["threads", f"1 per run (OMP_NUM_THREADS={env['omp_num_threads']})"],
            ["GPU", "none" if not env["cuda"] else "CUDA available (not used)"],
        ] + [[f"{n} run at", f"{data[n]['environment']['date']} ({run_minutes(n, data[n]):.0f} min of runs), git "
              f"{data[n]['environment']['hf_rmsuon_git']}"
              + (f", `{data[n]['environment']['command']}`" if data[n]["environment"].get("command") else "")]
             for n in ("cost", "grokking", "wt2") if n in data],
            "ll"), ""]
    if "cost" in data:
        lines += cost_section(data["cost"], plots)
    if "grokking" in data:
        lines += grokking_section(data["grokking"], plots)
    if "wt2" in data:
        lines += wt2_section(data["wt2"], plots)
    if "reference" in data:  # benchmarks/reference.py: the research code's protocol
        from .reference import section

        lines += section(data["reference"])
    if "scale" in data:  # benchmarks/scale.py: Qwen3-0.6B shapes (and benchmarks/gpu.sh's CUDA runs)
        from . import scale

        lines += scale.section(data["scale"], paths.results)
    if "fsdp2" in data:  # benchmarks/fsdp2.py (torchrun): per-rank memory and step, DDP vs FSDP2
        from .fsdp2 import section as fsdp2_section

        lines += fsdp2_section(data["fsdp2"])
    paths.report.parent.mkdir(parents=True, exist_ok=True)
    paths.report.write_text("\n".join(lines).rstrip() + "\n", encoding="utf-8")
    common.log(f"report: {paths.report} ({len(files)} plots in {paths.plots})")
    return paths.report


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="regenerate the report and plots from the recorded JSON")
    p.add_argument("--setting", choices=common.SETTINGS, default="full")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    build(args.setting, common.Paths.for_setting(args.setting, args.out))


if __name__ == "__main__":
    main()
