"""Exact SAM through ``RMSuonTrainer`` (SPEC §5, §6; issue 3 "Exact SAM").

The gradient the optimizer receives at ``step()`` is compared with a full-batch SAM gradient
computed here by hand — plain autograd on a separate copy of the model, the perturbation
``e = ρ·N/‖N‖`` (``N = g/(√v̂_prev+ε)``, ``N = g`` on the first step, ``⊙|w|``, global norm) written
out again — with gradient accumulation 1 and 2, in one process and in 2-process CPU DDP (gloo).
Every step's global batch is the whole data set, so the reference does not depend on sample order:
the loss is the token mean over all the step's loss tokens, which is what transformers computes
with ``num_items_in_batch``.

Also: exact restore (lr = 0 leaves the weights bit-identical), bit-identical parameters on both DDP
ranks, dropout masks replayed in the second pass, and BatchNorm statistics untouched by it.
"""

from __future__ import annotations

import contextlib
import functools
from pathlib import Path
from typing import Any

import pytest
import torch
from _tiny import TokenData, tiny_qwen3, training_args
from torch import nn
from torch.utils.data import Dataset

from hf_rmsuon import RMSuonTrainer
from hf_rmsuon.integration import sam_step
from hf_rmsuon.integration.sam_step import unwrap_optimizer
from hf_rmsuon.optim.base import FamilyOptimizer

RHO = 0.05
BETA2 = 0.999
EPS = 1e-8
ATOL = 1e-6


# --------------------------------------------------------------------------------------------------
# The spy: what the optimizer sees
# --------------------------------------------------------------------------------------------------


class SpyTrainer(RMSuonTrainer):
    """Records, per update step: the weights and the base gradient before ``begin_sam_pass``, the
    optimizer's second moments and step counts then, the perturbed weights right after it, the
    gradient and weights at ``step()`` (an optimizer step pre-hook, after clipping), and the
    micro-batches this process trained on."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.sam_records: list[dict[str, Any]] = []
        self.step_records: list[dict[str, Any]] = []
        self.seen: list[dict[str, torch.Tensor]] = []

    def _named(self) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]

    def create_optimizer(self, model=None):
        optimizer = super().create_optimizer(model)
        inner = unwrap_optimizer(optimizer)
        original_begin = inner.begin_sam_pass

        def begin_sam_pass(*args: Any, **kwargs: Any) -> None:
            named = self._named()
            rec: dict[str, Any] = {
                "w": {n: p.detach().clone() for n, p in named},
                "g": {n: p.grad.detach().clone() for n, p in named},
                "v": {n: inner.state[p]["exp_avg_sq"].clone() for n, p in named if "exp_avg_sq" in inner.state[p]},
                "t": {n: int(inner.state[p]["step"]) for n, p in named if "step" in inner.state[p]},
            }
            original_begin(*args, **kwargs)
            rec["w_pert"] = {n: p.detach().clone() for n, p in named}
            self.sam_records.append(rec)

        inner.begin_sam_pass = begin_sam_pass

        def pre_step(opt, args, kwargs) -> None:
            named = self._named()
            self.step_records.append({
                "g_adv": {n: p.grad.detach().clone() for n, p in named},
                "w": {n: p.detach().clone() for n, p in named},
            })

        inner.register_step_pre_hook(pre_step)
        return optimizer

    def training_step(self, model, inputs, num_items_in_batch=None):
        self.seen.append({k: v.detach().clone() for k, v in inputs.items()})
        return super().training_step(model, inputs, num_items_in_batch)


# --------------------------------------------------------------------------------------------------
# The hand reference (no hf_rmsuon code)
# --------------------------------------------------------------------------------------------------


def full_batch_grad(model: nn.Module, weights: dict[str, torch.Tensor], batch: dict) -> dict[str, torch.Tensor]:
    """∇ of the token-mean loss over the whole batch at ``weights`` (plain autograd, one forward)."""
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(weights[n])
    model.zero_grad(set_to_none=True)
    model.train()
    model(**batch).loss.backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def hand_perturbation(g: dict, w: dict, v_hat: dict | None) -> dict[str, torch.Tensor]:
    """``e = ρ·N/‖N‖``, ``N = g/(√v̂+ε)`` (``g`` when ``v_hat`` is None), ``N ← N⊙|w|``, one global norm."""
    n_dir = {k: (g[k] if v_hat is None else g[k] / (v_hat[k].sqrt() + EPS)) * w[k].abs() for k in g}
    norm = torch.sqrt(sum((x.double() ** 2).sum() for x in n_dir.values()))
    return {k: (RHO * x.double() / norm).float() for k, x in n_dir.items()}


def assert_close(actual: dict, expected: dict, what: str, atol: float = ATOL) -> None:
    assert actual.keys() == expected.keys(), what
    worst = max(float((actual[k] - expected[k]).abs().max()) for k in expected)
    scale = max(float(expected[k].abs().max()) for k in expected)
    assert worst <= atol, f"{what}: max |difference| {worst:.3g} > {atol} (max |reference| {scale:.3g})"


def check_exact_sam(sam_records: list, step_records: list, data: TokenData, steps: int) -> None:
    """Steps 1..``steps``: base gradient, perturbation and adversarial gradient vs the hand reference."""
    assert len(sam_records) == steps and len(step_records) == steps, "every step must be a sync step (k=1)"
    ref_model = tiny_qwen3()
    batch = data.full_batch()
    prev_received = None
    for s, (rec, at_step) in enumerate(zip(sam_records, step_records), start=1):
        w = rec["w"]
        g = full_batch_grad(ref_model, w, batch)
        assert_close(rec["g"], g, f"step {s}: base gradient (first pass)")
        if prev_received is None:
            v_hat = None
            assert rec["v"] == {} and rec["t"] == {}, "no optimizer state before the first step"
        else:
            # After step 1 the second moment is v = (1−β2)·g_adv₁² of the gradient step 1 received (that
            # one was checked against the reference). N divides by √v̂, which amplifies float32 noise in
            # tiny entries of g_adv₁ far beyond 1e-6, so e is built from the optimizer's own v̂.
            assert set(rec["t"].values()) == {1}
            for k, x in prev_received.items():
                torch.testing.assert_close(rec["v"][k], (1 - BETA2) * x**2, rtol=1e-5, atol=0,
                                           msg=f"step {s}: second moment of {k} is not (1−β2)·g_adv²")
            v_hat = {k: x / (1 - BETA2 ** rec["t"][k]) for k, x in rec["v"].items()}
        e = hand_perturbation(g, w, v_hat)
        assert abs(float(torch.sqrt(sum((x.double() ** 2).sum() for x in e.values()))) - RHO) < 1e-6
        assert_close({k: rec["w_pert"][k] - w[k] for k in w}, e, f"step {s}: perturbation e = w_pert - w")
        g_adv = full_batch_grad(ref_model, {k: w[k] + e[k] for k in w}, batch)
        assert_close(at_step["g_adv"], g_adv, f"step {s}: gradient at optimizer.step() vs ∇L(w+e)")
        # and it is really the adversarial one, not the base gradient
        assert max(float((g_adv[k] - g[k]).abs().max()) for k in g) > 100 * ATOL
        for k in w:  # restored exactly before the step
            assert torch.equal(at_step["w"][k], w[k]), f"step {s}: {k} not restored bit-exactly"
        prev_received = at_step["g_adv"]


def sam_args(tmp_path, ga: int, **overrides: Any):
    kw: dict[str, Any] = dict(
        optim="ars", optim_args=f"rho={RHO},k=1", gradient_accumulation_steps=ga, max_grad_norm=0.0,
        learning_rate=1e-3, adam_beta2=BETA2, adam_epsilon=EPS, max_steps=2,
    )
    kw.update(overrides)
    return training_args(tmp_path, **kw)


# --------------------------------------------------------------------------------------------------
# One process
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ga", [1, 2])
def test_exact_sam_single_process(tmp_path, ga):
    per_device = 2
    data = TokenData(per_device * ga)  # each step's batch is the whole data set
    trainer = SpyTrainer(model=tiny_qwen3(), args=sam_args(tmp_path, ga, per_device_train_batch_size=per_device),
                         train_dataset=data)
    trainer.train()
    assert len(trainer.seen) == 2 * ga
    check_exact_sam(trainer.sam_records, trainer.step_records, data, steps=2)


def test_exact_restore_lr_zero(tmp_path):
    """lr = 0, weight decay 0: after sync steps the weights are bit-identical to the initial ones — the
    restore copies the saved w back rather than subtracting e."""
    model = tiny_qwen3()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = SpyTrainer(model=model, args=sam_args(tmp_path, 2, learning_rate=0.0, weight_decay=0.0),
                         train_dataset=TokenData(4))
    trainer.train()
    assert len(trainer.sam_records) == 2
    moved = max(float((r["w_pert"][n] - r["w"][n]).abs().max()) for r in trainer.sam_records for n in r["w"])
    assert moved > 1e-4  # the second pass really ran at w + e
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), before[n]), f"{n} changed with lr=0"


# --------------------------------------------------------------------------------------------------
# Two-process CPU DDP (gloo) through accelerate.debug_launcher
# --------------------------------------------------------------------------------------------------


def _ddp_worker(out_dir: str, ga: int) -> None:
    from accelerate.state import AcceleratorState

    torch.set_num_threads(1)
    AcceleratorState._reset_state(reset_partial_state=True)  # the forked child must not inherit the parent's
    per_device, world = 2, 2
    data = TokenData(per_device * ga * world)
    trainer = SpyTrainer(model=tiny_qwen3(),
                         args=sam_args(out_dir, ga, per_device_train_batch_size=per_device, max_steps=2),
                         train_dataset=data)
    assert trainer.args.world_size == world
    own_gates = []  # finiteness passes of the optimizer's own (the Trainer's ‖g‖ should stand in for them)
    inner = FamilyOptimizer._local_finite_flag
    FamilyOptimizer._local_finite_flag = staticmethod(lambda gathered: own_gates.append(1) or inner(gathered))
    try:
        trainer.train()
    finally:
        FamilyOptimizer._local_finite_flag = staticmethod(inner)
    rank = trainer.args.process_index
    flat = torch.cat([p.detach().reshape(-1) for p in trainer.model.parameters()])
    gathered = [torch.empty_like(flat) for _ in range(world)]
    torch.distributed.all_gather(gathered, flat)
    torch.save({
        "sam": trainer.sam_records, "step": trainer.step_records, "seen": trainer.seen,
        "identical_params": all(torch.equal(gathered[0], x) for x in gathered),
        "num_processes": trainer.accelerator.num_processes, "own_gate_passes": len(own_gates),
    }, Path(out_dir) / f"rank{rank}.pt")
    AcceleratorState._reset_state(reset_partial_state=True)


def _assert_exact_sam_ddp(tmp_path, monkeypatch, ga: int) -> None:
    from accelerate import debug_launcher

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    debug_launcher(functools.partial(_ddp_worker, str(tmp_path), ga), num_processes=2)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    data = TokenData(2 * ga * 2)
    for r in ranks:
        assert r["num_processes"] == 2
        assert r["identical_params"], "DDP ranks ended with different parameters"
        assert r["own_gate_passes"] == 0, "the Trainer's gradient norm was not used as the finiteness gate"
    # each rank saw different data; together, every step, exactly the whole data set
    for step in range(2):
        rows = [torch.cat([mb["input_ids"] for mb in r["seen"][step * ga:(step + 1) * ga]]) for r in ranks]
        mine = [sorted(map(tuple, x.tolist())) for x in rows]
        assert not set(mine[0]) & set(mine[1]), "both ranks trained on the same samples"
        assert sorted(mine[0] + mine[1]) == sorted(map(tuple, data.input_ids.tolist()))
    # both ranks saw the same (all-reduced) gradients and perturbation
    for a, b in zip(ranks[0]["step"], ranks[1]["step"]):
        for k in a["g_adv"]:
            assert torch.equal(a["g_adv"][k], b["g_adv"][k])
    check_exact_sam(ranks[0]["sam"], ranks[0]["step"], data, steps=2)
    check_exact_sam(ranks[1]["sam"], ranks[1]["step"], data, steps=2)


@pytest.mark.parametrize("ga", [1, 2])
def test_exact_sam_ddp(tmp_path, monkeypatch, ga):
    _assert_exact_sam_ddp(tmp_path, monkeypatch, ga)  # every check lives in the helper


# --------------------------------------------------------------------------------------------------
# Dropout RNG and BatchNorm statistics in the second pass
# --------------------------------------------------------------------------------------------------


class DropoutLM(nn.Module):
    """Embedding → Linear → tanh → Dropout(0.5) → head; logs (input_ids, keep mask) of every forward."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(64, 16)
        self.proj = nn.Linear(16, 16)
        self.drop = nn.Dropout(0.5)
        self.head = nn.Linear(16, 64)
        self.log: list[tuple[torch.Tensor, torch.Tensor]] = []

    def forward(self, input_ids, labels):
        h = self.drop(torch.tanh(self.proj(self.embed(input_ids))))
        self.log.append((input_ids.detach().clone(), h.detach() != 0))
        logits = self.head(h)
        return {"loss": nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)}


def _dropout_passes(tmp_path, replay_rng: bool) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    torch.manual_seed(0)
    model = DropoutLM()
    ga, steps = 2, 2
    args = training_args(tmp_path, optim="ars", optim_args=f"rho={RHO},k=1,replay_rng={replay_rng}",
                         gradient_accumulation_steps=ga, max_steps=steps)
    RMSuonTrainer(model=model, args=args, train_dataset=TokenData(2 * ga)).train()
    assert len(model.log) == 2 * ga * steps  # two passes over every micro-batch
    pairs = []
    for s in range(steps):
        step_log = model.log[2 * ga * s:2 * ga * (s + 1)]
        first, second = step_log[:ga], step_log[ga:]  # pass 1, then the replay in the same order
        for (ids1, m1), (ids2, m2) in zip(first, second):
            assert torch.equal(ids1, ids2)
            pairs.append((m1, m2, ids1))
    return pairs


def test_dropout_masks_replayed_in_second_pass(tmp_path):
    pairs = _dropout_passes(tmp_path, replay_rng=True)
    for m1, m2, _ in pairs:
        assert 0.3 < m1.float().mean() < 0.7  # dropout is active
        assert torch.equal(m1, m2), "the second pass drew different dropout masks"
    assert not torch.equal(pairs[0][0], pairs[1][0])  # different micro-batches get fresh masks


def test_dropout_masks_differ_without_replay(tmp_path):
    """Control: with replay_rng=False the masks of the two passes differ, so the test above can fail."""
    pairs = _dropout_passes(tmp_path, replay_rng=False)
    assert any(not torch.equal(m1, m2) for m1, m2, _ in pairs)


class BNNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 8)
        self.bn = nn.BatchNorm1d(8)
        self.fc2 = nn.Linear(8, 1)

    def forward(self, x, y):
        pred = self.fc2(torch.relu(self.bn(self.fc1(x)))).squeeze(-1)
        return {"loss": nn.functional.mse_loss(pred, y)}


class Regression(Dataset):
    def __init__(self, n: int = 8) -> None:
        g = torch.Generator().manual_seed(3)
        self.x = torch.randn(n, 6, generator=g)
        self.y = torch.randn(n, generator=g)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"x": self.x[i], "y": self.y[i]}


def _bn_after_one_step(tmp_path, k: int) -> tuple[dict[str, torch.Tensor], int]:
    torch.manual_seed(0)
    model = BNNet()
    ga = 2
    trainer = SpyTrainer(model=model, args=training_args(
        tmp_path, optim="ars", optim_args=f"rho=0.5,k={k}", gradient_accumulation_steps=ga,
        per_device_train_batch_size=4, max_steps=1, learning_rate=1e-2), train_dataset=Regression(8))
    trainer.train()
    assert len(trainer.sam_records) == (1 if k else 0)
    stats = {n: b.detach().clone() for n, b in model.bn.named_buffers()}
    return stats, ga


def test_batchnorm_stats_untouched_by_second_pass(tmp_path):
    synced, ga = _bn_after_one_step(tmp_path / "k1", k=1)
    plain, _ = _bn_after_one_step(tmp_path / "k0", k=0)
    assert int(synced["num_batches_tracked"]) == ga  # one update per micro-batch of the first pass
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        assert torch.equal(synced[name], plain[name]), f"second pass changed BatchNorm {name}"
    assert float(synced["running_mean"].abs().max()) > 1e-3  # the statistics did move in the first pass


def test_batchnorm_control_detects_second_pass_updates(tmp_path, monkeypatch):
    """Control: without the protection the second pass does update the statistics (the test can fail)."""
    monkeypatch.setattr(sam_step, "preserved_batchnorm_stats", lambda model: contextlib.nullcontext())
    synced, ga = _bn_after_one_step(tmp_path / "k1", k=1)
    plain, _ = _bn_after_one_step(tmp_path / "k0", k=0)
    assert int(synced["num_batches_tracked"]) == 2 * ga
    assert not torch.equal(synced["running_mean"], plain["running_mean"])

