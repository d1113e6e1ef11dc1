"""The Python API without traps: names registered by ``import hf_rmsuon``; ``optim_args`` honoured by
``optimizer_cls_and_kwargs``; a SAM member refused before the first forward where no second pass runs;
the default-lr warning; the routing report in transformers' log."""

from __future__ import annotations

import importlib
import logging
import os
import subprocess
import sys

import pytest
from _tiny import TokenData, tiny_qwen3, training_args
from transformers import Trainer

import hf_rmsuon
from hf_rmsuon.integration import factory, optimizer_cls_and_kwargs, unwrap_optimizer

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def test_import_registers_names_in_a_fresh_process():
    code = ("import sys, hf_rmsuon; assert 'transformers' not in sys.modules; "
            "from transformers import TrainingArguments; "
            "a = TrainingArguments(output_dir='x', optim='ars2_neo', report_to='none'); print(a.optim.value)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["ars2_neo"]


def test_optimizer_cls_and_kwargs_builds_from_optim_args(tmp_path):
    hf_rmsuon.install()  # a SAM member outside RMSuonTrainer (else the factory refuses it, as tested below)
    args = training_args(tmp_path, optim_args="k=5,rho=0.3")  # args.optim stays adamw_torch
    cls, kwargs = optimizer_cls_and_kwargs("ars2_neo", args)
    assert kwargs["k"] == 5 and kwargs["rho"] == 0.3
    optimizer = cls()(tiny_qwen3(), **kwargs)
    assert optimizer.defaults["k"] == 5 and optimizer.defaults["rho"] == 0.3


def test_optimizer_cls_and_kwargs_refuses_optim_args_of_another_member(tmp_path):
    hf_rmsuon.install()
    args = training_args(tmp_path, optim="ars", optim_args="k=5")
    with pytest.raises(ValueError, match="args.optim is 'ars'.*keyword overrides"):
        optimizer_cls_and_kwargs("ars2_neo", args)


def test_plain_trainer_with_sam_member_fails_before_any_forward(tmp_path, monkeypatch):
    install_module = importlib.import_module("hf_rmsuon.integration.install")
    monkeypatch.setattr(install_module, "is_installed", lambda: False)  # as in a process without install()
    model = tiny_qwen3()
    forwards = []
    model.register_forward_pre_hook(lambda m, a: forwards.append(1))
    trainer = Trainer(model=model, args=training_args(tmp_path, optim="ars"), train_dataset=TokenData(8))
    with pytest.raises(RuntimeError, match=r"RMSuonTrainer.*hf_rmsuon.install\(\)"):
        trainer.train()
    assert forwards == []


def test_plain_trainer_non_sam_member_says_how_to_get_diagnostics(tmp_path, monkeypatch, caplog):
    install_module = importlib.import_module("hf_rmsuon.integration.install")
    monkeypatch.setattr(install_module, "is_installed", lambda: False)
    monkeypatch.setattr(factory, "_WARNED", set())
    with caplog.at_level(logging.WARNING, logger="transformers.hf_rmsuon"):
        for _ in range(2):
            trainer = Trainer(model=tiny_qwen3(), args=training_args(tmp_path, optim="rmsuon"),
                              train_dataset=TokenData(8))
            trainer.create_optimizer()
    hints = [r.getMessage() for r in caplog.records if "diagnostics" in r.getMessage()]
    assert len(hints) == 1 and "hf_rmsuon.install()" in hints[0]


def test_default_learning_rate_warns_once(tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(factory, "_WARNED", set())
    with caplog.at_level(logging.WARNING, logger="transformers.hf_rmsuon"):
        args = training_args(tmp_path, learning_rate=5e-5)  # TrainingArguments' default
        optimizer_cls_and_kwargs("ada_rmsuon", args)
        optimizer_cls_and_kwargs("ada_rmsuon", args)
        optimizer_cls_and_kwargs("ada_rmsuon", training_args(tmp_path, learning_rate=1e-4))  # user's choice
    messages = [r.getMessage() for r in caplog.records if "learning_rate" in r.getMessage()]
    assert len(messages) == 1
    assert "5e-05" in messages[0] and "0.003" in messages[0] and "60×" in messages[0]


def test_routing_report_goes_to_transformers_log(tmp_path, caplog):
    import transformers

    previous = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_info()
    try:
        with caplog.at_level(logging.INFO, logger="transformers.hf_rmsuon"):
            trainer = hf_rmsuon.RMSuonTrainer(model=tiny_qwen3(), args=training_args(tmp_path, optim="ada_rmsuon"),
                                              train_dataset=TokenData(8))
            unwrap_optimizer(trainer.create_optimizer())
    finally:
        transformers.logging.set_verbosity(previous)
    ours = [r for r in caplog.records if r.name == "transformers.hf_rmsuon"]
    info = [r.getMessage() for r in ours if r.levelno == logging.INFO]
    warn = [r.getMessage() for r in ours if r.levelno == logging.WARNING]
    assert any("model.layers.0.self_attn.q_proj.weight" in m for m in info)  # the full report
    summary = [m for m in warn if m.startswith("hf_rmsuon ada_rmsuon:")]
    assert len(summary) == 1 and "\n" not in summary[0] and "matrix" in summary[0] and "adamw" in summary[0]
