"""WT2-offline benchmark (SPEC §8): the CPU-sized Qwen3 of recipes/wikitext2.py
(``--preset cpu``: hidden 128, 2 layers, ~1.05 M parameters, BPE 4096, context 128, batch 8),
trained on ``wiki.valid.tokens`` and evaluated on ``wiki.test.tokens``.

Splits — what is tuned on what:

* *train*: the first 95% of the lines of ``wiki.valid.tokens`` (the recipe's
  ``--validation_split_percentage 5`` hold-out); the BPE tokenizer is trained on it;
* *dev*: the last 5% of those lines — the learning rate is chosen here, and nowhere else;
* *test*: ``wiki.test.tokens`` — only reported (curves on its first ``test_subset`` chunks,
  the final perplexity on all of it); never used for a choice.

Data mode *chunk* (one token stream cut into 128-token blocks: no padding, every step the same
cost). Cosine schedule with 5% warm-up, the recipe's per-optimizer weight decay/betas, equal step
budgets for every contender. Phases: (1) lr sweep on dev, one seed; (2) every contender at its lr;
(3) a second seed for AdamW and the best family rows (ranked on dev); ARS2-Neo's ρ and k varied
one at a time around its defaults at the comparison budget (chosen on dev); long runs (several
epochs, at the sweep's learning rate and a third of it, plus one ×3 step past an edge like the sweep)
that show over-fitting, with early stopping on dev as the long-horizon comparison.
"""

from __future__ import annotations

import argparse
import math
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from . import common

NAME = "wt2"

#: label → (--optim, optim_args string, lr grid centre). Centres: usual values for AdamW (1e-3), Muon
#: (2e-2) and AdaMuon/RMSuon (3e-3); 5e-4 for the energy_scale="reference" AdaRMSuon members (their
#: updates are ~√rank larger than AdamW's at the same lr); 1e-3 for energy_scale="rms" (AdamW's energy).
CONTENDERS: dict[str, tuple[str, str, float]] = {
    "adamw": ("adamw_torch", "", 1e-3),
    "muon": ("muon", "", 2e-2),
    "adamuon": ("adamuon", "", 3e-3),
    "rmsuon": ("rmsuon", "", 3e-3),
    "ada_rmsuon (reference)": ("ada_rmsuon", "", 5e-4),
    "ada_rmsuon (rms)": ("ada_rmsuon", "energy_scale=rms", 1e-3),
    "f_ada_rmsuon (projected)": ("f_ada_rmsuon", "", 5e-4),
    "f_ada_rmsuon (elementwise)": ("f_ada_rmsuon", "natural_wd=elementwise", 5e-4),
    "ars (k=1)": ("ars", "", 5e-4),
    "ars2_neo (Lazy k=5)": ("ars2_neo", "k=5", 5e-4),
    "ars2_neo (Lazy k=5 + AGA)": ("ars2_neo", "k=5,adaptive_sync=true", 5e-4),
}
#: contenders that take their learning rate from another's sweep (same update rule and energy scale;
#: sweeping them too would double the sweep's cost)
LR_FROM = {
    "ars (k=1)": "ars2_neo (Lazy k=5)",
    "ars2_neo (Lazy k=5 + AGA)": "ars2_neo (Lazy k=5)",
}


#: the Lazy row whose learning rate the ρ/k variants share, and the variants (one change each)
SAM_BASE = "ars2_neo (Lazy k=5)"
SAM_VARIANTS = (("k=5, ρ=0.03", "k=5,rho=0.03"), ("k=5, ρ=0.3", "k=5,rho=0.3"),
                ("k=2, ρ=0.1", "k=2"), ("k=10, ρ=0.1", "k=10"))


def step_beyond_edge(best: float, tried: list[float]) -> float | None:
    """One ×3 step past ``best`` when it is the largest or smallest of ``tried`` (≥ 2 values), else None."""
    side = common.at_edge(best, tried)
    return None if not side else best * 3 if side > 0 else best / 3


def long_key(contender: str, factor: float) -> str:
    """Row name of a long run: the contender, plus the lr factor when it is not the sweep's lr."""
    if factor == 1:
        return contender
    return f"{contender} (lr/{1 / factor:.3g})" if factor < 1 else f"{contender} (lr×{factor:.3g})"


@dataclass(frozen=True)
class WT2Setting:
    contenders: tuple[str, ...]
    lr_factors: tuple[float, ...]  # sweep grid: centre × factor
    sweep_steps: int
    main_steps: int
    eval_every: int
    test_subset: int  # test chunks for the curves (0 = all)
    final_full_test: bool  # final perplexity on the whole test file
    extra_seeds: tuple[int, ...]  # second seed(s) for AdamW and the top family rows
    top_rows: int  # how many family rows (ranked on dev) get the extra seeds
    long_contenders: tuple[str, ...]
    long_epochs: int
    #: the long runs' learning rates: the sweep's choice × each factor (the 100-step sweep favours
    #: larger rates than several epochs want; the long-horizon comparison picks among them on dev)
    long_lr_factors: tuple[float, ...] = (1.0,)
    #: when the dev-best long run of a contender is at an edge of its factors, add one ×3 step beyond
    #: it, up to this many times (the sweep's rule)
    long_extend_edges: int = 0
    #: ARS2-Neo variants (label, optim_args) run at the Lazy k=5 row's lr and the comparison budget
    sam_variants: tuple[tuple[str, str], ...] = ()
    seed: int = 0
    #: when a row's best lr is at the edge of its grid, extend the grid by one more ×3 step beyond
    #: that edge, up to this many times
    extend_edges: int = 0
    preset: str = "cpu"  # recipes/wikitext2.py preset (tests use "tiny")


SETTINGS = {
    "quick": WT2Setting(("adamw", "muon", "ada_rmsuon (reference)", "ars2_neo (Lazy k=5)"), (1, 3),
                        sweep_steps=30, main_steps=90, eval_every=30, test_subset=128, final_full_test=False,
                        extra_seeds=(), top_rows=0, long_contenders=(), long_epochs=0),
    # sized for ~1 h of one single-threaded worker on a shared 2-core machine (+ the 8-epoch runs)
    "full": WT2Setting(tuple(CONTENDERS), (1 / 3, 1, 3), sweep_steps=100, main_steps=400, eval_every=100,
                       test_subset=256, final_full_test=True, extra_seeds=(1,), top_rows=2,
                       long_contenders=("adamw", "muon", "ada_rmsuon (reference)", "ada_rmsuon (rms)",
                                        "ars (k=1)", "ars2_neo (Lazy k=5)"),
                       long_epochs=8, long_lr_factors=(1.0, 1 / 3), long_extend_edges=1, extend_edges=2,
                       sam_variants=SAM_VARIANTS),
}


def _r(x: float) -> float:
    return float(f"{x:.6g}")


def wt2_unit(optim: str, optim_args: str, lr: float, seed: int, max_steps: int, eval_every: int,
             data_dir: str, test_subset: int, eval_test: bool, final_full_test: bool,
             epochs: float | None = None, preset: str = "cpu") -> dict[str, Any]:
    """One training run of the recipe's model and data pipeline (in a worker process)."""
    import torch

    import hf_rmsuon

    rc = common.load_recipe("_common")
    w = common.load_recipe("wikitext2")
    data = Path(data_dir)
    with tempfile.TemporaryDirectory(prefix="bench-wt2-") as out_dir:
        argv = ["--preset", preset, "--optim", optim, "--learning_rate", repr(lr), "--seed", str(seed),
                "--train_file", str(data / "wiki.valid.tokens"), "--validation_split_percentage", "5",
                "--data_mode", "chunk", "--eval_strategy", "steps", "--eval_steps", str(eval_every),
                "--logging_steps", "10", "--per_device_eval_batch_size", "32", "--output_dir", out_dir,
                "--report_to", "none", "--save_strategy", "no", "--disable_tqdm", "true",
                "--lr_scheduler_type", "cosine", "--warmup_steps", "0.05"]
        argv += ["--num_train_epochs", repr(epochs), "--max_steps", "-1"] if epochs else ["--max_steps", str(max_steps)]
        if optim_args:
            argv += ["--optim_args", optim_args]
        model_args, data_args, args = w.parse_args(argv)
        from transformers import set_seed

        set_seed(seed)
        splits = rc.load_text_splits(data_args, announce=False)
        tokenizer = w.get_tokenizer(model_args, splits, False)
        lm = rc.build_lm_data(tokenizer, splits, "chunk", w.PRESETS[preset].context_length)
        context = lm.context
        eval_sets: dict[str, Any] = {"dev": lm.validation}
        test = None
        if eval_test or final_full_test:
            test_lines = rc.read_text_file(data / "wiki.test.tokens")
            test_seqs = rc.build_sequences(rc.tokenize_lines(tokenizer, test_lines), "chunk", context,
                                           tokenizer.eos_token_id, "test")
            test = rc.SequenceDataset(test_seqs)
            if eval_test:
                eval_sets["test"] = rc.SequenceDataset(test_seqs[:test_subset]) if test_subset else test
        model = w.build_model(model_args, len(tokenizer), context, tokenizer)
        trainer = hf_rmsuon.RMSuonTrainer(
            model=model, args=args, train_dataset=lm.train, eval_dataset=eval_sets, data_collator=lm.collator,
            processing_class=tokenizer, compute_metrics=rc.perplexity_metrics,
            preprocess_logits_for_metrics=rc.token_nll_stats,
        )
        from transformers.trainer_callback import PrinterCallback, ProgressCallback

        trainer.remove_callback(PrinterCallback)  # the pool prints one line per finished run instead
        trainer.remove_callback(ProgressCallback)
        start = time.perf_counter()
        out = trainer.train()
        train_seconds = time.perf_counter() - start
        final_test = None
        if final_full_test and test is not None:
            metrics = trainer.evaluate(eval_dataset=test, metric_key_prefix="test_full")
            final_test = metrics["test_full_perplexity"]
        steps_per_epoch = math.ceil(len(lm.train) / args.per_device_train_batch_size)
        curves: dict[str, list[list[float]]] = {"dev": [], "test": [], "train_loss": []}
        for entry in trainer.state.log_history:
            step = entry.get("step")
            for split in ("dev", "test"):
                if f"eval_{split}_perplexity" in entry:
                    curves[split].append([step, _r(entry.get("epoch", 0)), _r(entry[f"eval_{split}_perplexity"])])
            if "loss" in entry and "eval_dev_perplexity" not in entry:
                curves["train_loss"].append([step, _r(entry["loss"])])
        opt = rc.unwrap_optimizer(trainer.optimizer)
        diagnostics = opt.diagnostics() if hasattr(opt, "diagnostics") else {}
        n_train_tokens = lm.train.num_tokens()
    dev = [p for _, _, p in curves["dev"]]
    tst = [p for _, _, p in curves["test"]]
    finite = [x for x in dev if math.isfinite(x)]
    result = {
        "optim": optim, "optim_args": optim_args, "lr": lr, "seed": seed, "steps": trainer.state.global_step,
        "epochs": _r(trainer.state.epoch or 0.0), "steps_per_epoch": steps_per_epoch,
        "train_tokens": n_train_tokens, "train_loss": _r(out.training_loss),
        "final_dev_ppl": dev[-1] if dev else None, "best_dev_ppl": min(finite) if finite else None,
        "final_test_subset_ppl": tst[-1] if tst else None, "best_test_subset_ppl": min(tst) if tst else None,
        "best_test_subset_step": curves["test"][tst.index(min(tst))][0] if tst else None,
        "final_test_ppl": final_test, "curves": curves, "train_seconds": _r(train_seconds),
        "diagnostics": {k: _r(v) for k, v in diagnostics.items()}, "test_subset": test_subset,
        "torch_threads": torch.get_num_threads(),
    }
    ppl = final_test if final_test is not None else result["final_dev_ppl"]
    result["summary"] = f"{'test' if final_test is not None else 'dev'} ppl {ppl:.2f}" if ppl else "no eval"
    return result


def _unit(tag: str, label: str, lr: float, seed: int, cfg: WT2Setting, data_dir: Path, *, steps: int,
          eval_every: int, eval_test: bool, final_full_test: bool, epochs: float | None = None,
          optim_args: str | None = None) -> common.Unit:
    """A run of contender ``label`` (``optim_args`` replaces its options, for the SAM variants)."""
    optim, default_args, _ = CONTENDERS[label]
    optim_args = default_args if optim_args is None else optim_args
    return common.Unit(f"wt2-{tag}-{label}-lr{lr:.3g}-s{seed}", "benchmarks.wt2", "wt2_unit", {
        "optim": optim, "optim_args": optim_args, "lr": lr, "seed": seed, "max_steps": steps,
        "eval_every": eval_every, "data_dir": str(data_dir), "test_subset": cfg.test_subset,
        "eval_test": eval_test, "final_full_test": final_full_test, "epochs": epochs, "preset": cfg.preset,
    })


def _ppl_key(r: dict[str, Any]) -> float:
    v = r.get("final_dev_ppl")
    return v if v is not None and math.isfinite(v) else math.inf


def _strip(r: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in r.items() if k not in ("curves",)}


def run(setting: str, paths: common.Paths, data_dir: str | None = None, workers: int = 2,
        resume: bool = True) -> dict[str, Any]:
    cfg = SETTINGS[setting]
    start = time.perf_counter()
    data = common.prepare_wt2_offline(data_dir, cfg.preset)
    cache = paths.cache / NAME

    result: dict[str, Any] = {
        "benchmark": NAME, "setting": setting, "config": asdict(cfg), "data_dir": str(data),
        "contenders": {c: {"optim": CONTENDERS[c][0], "optim_args": CONTENDERS[c][1], "lr_centre": CONTENDERS[c][2],
                           "lr_from": LR_FROM.get(c)} for c in cfg.contenders},
        "environment": common.environment(), "partial": True, "missing": [],
    }

    def save() -> None:
        result["seconds"] = time.perf_counter() - start
        result["summary"] = summarize(result, cfg)
        common.write_json(paths.result(NAME), result)

    # 1. learning-rate sweep on dev
    swept = [c for c in cfg.contenders if LR_FROM.get(c) not in cfg.contenders]
    grid = {c: [CONTENDERS[c][2] * f for f in cfg.lr_factors] for c in swept}
    units = {(c, lr): _unit("sweep", c, lr, cfg.seed, cfg, data, steps=cfg.sweep_steps, eval_every=cfg.sweep_steps,
                            eval_test=False, final_full_test=False) for c in swept for lr in grid[c]}

    def sweep_rows(done: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
        rows = []
        for (c, lr), u in units.items():
            r = done.get(u.key)
            if r is not None:
                rows.append({"contender": c, "lr": lr, "error": r.get("error"),
                             **({k: r[k] for k in ("final_dev_ppl", "train_loss", "train_seconds", "steps")}
                                if "error" not in r else {})})
        return rows

    def sweep_update(done: dict[str, dict[str, Any]]) -> None:
        result["sweep"] = sweep_rows(done)
        save()

    done = common.run_units(list(units.values()), cache, workers, "wt2 sweep", resume, on_update=sweep_update)

    def best_lr(c: str) -> float | None:
        ok = [done[units[(c, lr)].key] for lr in grid[c] if "error" not in done[units[(c, lr)].key]]
        return min(ok, key=_ppl_key)["lr"] if ok else None

    for _ in range(cfg.extend_edges):  # the best at the grid's edge: one more ×3 step beyond it
        new = {}
        for c in swept:
            lr = best_lr(c)
            nxt = step_beyond_edge(lr, grid[c]) if lr is not None else None
            if nxt is not None:
                grid[c] = sorted([*grid[c], nxt])
                new[(c, nxt)] = _unit("sweep", c, nxt, cfg.seed, cfg, data, steps=cfg.sweep_steps,
                                      eval_every=cfg.sweep_steps, eval_test=False, final_full_test=False)
        if not new:
            break
        units.update(new)
        done = {**done, **common.run_units(list(new.values()), cache, workers, "wt2 sweep (edge)", resume,
                                           on_update=lambda d, prev=done: sweep_update({**prev, **d}))}
    result["sweep"] = sweep_rows(done)
    result["grid"] = grid
    chosen = {c: best_lr(c) for c in swept if best_lr(c) is not None}
    for c in cfg.contenders:
        if c in LR_FROM and LR_FROM[c] in chosen:
            chosen[c] = chosen[LR_FROM[c]]
    result["chosen_lr"] = chosen
    save()
    common.log("wt2: chosen lr " + ", ".join(f"{c} {lr:.3g}" for c, lr in chosen.items()))

    # 2. every contender at its learning rate, equal step budgets
    main_units = {c: _unit("main", c, chosen[c], cfg.seed, cfg, data, steps=cfg.main_steps,
                           eval_every=cfg.eval_every, eval_test=True, final_full_test=cfg.final_full_test)
                  for c in cfg.contenders if c in chosen}

    def main_update(done: dict[str, dict[str, Any]]) -> None:
        result["main"] = {c: {"contender": c, **done[u.key]} for c, u in main_units.items() if u.key in done}
        result["missing"] = [f"main {c}" for c, u in main_units.items() if u.key not in done]
        save()

    # longest (SAM k=1) first: better packing on the workers
    order = sorted(main_units.values(), key=lambda u: "ars (k=1)" not in u.key)
    done = common.run_units(order, cache, workers, "wt2 main", resume, on_update=main_update)
    main_update(done)
    main = result["main"]

    # 3. long runs (over-fitting) and extra seeds for AdamW + the best family rows (ranked on dev)
    family = sorted((c for c in main if c != "adamw" and "error" not in main[c]), key=lambda c: _ppl_key(main[c]))
    top = (["adamw"] if "adamw" in main else []) + family[:cfg.top_rows]
    spe = next((r["steps_per_epoch"] for r in main.values() if "steps_per_epoch" in r), 282)
    units3: dict[tuple[str, str, int], common.Unit] = {}
    contender_of: dict[str, tuple[str, float]] = {}  # long-run / variant row → (contender, lr factor)
    for s in cfg.extra_seeds:
        for c in top:
            units3[("seed", c, s)] = _unit("main", c, chosen[c], s, cfg, data, steps=cfg.main_steps,
                                           eval_every=cfg.eval_every, eval_test=True,
                                           final_full_test=cfg.final_full_test)
    if SAM_BASE in chosen:
        for label, args in cfg.sam_variants:
            units3[("sam", label, cfg.seed)] = _unit(
                f"sam-{args}", SAM_BASE, chosen[SAM_BASE], cfg.seed, cfg, data, steps=cfg.main_steps,
                eval_every=cfg.eval_every, eval_test=True, final_full_test=cfg.final_full_test, optim_args=args)
            contender_of[label] = (SAM_BASE, 1.0)
    def add_long(c: str, factor: float) -> common.Unit:  # once per epoch, on the whole test file
        lr = chosen[c] if factor == 1 else _r(chosen[c] * factor)  # the sweep's value exactly (cache key)
        u = _unit("long", c, lr, cfg.seed, cfg, data, steps=0, eval_every=spe,
                  eval_test=True, final_full_test=False, epochs=float(cfg.long_epochs))
        u.kwargs["test_subset"] = 0
        units3[("long", long_key(c, factor), cfg.seed)] = u
        contender_of[long_key(c, factor)] = (c, factor)
        return u

    for c in cfg.long_contenders:
        for factor in cfg.long_lr_factors if c in chosen else ():
            add_long(c, factor)

    def update3(done: dict[str, dict[str, Any]]) -> None:
        def rows_of(kind: str) -> dict[str, dict[str, Any]]:
            return {name: {"contender": contender_of[name][0], "lr_factor": contender_of[name][1], **done[u.key]}
                    for (k, name, _), u in units3.items() if k == kind and u.key in done}

        result["long"] = rows_of("long")
        result["sam_variants"] = rows_of("sam")
        result["extra_seeds"] = [{"contender": c, **done[u.key]} for (kind, c, _), u in units3.items()
                                 if kind == "seed" and u.key in done]
        result["missing"] = [f"{kind} {c} seed {s}" for (kind, c, s), u in units3.items() if u.key not in done]
        save()

    if units3:
        # seeds first (they complete the comparison table), then the SAM variants, then the long runs
        order3 = sorted(units3.items(), key=lambda kv: ("seed", "sam", "long").index(kv[0][0]))
        done = common.run_units([u for _, u in order3], cache, workers, "wt2 seeds+long", resume,
                                on_update=update3)
        update3(done)
        for _ in range(cfg.long_extend_edges):  # the dev-best long run at an edge: one ×3 step beyond it
            factors: dict[str, list[float]] = {}
            for kind, name, _ in units3:
                if kind == "long":
                    factors.setdefault(contender_of[name][0], []).append(contender_of[name][1])
            picked = summarize(result, cfg)["long_selected"]
            new = []
            for c, fs in factors.items():
                nxt = step_beyond_edge(contender_of[picked[c]][1], fs) if c in picked else None
                if nxt is not None:
                    new.append(add_long(c, nxt))
            if not new:
                break
            done = {**done, **common.run_units(new, cache, workers, "wt2 long (edge)", resume,
                                               on_update=lambda d, prev=done: update3({**prev, **d}))}
            update3(done)
    result["partial"] = bool(result["missing"])
    save()
    for c, s in result["summary"]["rows"].items():
        common.log(f"wt2: {c:<28} lr {s['lr']:.3g}: test ppl {s['final_test_ppl']} (seeds {s['seeds']})")
    common.log(f"wt2: done in {result['seconds']:.0f}s → {paths.result(NAME)}")
    return result


def summarize(result: dict[str, Any], cfg: WT2Setting) -> dict[str, Any]:
    """Per contender: final test ppl over seeds (mean, min, max), best/final dev ppl, seconds."""
    rows = {}
    ppl_key = "final_test_ppl" if cfg.final_full_test else "final_test_subset_ppl"
    for c, r in result.get("main", {}).items():
        if "error" in r:
            rows[c] = {"lr": result.get("chosen_lr", {}).get(c), "error": True, "seeds": [], "final_test_ppl": None}
            continue
        runs = [r] + [x for x in result.get("extra_seeds", []) if x["contender"] == c and "error" not in x]
        vals = [x[ppl_key] for x in runs if x.get(ppl_key) is not None]
        rows[c] = {
            "lr": r["lr"], "lr_from": LR_FROM.get(c), "seeds": [x["seed"] for x in runs],
            "final_test_ppl": _r(statistics.fmean(vals)) if vals else None,
            "final_test_ppl_min": min(vals) if vals else None, "final_test_ppl_max": max(vals) if vals else None,
            "final_test_ppl_values": vals,
            "final_dev_ppl": _r(statistics.fmean(x["final_dev_ppl"] for x in runs)),
            "best_test_subset_ppl": r.get("best_test_subset_ppl"), "train_seconds": r.get("train_seconds"),
            "epochs": r.get("epochs"), "steps": r.get("steps"),
            "sync_ratio": r.get("diagnostics", {}).get("sync_ratio"),
        }
    base = rows.get("adamw", {}).get("final_test_ppl")
    for row in rows.values():
        row["vs_adamw"] = _r(row["final_test_ppl"] / base) if base and row.get("final_test_ppl") else None
    long = {name: summarize_long(r) for name, r in result.get("long", {}).items() if "error" not in r}
    # the long-horizon comparison: per contender, the long run with the best dev perplexity at any
    # epoch, read at that epoch (early stopping on dev; test is only read)
    long_selected: dict[str, str] = {}
    for name, r in long.items():
        c, cur = r["contender"], long_selected.get(r["contender"])
        if r["best_dev_ppl"] is not None and (cur is None or r["best_dev_ppl"] < long[cur]["best_dev_ppl"]):
            long_selected[c] = name
    sam = {}
    for name, r in result.get("sam_variants", {}).items():
        if "error" not in r:
            sam[name] = {"optim_args": r["optim_args"], "lr": r["lr"], "final_dev_ppl": r["final_dev_ppl"],
                         "final_test_ppl": r.get(ppl_key), "sync_ratio": r.get("diagnostics", {}).get("sync_ratio"),
                         "train_seconds": r.get("train_seconds")}
    return {"ppl_key": ppl_key, "rows": rows, "long": long, "long_selected": long_selected, "sam_variants": sam}


def summarize_long(r: dict[str, Any]) -> dict[str, Any]:
    """A long run's curve read three ways: best test, test at the best-dev epoch, final."""
    t, d = r["curves"]["test"], r["curves"]["dev"]
    best = min(t, key=lambda x: x[2]) if t else None
    finite_dev = [x for x in d if math.isfinite(x[2])]
    best_dev = min(finite_dev, key=lambda x: x[2]) if finite_dev else None
    test_at = {x[0]: x[2] for x in t}
    return {"contender": r.get("contender"), "lr": r["lr"], "lr_factor": r.get("lr_factor", 1.0),
            "epochs": r["epochs"], "best_test_ppl": best[2] if best else None, "best_epoch": best[1] if best else None,
            "final_test_ppl": t[-1][2] if t else None,
            "best_dev_ppl": best_dev[2] if best_dev else None, "best_dev_epoch": best_dev[1] if best_dev else None,
            "test_at_best_dev": test_at.get(best_dev[0]) if best_dev else None,
            "final_train_loss": r["curves"]["train_loss"][-1][1] if r["curves"]["train_loss"] else None}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="WT2-offline benchmark only (see benchmarks.run)")
    p.add_argument("--setting", choices=list(SETTINGS), default="quick")
    p.add_argument("--out", default=None)
    p.add_argument("--data_dir", default=None)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--fresh", action="store_true")
    args = p.parse_args(argv)
    run(args.setting, common.Paths.for_setting(args.setting, args.out), args.data_dir, args.workers, not args.fresh)


if __name__ == "__main__":
    common.run_main_guard(main)
