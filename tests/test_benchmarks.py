"""Smoke tests of the benchmark suite: a tiny cost measurement, tiny grokking and WT2 runs through
the real drivers, and the report (tables + PNG plots) generated from what they recorded."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from benchmarks import common, cost, grokking, report, wt2

REPO = Path(__file__).resolve().parent.parent
TINY_PRESET = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 2,
               "head_dim": 16, "intermediate_size": 64, "context_length": 16, "vocab_size": 128, "batch_size": 2}
TINY_COST = cost.CostSetting(opt_rounds=6, opt_warmup=1, ns_rounds=2, train_steps=5, train_warmup=5,
                             ns_reference_shapes=False)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def tiny_cost() -> dict:
    result = {"benchmark": "cost", "setting": "test", "config": TINY_COST.__dict__, "preset": TINY_PRESET,
              "preset_source": "test", "environment": common.environment()}
    result["optimizer_step"] = cost.bench_optimizer_step(TINY_COST, TINY_PRESET)
    result["ns_dtype"] = cost.bench_ns_dtype(TINY_COST, TINY_PRESET)
    result["training_step"] = cost.bench_training_step(TINY_COST, TINY_PRESET, "/nonexistent-wt2-dir")
    result["summary"] = cost.summarize(result)
    return result


def test_cost_measures_every_contender(tiny_cost):
    rows = tiny_cost["optimizer_step"]["rows"]
    assert {s.label for s in cost.OPT_SPECS} == set(rows)
    for name, row in rows.items():
        assert row["wall"]["n"] == TINY_COST.opt_rounds, name
        assert 0 < row["wall"]["median_ms"] < 10_000, name
    # SAM rows: k=1 always syncs (recorded pass); k=5 has both kinds, 1 sync in 5 steps
    assert rows["ars (k=1)"]["kinds"] == ["sync"]
    assert rows["ars2_neo (k=5)"]["kinds"] == ["lazy", "sync"]
    assert sum(s["kind"] == "sync" for s in rows["ars2_neo (k=5)"]["samples"]) in (1, 2)
    # training step: random tokens (no data dir), k=5 syncs on exactly 1 step in 5
    train = tiny_cost["training_step"]
    assert train["batches"].startswith("random tokens")
    assert train["rows"]["ars2_neo (k=5, Lazy)"]["sync_fraction"] == pytest.approx(0.2)
    assert train["rows"]["ars2_neo (k=1)"]["sync_fraction"] == 1.0
    assert train["rows"]["ada_rmsuon"]["sync_fraction"] == 0.0


def test_cost_state_memory_accounting(tiny_cost):
    rows = tiny_cost["optimizer_step"]["rows"]
    mem = {n: r["memory"] for n, r in rows.items()}
    n_params = tiny_cost["optimizer_step"]["n_params"]
    assert all(m["params"] == n_params for m in mem.values())
    # m and v in fp32 (+ torch's 4-byte step tensor per parameter tensor)
    assert mem["torch AdamW (foreach)"]["bytes_per_param"] == pytest.approx(8.0, rel=0.01)
    assert mem["torch AdamW (foreach)"]["by_key"]["exp_avg"] == 4 * n_params
    assert mem["ada_rmsuon"]["bytes_per_param"] == pytest.approx(8.0, rel=0.01)  # (+ step tensors, as torch)
    assert mem["pure_ns_muon"]["matrix_bytes_per_matrix_param"] == 0.0  # no momentum on the matrix track
    assert mem["muon (ns bf16)"]["matrix_bytes_per_matrix_param"] == pytest.approx(4.0)  # momentum buffer
    assert mem["torch Muon + AdamW"]["by_key"]["momentum_buffer"] == mem["muon (ns bf16)"]["by_key"]["momentum_buffer"]
    assert mem["ars2_neo (k=5)"]["bytes_per_param"] == pytest.approx(12.0, rel=0.01)  # + shear force
    assert "shear" not in mem["ars (k=1)"]["by_key"]  # k=1 without AGA keeps no shear force
    assert not any(m["sam_pass_held_after_step"] for m in mem.values())
    # the reused sync-step buffers: weights (4 B) for ars k=1; + base gradient for Lazy mode
    assert mem["ars (k=1)"]["sam_buffer_bytes_per_param"] == pytest.approx(4.0, rel=0.01)
    assert mem["ars2_neo (k=5)"]["sam_buffer_bytes_per_param"] == pytest.approx(8.0, rel=0.01)
    assert mem["ada_rmsuon"]["sam_buffer_bytes_per_param"] == 0.0


def test_cost_summary_targets_follow_the_samples(tiny_cost):
    s = tiny_cost["summary"]
    rows = tiny_cost["optimizer_step"]["rows"]
    expect = rows["muon (ns bf16)"]["wall"]["median_ms"] / rows["torch Muon + AdamW"]["wall"]["median_ms"]
    t = s["issue6_targets"]
    assert t["muon_vs_torch_muon_same_dtype"]["value"] == pytest.approx(expect)
    assert set(t) == {"muon_vs_torch_muon_same_dtype", "ada_rmsuon_vs_muon", "lazy_step_vs_ada_rmsuon",
                      "k5_mean_step_vs_ada_rmsuon", "k1_mean_step_vs_ada_rmsuon"}
    for v in t.values():
        assert v["met"] == (v["value"] <= v["target"])
    assert s["optimizer_step_ratios"]["torch AdamW (foreach)"]["vs_adamw"] == 1.0


def test_paired_ratio():
    a = {"samples": [{"round": 0, "wall": 2.0, "kind": "lazy"}, {"round": 1, "wall": 9.0, "kind": "sync"},
                     {"round": 2, "wall": 3.0, "kind": "lazy"}]}
    b = {"samples": [{"round": 0, "wall": 1.0}, {"round": 1, "wall": 3.0}, {"round": 2, "wall": 1.0}]}
    assert cost.paired(a, b) == 3.0
    assert cost.paired(a, b, "lazy") == 2.5


def test_grokking_spread_and_selection():
    s = grokking.spread([10, None, 30, 20, None])
    assert s["median"] == 30 and s["min"] == 10 and s["max"] is None and s["reached"] == 3
    assert grokking.spread([None, None, 5])["median"] is None  # most seeds never reached it
    fast = {"epochs_to": {"0.5": 5, "0.9": 9, "0.99": 20}, "final": {"test_acc": 1.0}}
    slow = {"epochs_to": {"0.5": 1, "0.9": 2, "0.99": 40}, "final": {"test_acc": 1.0}}
    never = {"epochs_to": {"0.5": 1, "0.9": None, "0.99": None}, "final": {"test_acc": 0.6}}
    assert min([slow, never, fast], key=grokking.selection_key) is fast
    assert min([never, slow], key=grokking.selection_key) is slow


@pytest.fixture(scope="module")
def tiny_suite(tmp_path_factory, tiny_cost) -> common.Paths:
    """Tiny grokking and WT2 runs through the real drivers, plus the tiny cost result."""
    tmp = tmp_path_factory.mktemp("bench")
    paths = common.Paths.for_setting("test", tmp / "out")
    common.write_json(paths.result("cost"), tiny_cost)
    data = tmp / "wt2"
    data.mkdir()
    shutil.copy(REPO / "recipes" / "data" / "wikitext2-excerpt.train.txt", data / "wiki.valid.tokens")
    shutil.copy(REPO / "recipes" / "data" / "wikitext2-excerpt.validation.txt", data / "wiki.test.tokens")
    mp = pytest.MonkeyPatch()
    mp.setenv("HF_RMSUON_CACHE", str(tmp / "cache"))
    mp.setitem(grokking.SETTINGS, "test", grokking.GrokSetting(("adamw", "ars2_neo (Lazy k=5)"), (1e-3,), (0, 1), 2))
    mp.setitem(wt2.SETTINGS, "test", wt2.WT2Setting(
        ("ars2_neo (Lazy k=5)", "ars2_neo (Lazy k=5 + AGA)"), (1.0,), sweep_steps=2, main_steps=4,
        eval_every=2, test_subset=4, final_full_test=True, extra_seeds=(1,), top_rows=1,
        long_contenders=("ars2_neo (Lazy k=5)",), long_epochs=1, preset="tiny", long_lr_factors=(1.0, 0.5),
        sam_variants=(("k=2, ρ=0.1", "k=2"),)))
    try:
        grokking.run("test", paths, workers=1)
        wt2.run("test", paths, str(data), workers=1)
    finally:
        mp.undo()
    return paths


def test_tiny_runs_record_what_the_report_needs(tiny_suite):
    g = common.read_json(tiny_suite.result("grokking"))
    assert not g["partial"] and set(g["summary"]) == {"adamw", "ars2_neo (Lazy k=5)"}
    assert all(len(r["curves"]["test_acc"]) == 2 for r in g["runs"])  # the 2-epoch cap
    assert len(g["summary"]["adamw"]["median_test_acc_curve"]) == 2
    w = common.read_json(tiny_suite.result("wt2"))
    assert not w["partial"]
    lazy, aga = "ars2_neo (Lazy k=5)", "ars2_neo (Lazy k=5 + AGA)"
    # the AGA row takes its lr from the Lazy row's sweep and is not swept itself
    assert {r["contender"] for r in w["sweep"]} == {lazy}
    assert w["chosen_lr"][aga] == w["chosen_lr"][lazy]
    main = w["main"][lazy]
    assert main["steps"] == 4 and [p[0] for p in main["curves"]["dev"]] == [2, 4]
    assert [p[0] for p in main["curves"]["test"]] == [2, 4]
    assert math.isfinite(main["final_test_ppl"]) and main["final_test_ppl"] > 1
    assert main["diagnostics"]["sync_ratio"] == pytest.approx(0.25)  # steps 1..4, k=5: one sync
    # a second seed for the best family row by dev (top_rows=1); one long run of one epoch
    best = min((aga, lazy), key=lambda c: w["main"][c]["final_dev_ppl"])
    assert [(r["contender"], r["seed"]) for r in w["extra_seeds"]] == [(best, 1)]
    assert w["long"][lazy]["epochs"] == pytest.approx(1.0)
    assert w["summary"]["rows"][best]["seeds"] == [0, 1]
    # the long runs at the sweep's lr and at half of it; the one with the better dev ppl is the comparison's
    half = w["long"][f"{lazy} (lr/2)"]
    assert half["lr"] == pytest.approx(w["chosen_lr"][lazy] / 2) and half["contender"] == lazy
    sel = w["summary"]["long_selected"][lazy]
    other = f"{lazy} (lr/2)" if sel == lazy else lazy
    assert w["summary"]["long"][sel]["best_dev_ppl"] <= w["summary"]["long"][other]["best_dev_ppl"]
    # the ρ/k variant: ARS2-Neo at the Lazy row's lr with only k changed (k=2 over steps 1..4: two syncs)
    variant = w["sam_variants"]["k=2, ρ=0.1"]
    assert variant["optim"] == "ars2_neo" and variant["optim_args"] == "k=2" and variant["lr"] == w["chosen_lr"][lazy]
    assert variant["diagnostics"]["sync_ratio"] == pytest.approx(0.5)


def test_report_tables_and_plots_come_from_the_json(tiny_suite):
    path = report.build("quick", tiny_suite)
    text = path.read_text()
    for heading in ("## Summary", "## Cost", "### Issue-6 targets", "## Grokking", "## WT2-offline",
                    "### ARS2-Neo settings: ρ and k", "### Over-fitting and the long horizon", "## Environment",
                    "## Reproduce"):
        assert heading in text, heading
    names = {p.name for p in tiny_suite.plots.glob("*.png")}
    assert names == {"cost_optimizer_step.png", "cost_training_step.png", "cost_memory.png", "grokking_curves.png",
                     "grokking_epochs.png", "wt2_curves.png", "wt2_overfitting.png"}
    for name in names:
        png = (tiny_suite.plots / name).read_bytes()
        assert png[:8] == PNG_MAGIC and len(png) > 5000, name
        assert f"plots/{name}" in text  # every plot is shown in the report
    # numbers in the tables are the recorded ones
    c = common.read_json(tiny_suite.result("cost"))
    t = cost.summarize(c)["issue6_targets"]["k1_mean_step_vs_ada_rmsuon"]
    assert f"| {t['value']:.3f} |" in text
    w = common.read_json(tiny_suite.result("wt2"))
    row = w["summary"]["rows"]["ars2_neo (Lazy k=5 + AGA)"]
    assert f"| {row['final_test_ppl']:.2f}" in text
    g = common.read_json(tiny_suite.result("grokking"))
    assert f"{g['chosen_lr']['adamw']:g}" in text


def test_report_says_what_is_missing(tmp_path):
    paths = common.Paths.for_setting("quick", tmp_path)
    (paths.results).mkdir(parents=True)
    text = report.build("quick", paths).read_text()
    assert "Grokking — **not measured**" in text and "WT2 — **not measured**" in text
    assert "**Missing or partial here: cost, grokking, wt2**" in text
    # a partial result (sweep only) is reported as such
    common.write_json(paths.result("grokking"), {
        "benchmark": "grokking", "config": {"epochs": 5, "lrs": [1e-3], "seeds": [0], "stop_at": 0.99},
        "environment": common.environment(), "partial": True, "chosen_lr": {"adamw": 1e-3},
        "sweep": [{"contender": "adamw", "lr": 1e-3, "seed": 0, "epochs_to": {"0.5": 2, "0.9": None, "0.99": None},
                   "epochs_run": 5}]})
    text = report.build("quick", paths).read_text()
    assert "Partial: only the sweep finished" in text and "| adamw | 2 / >5 / >5 | 0.001 (none reached 99%: tie-break) |" in text


def test_run_cli_rejects_unknown_benchmark(capsys):
    from benchmarks import run

    with pytest.raises(SystemExit):
        run.parse_args(["--only", "cost,nope"])
    assert "unknown ['nope']" in capsys.readouterr().err


def test_data_dir_resolution(monkeypatch, tmp_path):
    monkeypatch.delenv("HF_RMSUON_WT2_DIR", raising=False)
    assert common.resolve_data_dir() == (REPO.parent / "shared" / "data" / "wikitext-2").resolve()
    monkeypatch.setenv("HF_RMSUON_WT2_DIR", str(tmp_path))
    assert common.resolve_data_dir() == tmp_path.resolve()
    assert common.resolve_data_dir("/x/y") == Path("/x/y")


def test_results_json_is_plain(tiny_cost):
    json.dumps(tiny_cost)  # everything recorded is JSON-able
    assert torch.get_num_threads() >= 1


def test_wt2_protocol_with_a_fake_trainer(monkeypatch, tmp_path):
    """The phases without training: the grid is extended past an edge best, rows without a sweep take
    their lr from their source row, extra seeds go to AdamW + the best family row by dev, never by test."""
    ran = []

    def fake_run_units(units, cache, workers, desc, resume, on_update=None, **kw):
        out = {}
        for u in units:
            lr, seed = u.kwargs["lr"], u.kwargs["seed"]
            dev = 100 * (1 + abs(math.log(lr / 0.01)))  # every optimizer is best at lr 0.01 on dev
            test = 1000 - dev  # and test disagrees, so a choice made on test would show
            out[u.key] = {"final_dev_ppl": dev, "train_loss": 1.0, "train_seconds": 1.0, "steps": u.kwargs["max_steps"],
                          "lr": lr, "seed": seed, "steps_per_epoch": 280, "optim": u.kwargs["optim"],
                          "optim_args": u.kwargs["optim_args"], "final_test_ppl": test, "epochs": 1.0,
                          "curves": {"dev": [[1, 0.1, dev]], "test": [[1, 0.1, test]], "train_loss": [[1, 2.0]]},
                          "diagnostics": {}}
            ran.append((desc, u.key, u.kwargs))
            if on_update:
                on_update(dict(out))
        return out

    monkeypatch.setattr(wt2.common, "run_units", fake_run_units)
    monkeypatch.setitem(wt2.SETTINGS, "fake", wt2.WT2Setting(
        ("adamw", "muon", "ars2_neo (Lazy k=5)", "ars (k=1)"), (1 / 3, 1, 3), sweep_steps=100, main_steps=400,
        eval_every=100, test_subset=256, final_full_test=True, extra_seeds=(1,), top_rows=1,
        long_contenders=("adamw",), long_epochs=4, extend_edges=2, long_lr_factors=(1.0, 1 / 3), long_extend_edges=1,
        sam_variants=(("k=5, ρ=0.3", "k=5,rho=0.3"),)))
    data = tmp_path / "wt2"
    data.mkdir()
    shutil.copy(REPO / "recipes" / "data" / "wikitext2-excerpt.train.txt", data / "wiki.valid.tokens")
    shutil.copy(REPO / "recipes" / "data" / "wikitext2-excerpt.validation.txt", data / "wiki.test.tokens")
    monkeypatch.setenv("HF_RMSUON_CACHE", str(tmp_path / "cache"))
    r = wt2.run("fake", common.Paths.for_setting("fake", tmp_path / "out"), str(data), workers=1)
    # AdamW (centre 1e-3): grid 3.3e-4..3e-3, best at the top edge → 9e-3 → 2.7e-2 (two extensions)
    assert r["grid"]["adamw"][-2:] == pytest.approx([9e-3, 2.7e-2])
    assert r["chosen_lr"]["adamw"] == pytest.approx(9e-3)
    # muon (centre 2e-2): best at the bottom edge 6.7e-3 → 2.2e-3 added, 6.7e-3 stays best
    assert r["grid"]["muon"][0] == pytest.approx(2e-2 / 9)
    assert r["chosen_lr"]["muon"] == pytest.approx(2e-2 / 3)
    assert "ars (k=1)" not in r["grid"] and r["chosen_lr"]["ars (k=1)"] == r["chosen_lr"]["ars2_neo (Lazy k=5)"]
    assert all(kw["eval_test"] is False for desc, _, kw in ran if desc.startswith("wt2 sweep"))
    main = [kw for desc, _, kw in ran if desc == "wt2 main"]
    assert len(main) == 4 and all(kw["max_steps"] == 400 and kw["final_full_test"] for kw in main)
    seeds = sorted(x["contender"] for x in r["extra_seeds"])
    best_family_by_dev = min(("muon", "ars2_neo (Lazy k=5)", "ars (k=1)"), key=lambda c: r["main"][c]["final_dev_ppl"])
    assert seeds == sorted(["adamw", best_family_by_dev])
    long = r["long"]["adamw"]
    assert long["lr"] == r["chosen_lr"]["adamw"]
    assert r["long"]["adamw (lr/3)"]["lr"] == pytest.approx(r["chosen_lr"]["adamw"] / 3)
    assert all(kw["test_subset"] == 0 for desc, key, kw in ran if "long" in key)  # whole test file per epoch
    # the lr/3 run has the better test but the worse dev ppl: the long-horizon pick follows dev
    assert r["summary"]["long_selected"] == {"adamw": "adamw"}
    # the dev-best long run sits at the top of {lr/3, lr}: one more run at 3·lr, which dev rejects again
    assert r["long"]["adamw (lr×3)"]["lr"] == pytest.approx(3 * r["chosen_lr"]["adamw"])
    assert len(r["long"]) == 3
    variant = [kw for desc, key, kw in ran if "-sam-" in key]
    assert [(kw["optim"], kw["optim_args"], kw["lr"], kw["max_steps"]) for kw in variant] == [
        ("ars2_neo", "k=5,rho=0.3", r["chosen_lr"]["ars2_neo (Lazy k=5)"], 400)]
    assert not r["partial"] and r["missing"] == []


def _sam_report_data(devs: dict[str, float]) -> dict:
    """WT2 result with the two SAM rows and ρ/k variants of the given dev perplexities."""
    rows = {name: {"lr": 0.01, "final_dev_ppl": devs[name], "final_test_ppl": devs[name] - 10, "train_seconds": 1.0,
                   "sync_ratio": None} for name in ("ars (k=1)", "ars2_neo (Lazy k=5)")}
    variants = {label: {"optim_args": args, "lr": 0.01, "final_dev_ppl": devs[label], "final_test_ppl": 1.0,
                        "sync_ratio": None, "train_seconds": 1.0}
                for label, args in (("k=10, ρ=0.1", "k=10"), ("k=5, ρ=0.3", "k=5,rho=0.3"),
                                    ("k=5, ρ=0.03", "k=5,rho=0.03"))}
    return {"wt2": {"summary": {"rows": rows, "sam_variants": variants},
                    "contenders": {"ars (k=1)": {"optim_args": ""}, "ars2_neo (Lazy k=5)": {"optim_args": "k=5"}}}}


def test_rho_and_k_recommendations_follow_dev():
    # k=1 is best, k=10 within 2% of it → the cheapest such k (10); ρ = 0.3 best at k = 5
    _, recs = report.verdicts(_sam_report_data({"ars (k=1)": 100.0, "ars2_neo (Lazy k=5)": 104.0,
                                                "k=10, ρ=0.1": 101.5, "k=5, ρ=0.3": 99.0, "k=5, ρ=0.03": 110.0}))
    text = "\n".join(recs)
    assert "- `k`: **10**" in text and "(best: k=1)" in text
    assert "- `rho`: **0.3**" in text and "ρ=0.03 110.0" in text
    # no Lazy k within 2% → SAM on every step
    _, recs = report.verdicts(_sam_report_data({"ars (k=1)": 100.0, "ars2_neo (Lazy k=5)": 104.0,
                                                "k=10, ρ=0.1": 108.0, "k=5, ρ=0.3": 105.0, "k=5, ρ=0.03": 103.0}))
    text = "\n".join(recs)
    assert "- `k`: **1**" in text and "- `rho`: **0.03**" in text
