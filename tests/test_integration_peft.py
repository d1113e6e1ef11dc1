"""PEFT LoRA / DoRA fine-tuning with every family member through ``RMSuonTrainer`` (SPEC §3, §6;
issue 3 "PEFT LoRA with each family member trains a tiny model; the zero-initialised factor produces
no NaN; the routing report lists every adapter tensor in its track")."""

from __future__ import annotations

import math
from typing import Any

import peft
import pytest
import torch
from _tiny import TokenData, tiny_qwen3, training_args
from transformers import TrainerCallback

import hf_rmsuon
from hf_rmsuon import RMSuonTrainer
from hf_rmsuon.integration.sam_step import unwrap_optimizer

FAMILY = hf_rmsuon.available_optimizers()
TARGETS = ["q_proj", "v_proj"]


def lora_model(seed: int = 0, **config: Any) -> peft.PeftModel:
    model = tiny_qwen3(seed)
    return peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=TARGETS, task_type="CAUSAL_LM", **config))


def snapshot(model: torch.nn.Module, trainable: bool) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad == trainable}


def full_loss(model: torch.nn.Module, data: TokenData) -> float:
    model.eval()
    with torch.no_grad():
        return float(model(**data.full_batch()).loss)


class AfterStep(TrainerCallback):
    """Copies the trainable parameters at the end of every optimizer step."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.params: list[dict[str, torch.Tensor]] = []

    def on_step_end(self, args, state, control, **kwargs):
        self.params.append(snapshot(self.model, trainable=True))


def expected_track(name: str, policy: str) -> str:
    """SPEC §3/§6, written out from the parameter name alone."""
    if "lora_magnitude_vector" in name or "modules_to_save" in name:
        return "adamw"
    if "lora_A" in name:
        return "matrix" if policy == "both" else "adamw"
    if "lora_B" in name:
        return "matrix" if policy in ("both", "B") else "adamw"
    raise AssertionError(f"unexpected trainable tensor {name}")


def train(tmp_path, model, name: str, steps: int, data: TokenData, optim_args: str = "", lr: float = 1e-2,
          **kw: Any) -> tuple[RMSuonTrainer, AfterStep]:
    spy = AfterStep(model)
    args = training_args(tmp_path, optim=name, optim_args=optim_args or None, max_steps=steps, learning_rate=lr,
                         per_device_train_batch_size=4, **kw)
    trainer = RMSuonTrainer(model=model, args=args, train_dataset=data, callbacks=[spy])
    trainer.train()
    assert type(unwrap_optimizer(trainer.optimizer)).name == name  # a family optimizer, not a fallback
    return trainer, spy


# --------------------------------------------------------------------------------------------------
# Every member trains LoRA
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", FAMILY)
def test_lora_trains_with_each_member(tmp_path, name):
    model = lora_model()
    data = TokenData(8)
    frozen_before = snapshot(model, trainable=False)
    adapters_before = snapshot(model, trainable=True)
    assert adapters_before and all("lora_" in n for n in adapters_before)
    loss_before = full_loss(model, data)
    trainer, spy = train(tmp_path, model, name, steps=4, data=data)

    # the zero-initialised B factor: step 1 moves B off zero and nothing becomes NaN/inf; A got an
    # exactly-zero gradient (∂L/∂A = Bᵀ(…) = 0), so it must not have moved at all
    first = spy.params[0]
    for n, p in first.items():
        assert torch.isfinite(p).all(), f"{name}: {n} not finite after step 1"
        if "lora_B" in n:
            assert torch.count_nonzero(adapters_before[n]) == 0
            assert float(p.abs().max()) > 0, f"{name}: {n} still zero after step 1"
        else:
            assert torch.equal(p, adapters_before[n]), f"{name}: {n} moved on an exactly-zero gradient"

    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 4 and all(math.isfinite(v) for v in losses)
    after = snapshot(model, trainable=True)
    for n, p in after.items():
        assert torch.isfinite(p).all()
        assert not torch.equal(p, adapters_before[n]), f"{name}: adapter {n} did not change"
    for n, p in model.named_parameters():
        if n in frozen_before:
            assert not p.requires_grad and torch.equal(p.detach(), frozen_before[n]), f"{name}: base {n} changed"
    assert full_loss(model, data) < loss_before, f"{name}: training loss did not decrease"


@pytest.mark.parametrize("name", FAMILY)
def test_zero_init_factor_safe_with_weight_decay(tmp_path, name):
    """With weight decay (lr 1e-2, wd 0.1) the exactly-zero gradient of A on step 1 may shrink A by
    decoupled decay (|ΔA| ≤ lr·wd·|A|) but nothing more, and nothing becomes NaN/inf in two steps."""
    lr, wd = 1e-2, 0.1
    model = lora_model()
    before = snapshot(model, trainable=True)
    _, spy = train(tmp_path, model, name, steps=2, data=TokenData(8), lr=lr, weight_decay=wd)
    for s, params in enumerate(spy.params, start=1):
        for n, p in params.items():
            assert torch.isfinite(p).all(), f"{name}: {n} not finite after step {s}"
    for n, p in spy.params[0].items():
        if "lora_A" in n:
            bound = (lr * wd + 1e-6) * before[n].abs() + 1e-12  # + float32 rounding of p·(1−lr·wd)
            assert ((p - before[n]).abs() <= bound).all(), f"{name}: {n} moved beyond weight decay on a zero gradient"
        else:
            assert float(p.abs().max()) > 0


# --------------------------------------------------------------------------------------------------
# Routing of adapter tensors
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("policy", ["both", "B", "none"])
def test_routing_report_lists_every_adapter_tensor(tmp_path, policy):
    model = lora_model()
    args = training_args(tmp_path, optim="ars2_neo", optim_args=f"lora_policy={policy}")
    trainer = RMSuonTrainer(model=model, args=args, train_dataset=TokenData(4))
    optimizer = unwrap_optimizer(trainer.create_optimizer())
    report = optimizer.routing_report
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert len(trainable) == 8  # 2 layers × (q_proj, v_proj) × (A, B)
    assert [e.name for e in report.entries] == sorted(trainable, key=[n for n, _ in model.named_parameters()].index)
    for e in report.entries:
        assert e.track == expected_track(e.name, policy), f"{e.name}: {e.track} ({e.reason})"
        assert not e.flagged
    # the optimizer's own param groups agree with the report
    by_id = {id(p): n for n, p in model.named_parameters()}
    for group in optimizer.param_groups:
        for p in group["params"]:
            assert optimizer.spec_of(p).track == report.track_of(by_id[id(p)])
    text = str(report)
    assert all(n in text for n in trainable) and not any(n in text for n in frozen)
    counts = report.counts()
    n_matrix = {"both": 8, "B": 4, "none": 0}[policy]
    assert counts["matrix"]["tensors"] == n_matrix and counts["adamw"]["tensors"] == 8 - n_matrix


def test_lora_policy_rejects_unknown_value(tmp_path):
    with pytest.raises(ValueError, match="lora_policy"):
        hf_rmsuon.create_optimizer("rmsuon", lora_model(), lora_policy="A")


@pytest.mark.parametrize("module", ["lm_head", "embed_tokens"])
def test_modules_to_save_copy_on_adamw(module):
    model = lora_model(modules_to_save=[module])
    report = hf_rmsuon.create_optimizer("ars", model).routing_report
    copies = [e for e in report.entries if "modules_to_save" in e.name]
    assert len(copies) == 1 and module in copies[0].name
    assert copies[0].track == "adamw" and not copies[0].flagged
    assert not any("original_module" in e.name for e in report.entries)  # the frozen original
    for e in report.entries:
        assert e.track == expected_track(e.name, "both")


def test_modules_to_save_head_trains(tmp_path):
    model = lora_model(modules_to_save=["lm_head"])
    frozen_before = snapshot(model, trainable=False)
    trainable_before = snapshot(model, trainable=True)
    (copy_name,) = [n for n in trainable_before if "modules_to_save" in n]
    trainer, _ = train(tmp_path, model, "ars", steps=2, data=TokenData(8), lr=1e-3)
    after = snapshot(model, trainable=True)
    assert not torch.equal(after[copy_name], trainable_before[copy_name])
    assert all(torch.isfinite(p).all() for p in after.values())
    for n, p in model.named_parameters():
        if n in frozen_before:
            assert torch.equal(p.detach(), frozen_before[n]), f"frozen {n} changed"


@pytest.mark.parametrize("name", ["rmsuon", "ars2_neo"])
def test_dora_trains_with_magnitudes_on_adamw(tmp_path, name):
    model = lora_model(use_dora=True)
    report = hf_rmsuon.create_optimizer(name, model).routing_report
    magnitudes = [e for e in report.entries if "lora_magnitude_vector" in e.name]
    assert len(magnitudes) == 4
    for e in report.entries:
        assert e.track == expected_track(e.name, "both"), f"{e.name}: {e.track}"
    frozen_before = snapshot(model, trainable=False)
    trainable_before = snapshot(model, trainable=True)
    train(tmp_path, model, name, steps=3, data=TokenData(8), lr=1e-3)
    after = snapshot(model, trainable=True)
    for n, p in after.items():
        assert torch.isfinite(p).all(), n
        assert not torch.equal(p, trainable_before[n]), f"{n} did not change"
    for n, p in model.named_parameters():
        if n in frozen_before:
            assert torch.equal(p.detach(), frozen_before[n]), f"frozen {n} changed"
