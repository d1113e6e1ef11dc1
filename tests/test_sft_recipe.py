"""recipes/sft_lora.py (TRL SFTTrainer + LoRA) offline: a tiny local model directory and a small
local JSON Lines dataset; the summary prints. Token accuracy: evaluate's metric or the same formula."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("trl")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "recipes"))

import sft_lora  # noqa: E402
from _tiny import tiny_qwen3  # noqa: E402
from test_trl import sentences, word_tokenizer  # noqa: E402


def test_token_accuracy_uses_evaluate_or_the_same_formula(monkeypatch):
    preds, refs = np.array([1, 2, 3, 4]), np.array([1, 2, 0, 4])
    monkeypatch.setattr(sft_lora.common, "_ACCURACY", {"metric": None, "source": "formula"})
    assert sft_lora.common.token_accuracy(preds, refs) == (0.75, "formula")

    class FakeAccuracy:  # evaluate's interface
        def compute(self, predictions, references):
            return {"accuracy": float(np.mean(np.asarray(predictions) == np.asarray(references)))}

    monkeypatch.setattr(sft_lora.common, "_ACCURACY", {"metric": FakeAccuracy(), "source": "evaluate"})
    assert sft_lora.common.token_accuracy(preds, refs) == (0.75, "evaluate")


def test_sft_lora_recipe_runs_offline(tmp_path, monkeypatch, capsys):
    model_dir = tmp_path / "model"
    tiny_qwen3().save_pretrained(model_dir)
    word_tokenizer().save_pretrained(model_dir)
    rows = [{"prompt": p, "completion": " " + c} for p, c in zip(sentences(40, 3, 6, 5), sentences(40, 2, 4, 6))]
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    monkeypatch.setattr(sft_lora.common, "_ACCURACY", {"metric": None, "source": "formula"})  # as offline, no cache
    summary = sft_lora.main([
        "--model_name_or_path", str(model_dir), "--train_file", str(data), "--validation_split_percentage", "20",
        "--optim", "ars2_neo", "--optim_args", "k=2", "--learning_rate", "1e-2", "--max_steps", "6",
        "--lora_r", "4", "--output_dir", str(tmp_path / "out"), "--disable_tqdm", "true", "--use_cpu", "true",
        "--logging_steps", "3", "--report_to", "none",
    ])
    out = capsys.readouterr().out
    line = [s for s in out.splitlines() if s.startswith("[sft_lora] summary:")]
    assert len(line) == 1 and "token_acc=" in line[0] and "accuracy_via=formula" in line[0]
    assert summary["steps"] == 6 and summary["data_source"].startswith("local")
    assert summary["eval_loss"] < summary["eval_loss_before"]
    assert 0.0 <= summary["token_accuracy"] <= 1.0
    assert (tmp_path / "out" / "adapter_config.json").is_file() and (tmp_path / "out" / "summary.json").is_file()
