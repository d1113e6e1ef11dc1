"""``python -m hf_rmsuon list``: compact table, one member's full table, "did you mean"; the
launcher's help points to it; an invalid ``--optim`` gets "did you mean"."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from hf_rmsuon import available_optimizers, get_optimizer_class
from hf_rmsuon.__main__ import main
from hf_rmsuon.registry import RECOMMENDED_LR, recommended_lr

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def test_list_is_a_compact_table(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert len(lines) < 20 and "`" not in out
    for name in available_optimizers():
        row = next(line for line in lines if line.split()[:1] == [name])
        assert f"{RECOMMENDED_LR[name]:g}" in row.split()
    assert "rho=0.1 k=1" in next(line for line in lines if line.startswith("ars2_neo"))
    assert "python -m hf_rmsuon list NAME" in out and "--learning_rate default 5e-05" in out


def test_list_name_shows_every_key_and_the_optim_args_syntax(capsys):
    assert main(["list", "ars2_neo"]) == 0
    out = capsys.readouterr().out
    for p in get_optimizer_class("ars2_neo").schema:
        assert any(line.split()[:1] == [p.name] for line in out.splitlines()), p.name
    assert "recommended learning rate: 0.003" in out
    assert '--optim ars2_neo --optim_args "rho=0.05,k=5,betas=0.9:0.95"' in out
    assert "in a Trainer: from --learning_rate" in out


def test_list_typo_suggests_without_traceback():
    out = subprocess.run([sys.executable, "-m", "hf_rmsuon", "list", "ars2neo"], capture_output=True, text=True,
                         env=ENV, timeout=120)
    assert out.returncode == 2
    assert "Did you mean 'ars2_neo'?" in out.stderr and "Traceback" not in out.stderr


def test_recommended_lr_for_every_member():
    assert set(RECOMMENDED_LR) == set(available_optimizers())
    assert recommended_lr("muon") == 2e-2
    with pytest.raises(ValueError, match="available"):
        recommended_lr("ars3")


def test_launcher_help_points_to_list_and_cpu_ddp():
    from hf_rmsuon import run

    assert "python -m hf_rmsuon list" in run.__doc__
    assert "--multi_gpu --num_processes 2" in run.__doc__ and "--use_cpu" in run.__doc__


def test_invalid_optim_choice_gets_did_you_mean(capsys):
    from transformers import HfArgumentParser, TrainingArguments

    from hf_rmsuon import install

    install()
    with pytest.raises(SystemExit):
        HfArgumentParser(TrainingArguments).parse_args_into_dataclasses(
            args=["--output_dir", "x", "--optim", "ars2neo"])
    err = capsys.readouterr().err
    assert "invalid choice" in err and "Did you mean 'ars2_neo'?" in err and "hf_rmsuon list" in err
    with pytest.raises(ValueError, match="Did you mean 'ada_rmsuon'"):
        TrainingArguments(output_dir="x", optim="adarmsuon")
