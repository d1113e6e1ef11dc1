"""benchmarks/reference.py: the summary and the BENCHMARKS.md section from a recorded result."""

from __future__ import annotations

from dataclasses import asdict

from benchmarks import reference


def _wt2(row, lr, seed, dev, test):
    return {"row": row, "lr": lr, "seed": seed, "dev_ppl": dev, "test_ppl": test, "test_ppl_with_padding": test * 0.9,
            "train_seconds": 10.0, "steps": 100, "test_padding_fraction": 0.01}


def _grok(row, lr, seed, e10, e50, e99):
    return {"row": row, "lr": lr, "seed": seed, "epochs_to": {"0.1": e10, "0.5": e50, "0.9": e99, "0.99": e99},
            "final": {"test_acc": 1.0 if e99 else 0.3}}


def test_summary_and_section():
    data = {
        "setting": "reduced", "config": asdict(reference.SETTINGS["reduced"]),
        "wt2_sweep": [_wt2("adamw", 1e-3, 0, 120, 110), _wt2("adamw", 3e-3, 0, 100, 90),
                      _wt2("ars (k=1, ρ=0.1)", 4.5e-3, 0, 95, 85), _wt2("ada_rmsuon", 4.5e-3, 0, 97, 88)],
        "wt2_seeds": [_wt2("adamw", 3e-3, 1, 104, 94)],
        "wt2_chosen_lr": {"adamw": 3e-3, "ars (k=1, ρ=0.1)": 4.5e-3, "ada_rmsuon": 4.5e-3},
        "grok_sweep": [_grok("adamw", 1e-2, 0, 40, 90, None), _grok("ada_rmsuon", 1e-2, 0, 10, 20, 50)],
        "grok_seeds": [_grok("adamw", 1e-2, 1, 44, 100, 140), _grok("ada_rmsuon", 1e-2, 1, 12, 22, 60)],
        "grok_chosen_lr": {"adamw": 1e-2, "ada_rmsuon": 1e-2},
    }
    s = reference.summarize(data)
    assert s["wt2"]["adamw"]["test_ppl"] == 92 and s["wt2"]["adamw"]["seeds"] == [0, 1]
    assert abs(s["wt2"]["ars (k=1, ρ=0.1)"]["vs_adamw"] - 85 / 92) < 1e-5
    # a seed that never reached 99% counts as ∞: the median of (∞, 140) is ∞ → not reached
    assert s["grok"]["adamw"]["median_epochs_to"]["0.99"] is None
    assert s["grok"]["ada_rmsuon"]["median_epochs_to"] == {"0.1": 11, "0.5": 21, "0.9": 55, "0.99": 55}
    text = "\n".join(reference.section(data))
    assert "Reduced run" in text and "--setting full" in text
    assert "test ppl (with padding)" in text and "ep@10% (onset)" in text
    assert "228" in text and "521" in text and "283" in text and "80.94" in text and "250.82" in text
    assert "epoch-10 value" in text and "not ARS2-Neo" in text
    assert "python recipes/cifar10.py --optim ars2_neo" in text and "not reproducible" in text
