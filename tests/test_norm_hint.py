"""The gradient-norm hint: a training loop's ‖g‖ (transformers' Trainer takes it before every step, to
clip and log) doubles as the optimizer's finiteness gate — used only when it covers exactly the step's
gradients, unmodified; otherwise the step computes its own gate."""

from __future__ import annotations

import warnings

import pytest
import torch
from _tiny import TokenData, tiny_qwen3, training_args
from transformers import Trainer, TrainerCallback

import hf_rmsuon
from hf_rmsuon.integration import RMSuonTrainer, install
from hf_rmsuon.integration.sam_step import unwrap_optimizer
from hf_rmsuon.optim.base import FamilyOptimizer

INF = torch.tensor(float("inf"))


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))


def _set_grads(model: torch.nn.Module, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=g)


def _weights(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def _unchanged(model: torch.nn.Module, before: list[torch.Tensor]) -> bool:
    return all(torch.equal(p, b) for p, b in zip(model.parameters(), before))


@pytest.fixture
def own_gate_calls(monkeypatch):
    """How many times an optimizer computed its own finiteness pass."""
    calls = []
    inner = FamilyOptimizer._local_finite_flag

    def counted(gathered):
        calls.append(len(gathered))
        return inner(gathered)

    monkeypatch.setattr(FamilyOptimizer, "_local_finite_flag", staticmethod(counted))
    return calls


@pytest.mark.parametrize("name", ["muon", "ada_rmsuon", "f_ada_rmsuon", "adamuon"])
def test_the_hint_is_the_gate(name, own_gate_calls):
    """A hint saying "not finite" over finite gradients skips the step: proof that the step took its gate
    from the hint, not from a pass of its own."""
    model = _model()
    opt = hf_rmsuon.create_optimizer(name, model)
    _set_grads(model)
    before = _weights(model)
    assert opt.accept_gradient_norm(INF, model.parameters())
    opt.step()
    assert _unchanged(model, before) and own_gate_calls == []
    with pytest.warns(RuntimeWarning, match="skipped"):
        assert opt.diagnostics()["nonfinite_steps"] == 1.0


@pytest.mark.parametrize("name", ["muon", "ada_rmsuon"])
def test_a_finite_hint_gives_the_same_step_without_the_pass(name, own_gate_calls):
    a, b = _model(), _model()
    opt_a, opt_b = hf_rmsuon.create_optimizer(name, a), hf_rmsuon.create_optimizer(name, b)
    for seed in (1, 2, 3):
        _set_grads(a, seed)
        _set_grads(b, seed)
        norm = torch.nn.utils.clip_grad_norm_(b.parameters(), 1.0)  # clipped like the Trainer does
        torch.nn.utils.clip_grad_norm_(a.parameters(), 1.0)
        assert opt_b.accept_gradient_norm(norm, b.parameters())
        opt_a.step()
        opt_b.step()
    assert len(own_gate_calls) == 3  # opt_a's three steps only
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)


def test_a_modified_gradient_voids_the_hint(own_gate_calls):
    model = _model()
    opt = hf_rmsuon.create_optimizer("ada_rmsuon", model)
    _set_grads(model)
    opt.accept_gradient_norm(INF, model.parameters())
    next(model.parameters()).grad.mul_(1.0)  # in place after the norm was taken: version changes
    before = _weights(model)
    opt.step()
    assert not _unchanged(model, before) and len(own_gate_calls) == 1


def test_a_replaced_gradient_voids_the_hint(own_gate_calls):
    model = _model()
    opt = hf_rmsuon.create_optimizer("muon", model)
    _set_grads(model)
    opt.accept_gradient_norm(INF, model.parameters())
    _set_grads(model, seed=5)
    before = _weights(model)
    opt.step()
    assert not _unchanged(model, before) and len(own_gate_calls) == 1


@pytest.mark.parametrize("coverage", ["more", "fewer"])
def test_a_hint_over_other_gradients_is_ignored(coverage, own_gate_calls):
    """The norm must cover exactly the optimizer's gradients: one over more tensors (another optimizer's
    too) would skip our step for their NaN; one over fewer would miss ours."""
    model = _model()
    params = list(model.parameters())
    opt = hf_rmsuon.create_optimizer("ada_rmsuon", params[:2] if coverage == "more" else params)
    _set_grads(model)
    opt.accept_gradient_norm(INF, params if coverage == "more" else params[:2])
    before = _weights(model)
    opt.step()
    assert not torch.equal(params[0], before[0]) and len(own_gate_calls) == 1


def test_a_hint_lasts_one_step(own_gate_calls):
    model = _model()
    opt = hf_rmsuon.create_optimizer("muon", model)
    _set_grads(model)
    opt.accept_gradient_norm(INF, model.parameters())
    opt.step()  # skipped by the hint
    before = _weights(model)
    opt.step()  # same, untouched gradient tensors: the hint must not be reused
    assert not _unchanged(model, before) and len(own_gate_calls) == 1
    with pytest.warns(RuntimeWarning):
        opt.diagnostics()


@pytest.mark.parametrize("norm", [float("inf"), torch.tensor([1.0, 2.0]), torch.tensor(7e4, dtype=torch.float16),
                                  torch.tensor(1.0, device="meta")],
                         ids=["python-float", "not-a-scalar", "float16", "other-device"])
def test_unusable_norms_are_not_recorded(norm):
    """A float16 norm overflows at 65504 for finite gradients: it would skip good steps."""
    model = _model()
    opt = hf_rmsuon.create_optimizer("muon", model)
    _set_grads(model)
    assert not opt.accept_gradient_norm(norm, model.parameters())
    before = _weights(model)
    opt.step()
    assert not _unchanged(model, before)


@pytest.mark.parametrize("hp", [dict(k=1), dict(k=2)], ids=["k1", "k2"])
def test_sam_sync_steps_take_the_gate_from_the_hint(hp, own_gate_calls):
    """ARS2-Neo, training-loop protocol: the hint over the adversarial gradient gates a sync step; lazy
    steps with a stored shear force get the gate from the per-tensor norms the injection takes anyway."""
    model = _model()
    opt = hf_rmsuon.create_optimizer("ars2_neo", model, **hp)
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(0))

    def backward():
        opt.zero_grad()
        loss = model(x).square().mean()
        loss.backward()
        return loss.detach()

    for step in range(4):
        loss = backward()
        sync = opt.sam_pass_due()
        if sync:
            opt.begin_sam_pass()
            adv = backward()
            opt.end_sam_pass(loss, adv)
        before = _weights(model)
        skip = step == 2 and sync
        opt.accept_gradient_norm(INF if skip else torch.nn.utils.get_total_norm([p.grad for p in model.parameters()]),
                                 model.parameters())
        opt.step()
        assert _unchanged(model, before) == skip
    assert own_gate_calls == []


# -- through the Trainer ---------------------------------------------------------------------------------


class NaNOnce:
    """A gradient hook that turns one parameter's gradient into NaN on the ``at``-th backward."""

    def __init__(self, param: torch.nn.Parameter, at: int) -> None:
        self.count, self.at = 0, at
        param.register_hook(self)

    def __call__(self, grad: torch.Tensor) -> torch.Tensor:
        self.count += 1
        return grad * float("nan") if self.count == self.at else grad


def _train(trainer_cls, tmp_path, optim: str, optim_args: str = "", nan_at: int | None = None, **kw):
    model = tiny_qwen3()
    if nan_at is not None:
        NaNOnce(model.model.layers[0].mlp.up_proj.weight, nan_at)
    args = training_args(tmp_path, optim=optim, optim_args=optim_args or None, max_steps=4, **kw)
    trainer = trainer_cls(model=model, args=args, train_dataset=TokenData(16))
    snapshots = []

    class Snap(TrainerCallback):
        def on_step_end(self, *a, **k):
            snapshots.append(model.model.layers[0].mlp.up_proj.weight.detach().clone())

    trainer.add_callback(Snap())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        trainer.train()
    return unwrap_optimizer(trainer.optimizer), snapshots


@pytest.mark.parametrize(("optim", "optim_args", "nan_at"), [("ada_rmsuon", "", 3), ("ars2_neo", "k=2", 5)],
                         ids=["ada_rmsuon", "ars2_neo-k2"])
@pytest.mark.parametrize("max_grad_norm", [1.0, 0.0], ids=["clipped", "norm-logged-only"])
def test_trainer_steps_take_the_gate_from_its_gradient_norm(tmp_path, own_gate_calls, optim, optim_args, nan_at,
                                                           max_grad_norm):
    """The Trainer takes ‖g‖ every step (clipping, or just for the log); with it no step makes a
    finiteness pass of its own — and a NaN gradient in the third step still skips that step (ARS2-Neo:
    in the adversarial pass of its second sync step, backward 5 = steps 1, 2, 3 take 2, 1, 2 passes)."""
    opt, weights = _train(RMSuonTrainer, tmp_path, optim, optim_args, nan_at=nan_at, max_grad_norm=max_grad_norm)
    assert own_gate_calls == []
    assert opt.stats["steps"] == 4
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        assert opt.diagnostics()["nonfinite_steps"] == 1.0
    assert not torch.equal(weights[0], weights[1]) and not torch.equal(weights[2], weights[3])
    assert torch.equal(weights[1], weights[2])


def test_installed_plain_trainer_passes_its_gradient_norm(tmp_path, own_gate_calls):
    install()
    opt, _ = _train(Trainer, tmp_path, "ada_rmsuon")
    assert own_gate_calls == [] and opt.stats["steps"] == 4


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_trainer_on_cuda_in_bf16_takes_the_gate_from_its_gradient_norm(tmp_path, own_gate_calls):
    """The same on a GPU under bf16 autocast: the Trainer's norm lives on the gradients' device."""
    opt, weights = _train(RMSuonTrainer, tmp_path, "ars2_neo", "k=2", nan_at=5, use_cpu=False, bf16=True)
    assert own_gate_calls == []
    assert opt.stats["steps"] == 4 and weights[0].device.type == "cuda"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        assert opt.diagnostics()["nonfinite_steps"] == 1.0
    assert torch.equal(weights[1], weights[2]) and not torch.equal(weights[2], weights[3])
