"""The foundation (issue 10): matrix views from routing (conv, declared stacks), the user's param
groups kept as given, SAM safety without a model, linear SAM bookkeeping, low-precision state, and
the small validation holes."""

from __future__ import annotations

import cProfile
import math
import pstats

import pytest
import torch
from _numeric import gen as _gen
from torch import nn

import hf_rmsuon
from hf_rmsuon import create_optimizer, get_optimizer_class, parse_optim_args
from hf_rmsuon.optim.sam import RNGState

ALL = hf_rmsuon.available_optimizers()
SAM_MEMBERS = ("ars", "ars2_neo")
BAND = (0.6, 1.25)  # the quintic iteration's singular-value band (see test_functional.py)


def _pure_ns_update(model: nn.Module, **kwargs) -> dict[str, torch.Tensor]:
    """One pure_ns_muon step at lr 1, no decay, with random gradients: returns ``p0 − p1 = s·NS(g)``
    per parameter name, and stores the gradients in ``.grads``."""
    opt = create_optimizer("pure_ns_muon", model, lr=1.0, weight_decay=0.0, ns_dtype="float32", **kwargs)
    g = _gen(3)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=g)
    opt.step()
    _pure_ns_update.grads = {n: p.grad for n, p in model.named_parameters()}
    _pure_ns_update.opt = opt
    return {n: before[n] - p.detach() for n, p in model.named_parameters()}


# --------------------------------------------------------------------------------------------------
# Matrix views: conv weights as (out, in·∏kernel), declared stacks per slice
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("conv", [nn.Conv1d(16, 32, 3), nn.Conv2d(4, 12, (3, 2)), nn.Conv3d(2, 6, 3),
                                  nn.ConvTranspose1d(8, 4, 5)])
def test_conv_weights_use_the_out_by_rest_view(ref, conv):
    update = _pure_ns_update(nn.Sequential(conv))
    w = conv.weight
    rows, cols = w.shape[0], math.prod(w.shape[1:])
    spec = _pure_ns_update.opt.spec_of(w)
    assert spec.track == "matrix" and spec.view == "flatten" and spec.matrix_shape == (rows, cols)
    assert "Conv" in spec.reason and not spec.flagged
    # Muon's shape factor on the (out, −1) view, and NS of that view (independent float64 reference)
    scale = math.sqrt(max(1.0, rows / cols))
    want = scale * ref.ns(_pure_ns_update.grads["0.weight"], view="flatten")
    torch.testing.assert_close(update["0.weight"].double(), want, rtol=0, atol=5e-5 * scale)
    sigma = torch.linalg.svdvals(update["0.weight"].reshape(rows, cols).double() / scale)
    assert BAND[0] < float(sigma.min()) and float(sigma.max()) < BAND[1]
    # the report shows the view
    assert f"({rows}, {cols})" in str(_pure_ns_update.opt.routing_report)


class _Experts(nn.Module):
    """Fused per-expert weights, as transformers' MoE ``*Experts`` modules hold them."""

    def __init__(self):
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.randn(4, 12, 8))


class _PerHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv = nn.Parameter(torch.randn(3, 8, 5))  # (heads, d_model, d_head), declared by name
        self.other = nn.Parameter(torch.randn(6, 4, 2))  # undeclared 3-D: (out, −1), flagged


def test_declared_stacks_are_orthogonalized_per_slice(ref):
    model = nn.Sequential(_Experts(), _PerHead())
    update = _pure_ns_update(model, stack_patterns=[r"\.qkv$"])
    opt, grads = _pure_ns_update.opt, _pure_ns_update.grads
    for name, (rows, cols) in (("0.gate_up_proj", (12, 8)), ("1.qkv", (8, 5))):
        spec = opt.routing_report.spec_of(name)
        assert spec.view == "stack" and spec.matrix_shape == (rows, cols) and not spec.flagged, name
        want = math.sqrt(max(1.0, rows / cols)) * ref.ns(grads[name], view="stack")
        torch.testing.assert_close(update[name].double(), want, rtol=0, atol=1e-4)
    other = opt.routing_report.spec_of("1.other")
    assert other.view == "flatten" and other.flagged
    torch.testing.assert_close(update["1.other"].double(), ref.ns(grads["1.other"], view="flatten"), rtol=0, atol=5e-5)
    assert any("stack_patterns" in w for w in opt.routing_report.warnings)


def test_bare_3d_tensor_is_a_flagged_stack_and_4d_the_conv_view():
    t3, t4 = torch.zeros(3, 4, 5, requires_grad=True), torch.zeros(6, 2, 3, 3, requires_grad=True)
    opt = hf_rmsuon.Muon([t3, t4])
    assert opt.spec_of(t3).view == "stack" and opt.spec_of(t3).flagged
    assert opt.spec_of(t4).view == "flatten" and not opt.spec_of(t4).flagged


# --------------------------------------------------------------------------------------------------
# The user's param groups stay the user's groups
# --------------------------------------------------------------------------------------------------


def _two_layer():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Linear(8, 3))


@pytest.mark.parametrize("named", [False, True])
def test_two_user_groups_stay_two_and_lambda_lr_drives_them(named):
    model = _two_layer()
    first, second = model[0], model[1]
    params = (lambda m: list(m.named_parameters())) if named else (lambda m: list(m.parameters()))
    opt = create_optimizer("rmsuon", [{"params": params(first), "lr": 0.01}, {"params": params(second), "lr": 0.1}],
                           weight_decay=0.0)
    assert len(opt.param_groups) == 2
    assert [g["lr"] for g in opt.param_groups] == [0.01, 0.1]
    if named:
        assert opt.param_groups[0]["param_names"] == ["weight", "bias"]
        assert opt.routing_report.spec_of("weight").track == "matrix"
    sched = torch.optim.lr_scheduler.LambdaLR(opt, [lambda s: 0.5 ** s, lambda s: 1.0 / (1 + s)])
    for step in range(3):
        opt.zero_grad()
        model(torch.randn(4, 6)).pow(2).mean().backward()
        opt.step()
        sched.step()
        assert opt.param_groups[0]["lr"] == pytest.approx(0.01 * 0.5 ** (step + 1))
        assert opt.param_groups[1]["lr"] == pytest.approx(0.1 / (step + 2))


def test_lambda_lr_scales_each_group_update():
    """A group whose schedule factor is 0 does not move; the other does (both tracks)."""
    model = _two_layer()
    opt = create_optimizer("ada_rmsuon", [{"params": model[0].parameters()}, {"params": model[1].parameters()}],
                           lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, [lambda s: 0.0, lambda s: 1.0])
    before = [p.detach().clone() for p in model.parameters()]
    model(torch.randn(4, 6)).pow(2).mean().backward()
    opt.step()
    sched.step()
    moved = [not torch.equal(p.detach(), b) for p, b in zip(model.parameters(), before)]
    assert moved == [False, False, True, True]


def test_adamw_lr_follows_the_schedule():
    model = _two_layer()
    opt = create_optimizer("muon", model, lr=0.02, adamw_lr=0.004)
    assert opt.adamw_settings(opt.param_groups[0])[0] == pytest.approx(0.004)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.25)
    sched.step()
    assert opt.adamw_settings(opt.param_groups[0])[0] == pytest.approx(0.001)


def test_add_param_group_after_construction_is_routed_and_trains():
    model = _two_layer()
    opt = create_optimizer("ada_rmsuon", model[0], lr=1e-2)
    extra = nn.Linear(8, 3)
    opt.add_param_group({"params": list(extra.parameters()), "lr": 0.05})
    assert len(opt.param_groups) == 2
    assert opt.spec_of(extra.weight).track == "matrix" and opt.spec_of(extra.bias).track == "adamw"
    assert not opt.spec_of(extra.bias).decay  # 1-D: no decay, as for the first group
    assert "group1.0" in str(opt.routing_report)
    before = extra.weight.detach().clone()
    extra(model[0](torch.randn(4, 6))).pow(2).mean().backward()
    opt.step()
    assert not torch.equal(extra.weight.detach(), before)


def test_bare_parameters_get_no_decay_on_1d_tensors():
    model = _two_layer()
    opt = hf_rmsuon.RMSuon(model.parameters(), lr=0.1, weight_decay=0.5)
    bias, weight = model[0].bias, model[0].weight
    assert not opt.spec_of(bias).decay and opt.spec_of(weight).decay
    for p in model.parameters():
        p.grad = torch.zeros_like(p)  # a zero gradient isolates the decay
    b0, w0 = bias.detach().clone(), weight.detach().clone()
    opt.step()
    assert torch.equal(bias.detach(), b0)
    torch.testing.assert_close(weight.detach(), w0 * (1 - 0.1 * 0.5))
    # a group that sets weight_decay explicitly decays its 1-D tensors too; no_decay_1d=False does as well
    opt = hf_rmsuon.RMSuon([{"params": [bias], "weight_decay": 0.5}], lr=0.1)
    assert opt.spec_of(bias).decay
    assert hf_rmsuon.RMSuon(model.parameters(), no_decay_1d=False).spec_of(bias).decay


def test_single_tensor_group_and_unknown_group_key():
    w = torch.zeros(4, 4, requires_grad=True)
    opt = create_optimizer("muon", [{"params": w}])
    assert opt.param_groups[0]["params"] == [w]
    with pytest.raises(ValueError, match="weight_decy"):
        create_optimizer("muon", [{"params": [w], "weight_decy": 0.1}])
    with pytest.raises(ValueError, match="optimizer-wide"):
        create_optimizer("muon", [{"params": [w], "state_dtype": "float64"}])


# --------------------------------------------------------------------------------------------------
# SAM safety wherever SAM is built
# --------------------------------------------------------------------------------------------------


class _BNNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 8)
        self.bn = nn.BatchNorm1d(8)
        self.drop = nn.Dropout(0.5)
        self.out = nn.Linear(8, 1)

    def forward(self, x):
        # dropout on the input: its mask does not depend on the (perturbed) weights
        return self.out(torch.relu(self.bn(self.fc(self.drop(x)))))


@pytest.mark.parametrize("cls", [hf_rmsuon.ARS, hf_rmsuon.ARS2Neo])
def test_directly_built_sam_members_protect_batchnorm_and_replay_dropout(cls):
    torch.manual_seed(0)
    model = _BNNet()
    opt = cls(model.parameters(), lr=1e-3, k=1)  # no model attached: bare parameters
    masks: list[torch.Tensor] = []
    model.drop.register_forward_hook(lambda m, i, o: masks.append((o != 0).clone()))
    x, y = torch.randn(16, 6), torch.randn(16, 1)

    def closure():
        opt.zero_grad()
        loss = (model(x) - y).pow(2).mean()
        loss.backward()
        return loss

    for step in range(1, 4):
        masks.clear()
        mean_before = model.bn.running_mean.clone()
        opt.step(closure)
        assert len(masks) == 2  # both passes ran
        assert torch.equal(masks[0], masks[1])  # the same dropout mask in both passes
        assert int(model.bn.num_batches_tracked) == step  # advanced exactly once per step
        # the one update equals the clean pass's: running_mean ← (1−m)·mean + m·batch mean
        assert not torch.equal(model.bn.running_mean, mean_before)


def test_rng_state_covers_every_device_type(monkeypatch):
    """A device module with per-device RNG state (as CUDA/XPU) and one with a single state (as MPS)."""

    class FakeDevice:
        def __init__(self, every: bool):
            self.state, self.every = [torch.tensor([1])], every
            if every:
                self.get_rng_state_all = lambda: [s.clone() for s in self.state]
                self.set_rng_state_all = lambda st: setattr(self, "state", [s.clone() for s in st])
            else:
                self.get_rng_state = lambda: self.state[0].clone()
                self.set_rng_state = lambda st: setattr(self, "state", [st.clone()])

        def is_available(self):
            return True

    fakes = {"fakegpu": FakeDevice(every=True), "fakemps": FakeDevice(every=False)}
    for name, module in fakes.items():
        monkeypatch.setattr(torch, name, module, raising=False)
    saved = RNGState(["cpu", "fakegpu", "fakemps"])
    cpu_draw = torch.rand(3)
    for module in fakes.values():
        module.state = [torch.tensor([99])]
    saved.restore()
    assert all(int(m.state[0]) == 1 for m in fakes.values())
    assert torch.equal(torch.rand(3), cpu_draw)


def _sam_pass_calls(n_tensors: int) -> int:
    params = [torch.randn(2, 2, requires_grad=True) for _ in range(n_tensors)]
    opt = hf_rmsuon.ARS(params, k=1)
    for p in params:
        p.grad = torch.ones_like(p)
    assert opt.sam_pass_due()
    profiler = cProfile.Profile()
    profiler.enable()
    opt.begin_sam_pass()
    opt.end_sam_pass()
    profiler.disable()
    return sum(stat[1] for stat in pstats.Stats(profiler).stats.values())  # primitive + recursive calls


def test_sam_bookkeeping_is_linear_in_the_number_of_tensors():
    """Counted, not timed: the Python calls a sync step's bookkeeping makes at 300 and 3,000 tensors
    (a per-parameter scan of every group was quadratic: ~100× here)."""
    small, large = _sam_pass_calls(300), _sam_pass_calls(3000)
    assert large <= 15 * small, (small, large)


# --------------------------------------------------------------------------------------------------
# Low-precision parameters
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ALL)
def test_bf16_model_trains_with_fp32_state(ref, name):
    model, x, y = ref.regression_problem(seed=0)
    model = model.to(torch.bfloat16)
    x, y = x.bfloat16(), y.bfloat16()
    opt = create_optimizer(name, model, lr=ref.TRAIN_LR[name], weight_decay=0.0)

    def closure():
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss

    losses = [float(opt.step(closure)) for _ in range(25)]
    assert losses[-1] < 0.8 * losses[0], losses
    for p in model.parameters():
        assert p.dtype == torch.bfloat16
        for key, value in opt.state[p].items():
            if isinstance(value, torch.Tensor) and value.numel() > 1:
                assert value.dtype == torch.float32, (name, key)
    # state_dict round trip is bit-identical, dtypes included
    sd = opt.state_dict()
    clone = create_optimizer(name, model, lr=ref.TRAIN_LR[name], weight_decay=0.0)
    clone.load_state_dict(sd)
    for p in model.parameters():
        for key, value in opt.state[p].items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(clone.state[p][key], value) and clone.state[p][key].dtype == value.dtype


def test_bf16_second_moment_decays_and_weight_decay_moves_weights():
    """With bf16 state, β2 = 0.999 rounds to 1 and v never decays; lr·wd = 1e-3 rounds away. In
    float32 state (the default) both work."""
    w = torch.randn(8, 8).bfloat16().requires_grad_()
    b = torch.ones(8).bfloat16().requires_grad_()
    opt = hf_rmsuon.AdaRMSuon([{"params": [w]}, {"params": [b], "weight_decay": 0.01}], lr=0.1, weight_decay=0.01)
    w.grad, b.grad = torch.ones_like(w), torch.ones_like(b)
    opt.step()
    v_after_one = opt.state[b]["exp_avg_sq"].clone()
    b0 = b.detach().clone()
    for _ in range(5):
        w.grad, b.grad = torch.zeros_like(w), torch.zeros_like(b)
        opt.step()
    assert (opt.state[b]["exp_avg_sq"] < v_after_one).all()  # v decays in the fp32 state
    assert opt.state[b]["exp_avg_sq"].dtype == torch.float32
    assert not torch.equal(b.detach(), b0)  # 1 − lr·wd = 0.999 per step reaches the bf16 weights
    # the opt-in bf16 state reproduces the trap the default avoids
    w2 = torch.ones(8).bfloat16().requires_grad_()
    trap = hf_rmsuon.AdaRMSuon([w2], state_dtype="param")
    w2.grad = torch.ones_like(w2)
    trap.step()
    v1 = trap.state[w2]["exp_avg_sq"].clone()
    w2.grad = torch.zeros_like(w2)
    trap.step()
    assert trap.state[w2]["exp_avg_sq"].dtype == torch.bfloat16 and torch.equal(trap.state[w2]["exp_avg_sq"], v1)


# --------------------------------------------------------------------------------------------------
# Validation holes
# --------------------------------------------------------------------------------------------------


def test_aga_beta_must_be_below_one():
    p = torch.zeros(3, 3, requires_grad=True)
    for bad in (1.0, 1.5, -0.1):
        with pytest.raises(ValueError, match="aga_beta"):
            hf_rmsuon.ARS2Neo([p], aga_beta=bad)
    assert hf_rmsuon.ARS2Neo([p], aga_beta=0.0).defaults["aga_beta"] == 0.0


def test_spaces_instead_of_commas_in_optim_args():
    with pytest.raises(ValueError, match=r"separated by commas.*k=5,adaptive_sync=true"):
        parse_optim_args("ars2_neo", "k=5 adaptive_sync=true")
    assert parse_optim_args("ars2_neo", " k = 5 , adaptive_sync=true ") == {"k": 5, "adaptive_sync": True}


def test_ns_and_state_dtype_accept_torch_dtypes():
    p = torch.zeros(3, 3, requires_grad=True)
    opt = get_optimizer_class("muon")([p], ns_dtype=torch.float32, state_dtype=torch.float64)
    assert opt.defaults["ns_dtype"] == "float32" and opt.defaults["state_dtype"] == "float64"
    assert hf_rmsuon.Muon([p], ns_dtype=torch.bfloat16).defaults["ns_dtype"] == "bfloat16"
    with pytest.raises(ValueError, match="ns_dtype"):
        hf_rmsuon.Muon([p], ns_dtype=torch.float16)


def test_whiten_overwrites_the_denominators_unless_a_later_stage_needs_them():
    """AdaRMSuon's whitening is written over the step's √v̂+ε (no new full-size tensors); a chain that
    reads them afterwards must declare it, or fails loudly instead of reading overwritten values."""
    from hf_rmsuon.optim import stages as S
    from hf_rmsuon.optim.rmsuon import FAdaRMSuon

    class Undeclared(FAdaRMSuon):
        name = "undeclared"
        matrix_stages = (S.AdamMoments(), S.Whiten(), S.Orthogonalize(), S.EnergyRescale(), S.NaturalDecay())

    w = torch.nn.Parameter(torch.randn(8, 4))
    w.grad = torch.randn(8, 4)
    with pytest.raises(RuntimeError, match="keep_denominators"):
        Undeclared([{"params": [w], "track": "matrix"}], weight_decay=0.1).step()
    assert "Whiten(keep_denominators=True)" in (FAdaRMSuon.__doc__ or "")
