"""Sharpness-aware members (SPEC §5): sync schedule, exact restore, perturbation/shear/injection
against independent float64 computations, AGA decisions, ASI's ρ, the trainer-mode protocol,
BatchNorm/dropout handling and the SAM diagnostics."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from _numeric import Driver, Recorder, assert_sam_state_unchanged
from _numeric import assert_rel as _assert_rel
from _numeric import gen as _gen
from torch import nn
from torch.func import functional_call

import hf_rmsuon
from hf_rmsuon import create_optimizer, get_optimizer_class

SAM_MEMBERS = ("ars", "ars2_neo")
mse = nn.functional.mse_loss


def _batches(n, size=8, seed=0, dtype=torch.float32):
    gen = _gen(seed)
    w = torch.randn(8, 2, generator=gen, dtype=dtype)
    out = []
    for _ in range(n):
        x = torch.randn(size, 8, generator=gen, dtype=dtype)
        out.append((x, torch.sin(x @ w)))
    return out




# --------------------------------------------------------------------------------------------------
# The sync schedule: closure calls per step
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", SAM_MEMBERS)
@pytest.mark.parametrize("k,expected", [
    (1, [2] * 7),
    (0, [1] * 7),
    (2, [2, 1, 2, 1, 2, 1, 2]),
    (3, [2, 1, 1, 2, 1, 1, 2]),  # steps 1, 4, 7
])
def test_closure_calls_follow_the_k_schedule(ref, name, k, expected):
    model, _, _ = ref.regression_problem(seed=0)
    opt = create_optimizer(name, model, lr=1e-3, k=k)
    rec = Recorder(opt, model)
    counts = []
    for batch in _batches(7):
        rec.step(batch)
        counts.append(len(rec.calls))
    assert counts == expected
    syncs = expected.count(2)
    assert opt.sam["syncs"] == syncs
    diag = opt.diagnostics()
    assert diag["sync_ratio"] == pytest.approx(syncs / 7)
    assert diag["effective_k"] == pytest.approx(7 / max(1, syncs))


def test_k0_with_adaptive_sync_is_aga_alone(ref):
    """k = 0 with AGA: no interval sync; step 1 syncs, then only AGA's staleness test (here never:
    λ is huge). Without AGA, k = 0 never syncs at all (the k schedule test)."""
    model, _, _ = ref.regression_problem(seed=0)
    for rule in ("abs", "signed"):
        opt = create_optimizer("ars2_neo", model, k=0, adaptive_sync=True, aga_lambda=1e9, aga_rule=rule)
        rec = Recorder(opt, model)
        counts = []
        for batch in _batches(5):
            rec.step(batch)
            counts.append(len(rec.calls))
        assert counts == [2, 1, 1, 1, 1], rule
        assert "phi" in opt.diagnostics()  # lazy steps inject the shear force and measure φ


# --------------------------------------------------------------------------------------------------
# Exact restore: the second pass never leaks into the weights
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", SAM_MEMBERS)
@pytest.mark.parametrize("perturb_norm", ["global", "per_tensor"])
@pytest.mark.parametrize("adaptive", [True, False])
def test_sync_step_with_zero_lr_leaves_weights_bit_identical(ref, name, perturb_norm, adaptive):
    model, _, _ = ref.regression_problem(seed=1)
    opt = create_optimizer(name, model, lr=0.0, weight_decay=0.0, rho=0.5, perturb_norm=perturb_norm,
                           adaptive=adaptive)
    rec = Recorder(opt, model)
    for batch in _batches(3):
        before = [p.detach().clone() for p in model.parameters()]
        rec.step(batch)
        assert len(rec.calls) == 2
        # the second pass really ran at a different point w + e …
        assert any(not torch.equal(a, b) for a, b in zip(rec.calls[1]["weights"], before))
        # … and w was restored bit-exactly (not w + e − e)
        for p, b in zip(model.parameters(), before):
            assert torch.equal(p.detach(), b)


# --------------------------------------------------------------------------------------------------
# End to end: ARS steps (closure mode) against an independent float64 computation
# --------------------------------------------------------------------------------------------------


def _grads_at(model, names, weights, batch):
    """Loss and gradients at ``weights`` — computed functionally, without touching ``model``."""
    params = {n: w.detach().clone().requires_grad_() for n, w in zip(names, weights)}
    x, y = batch
    loss = mse(functional_call(model, params, (x,)), y)
    grads = torch.autograd.grad(loss, list(params.values()))
    return float(loss.detach()), list(grads)


@pytest.mark.parametrize("name,k", [("ars", 1), ("ars", 2), ("ars2_neo", 3)])
@pytest.mark.parametrize("perturb_norm,adaptive", [("global", True), ("per_tensor", False), ("global", False)])
def test_sam_steps_match_independent_float64_computation(ref, name, k, perturb_norm, adaptive):
    model, _, _ = ref.regression_problem(seed=2)
    model = model.double()
    names = [n for n, _ in model.named_parameters()]
    params = list(model.parameters())
    tracks = ["matrix" if p.ndim >= 2 else "adamw" for p in params]
    hp = dict(lr=0.01, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.05, rho=0.05, alpha=0.3)
    opt = get_optimizer_class(name)(
        [{"params": [p for p, t in zip(params, tracks) if t == "matrix"], "track": "matrix"},
         {"params": [p for p, t in zip(params, tracks) if t == "adamw"], "track": "adamw"}],
        k=k, perturb_norm=perturb_norm, adaptive=adaptive, ns_dtype="float32", no_decay_1d=False, **hp)
    # the optimizer orders params by group; keep the reference in model order
    reference = ref.RefOptimizer("ars", params, tracks, lr=hp["lr"], betas=hp["betas"], eps=hp["eps"],
                                 weight_decay=hp["weight_decay"])
    rec = Recorder(opt, model)
    shears = None
    for t, batch in enumerate(_batches(5, dtype=torch.float64), start=1):
        w = [p.detach().clone() for p in params]
        reference.params = [x.clone() for x in w]
        loss, g = _grads_at(model, names, w, batch)
        sync = k == 1 or (t - 1) % k == 0
        if sync:
            v_hats = [reference.v_hat(i) for i in range(len(params))]  # None on step 1: N = g
            e = ref.perturbation(g, v_hats, w, hp["rho"], hp["eps"], adaptive, perturb_norm)
            adv_loss, g_adv = _grads_at(model, names, [a + b for a, b in zip(w, e)], batch)
            shears = [ref.shear(a, b) for a, b in zip(g_adv, g)]
            used = g_adv
        else:
            used = [ref.inject(a, s, hp["alpha"]) for a, s in zip(g, shears)]
        returned = rec.step(batch)
        reference.step(used)

        assert len(rec.calls) == (2 if sync else 1)
        assert float(returned.detach()) == pytest.approx(loss, rel=1e-12)  # the clean loss is returned
        if sync:
            for seen, a, b in zip(rec.calls[1]["weights"], w, e):
                _assert_rel(seen - a, b, 1e-6)  # the second pass ran at w + e
            assert opt.diagnostics()["surrogate_gap"] == pytest.approx(adv_loss - loss, rel=1e-5)
            if k > 1:  # (g_adv ∥ g nearly: the shear is a small difference, so a looser tolerance)
                for p, s in zip(params, shears):
                    _assert_rel(opt.state[p]["shear"], s, 1e-4)
        for p, a, want in zip(params, w, reference.params):
            _assert_rel(p.detach() - a, want - a, 5e-5)
        # the lazy step's injection does not write into p.grad
        if not sync:
            for p, gi in zip(params, g):
                torch.testing.assert_close(p.grad, gi, rtol=1e-12, atol=1e-15)


# --------------------------------------------------------------------------------------------------
# The trainer-mode protocol with test-supplied gradients
# --------------------------------------------------------------------------------------------------


def _float64_tensors(seed=3):
    gen = _gen(seed)
    mats = [torch.randn(6, 4, generator=gen, dtype=torch.float64).requires_grad_(),
            torch.randn(4, 6, generator=gen, dtype=torch.float64).requires_grad_()]
    vecs = [torch.randn(4, generator=gen, dtype=torch.float64).requires_grad_()]
    return mats, vecs




@pytest.mark.parametrize("perturb_norm", ["global", "per_tensor"])
@pytest.mark.parametrize("adaptive", [True, False])
def test_protocol_perturbation_shear_and_injection(ref, perturb_norm, adaptive):
    mats, vecs = _float64_tensors()
    params = mats + vecs
    tracks = ["matrix", "matrix", "adamw"]
    hp = dict(lr=0.05, betas=(0.8, 0.95), eps=1e-3, weight_decay=0.1)  # a large ε that must show
    opt = hf_rmsuon.ARS([{"params": mats, "track": "matrix"}, {"params": vecs, "track": "adamw"}], no_decay_1d=False, k=2, rho=0.07,
                        alpha=0.4, perturb_norm=perturb_norm, adaptive=adaptive, ns_dtype="float32", **hp)
    reference = ref.RefOptimizer("ars", params, tracks, **hp)
    gen = _gen(4)
    shears = None
    for t in range(1, 6):
        g = [torch.randn(p.shape, generator=gen, dtype=torch.float64) for p in params]
        g_adv = [gi + 0.5 * torch.randn(gi.shape, generator=gen, dtype=torch.float64) for gi in g]
        w = [p.detach().clone() for p in params]
        reference.params = [x.clone() for x in w]
        v_hats = [reference.v_hat(i) for i in range(3)]
        due, perturbed = Driver(opt, params).step(g, g_adv)
        assert due == (t % 2 == 1)
        if due:
            e = ref.perturbation(g, v_hats, w, 0.07, hp["eps"], adaptive, perturb_norm)
            for seen, a, b in zip(perturbed, w, e):
                _assert_rel(seen - a, b, 1e-6)
            shears = [ref.shear(a, b) for a, b in zip(g_adv, g)]
            for p, s in zip(params, shears):  # every trainable tensor, both tracks
                _assert_rel(opt.state[p]["shear"], s, 1e-9)
            reference.step(g_adv)  # the step uses g_adv, for both moments
        else:
            reference.step([ref.inject(gi, s, 0.4) for gi, s in zip(g, shears)])
        for p, a, want in zip(params, w, reference.params):
            _assert_rel(p.detach() - a, want - a, 2e-5)
        for i, p in enumerate(params):
            _assert_rel(opt.state[p]["exp_avg_sq"], reference.state[i]["v"], 1e-6)


def test_protocol_misuse_raises_clear_errors(ref):
    mats, vecs = _float64_tensors()
    opt = hf_rmsuon.ARS([{"params": mats, "track": "matrix"}, {"params": vecs, "track": "adamw"}], k=2)
    for p in mats + vecs:
        p.grad = torch.ones_like(p)
    with pytest.raises(RuntimeError, match="closure"):
        opt.step()  # step 1 is a sync step: neither a closure nor a recorded pass
    assert all(len(opt.state[p]) == 0 for p in mats + vecs)
    with pytest.raises(RuntimeError, match="without begin_sam_pass"):
        opt.end_sam_pass()
    assert opt.sam_pass_due()
    opt.begin_sam_pass()
    with pytest.raises(RuntimeError, match="twice"):
        opt.begin_sam_pass()
    for p in mats + vecs:
        p.grad.fill_(0.5)
    opt.end_sam_pass()
    opt.step()
    for p in mats + vecs:
        p.grad = torch.ones_like(p)
    assert not opt.sam_pass_due()  # step 2 of k=2 is lazy
    with pytest.raises(RuntimeError, match="no sync step is due"):
        opt.begin_sam_pass()


# --------------------------------------------------------------------------------------------------
# AGA: sync decisions, φ and α against the test's own bookkeeping
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rule,k,aga_lambda", [("abs", 1, 1.0), ("abs", 4, 1.0)])
def test_aga_sync_decisions(ref, rule, k, aga_lambda):
    """The design's rule (the research code's "signed" rule has its own test in test_reference_rules.py).
    Reference bookkeeping (SPEC §5, with the implementation's documented bias correction of ν):
    φ_t from the fresh gradient and the cached shear; ν ← β·ν + (1−β)·φ² on lazy steps that follow a
    lazy step; ν̂ = ν/(1−β^n); sync at step 1, when k > 1 steps have passed, or (once ν has a sample)
    when φ > λ√ν̂ ("abs") / φ < −λ√ν̂ ("signed"); α_t = α(1−φ)^γ or α(1+max(0,φ))^γ."""
    model, _, _ = ref.regression_problem(seed=5)
    model = model.double()
    alpha, beta, gamma = 0.2, 0.9, 2.0
    opt = create_optimizer("ars2_neo", model, lr=3e-3, k=k, adaptive_sync=True, aga_rule=rule, alpha=alpha,
                           aga_beta=beta, aga_lambda=aga_lambda, aga_gamma=gamma)
    rec = Recorder(opt, model)
    params = rec.params
    shears, last_sync, nu, nu_count, prev_lazy = None, 0, 0.0, 0, False
    outcomes = []
    for t, batch in enumerate(_batches(24, size=4, seed=6, dtype=torch.float64), start=1):
        rec.step(batch)
        g = rec.calls[0]["grads"]
        assert len(rec.calls) in (1, 2)
        synced = len(rec.calls) == 2
        if t == 1:
            expected, phi, reason = True, None, "first"
        else:
            cos = ref.signed_alignment(g, shears)
            phi = abs(cos) if rule == "abs" else cos
            if k > 1 and t - last_sync >= k:
                expected, reason = True, "forced"
            elif nu_count > 0:
                threshold = aga_lambda * math.sqrt(nu / (1 - beta**nu_count))
                if abs(abs(phi) - threshold) < 1e-6:  # too close to call in float32: follow the optimizer
                    expected = synced
                else:
                    expected = phi > threshold if rule == "abs" else phi < -threshold
                reason = "phi"
            else:
                expected, reason = False, "no-nu"
        assert synced == expected, (t, reason, phi)
        outcomes.append((reason, synced))
        if phi is not None:
            diag = opt.diagnostics()
            assert diag["phi"] == pytest.approx(phi, rel=1e-4, abs=1e-6)
            if not synced:
                want_alpha = alpha * (1 - phi) ** gamma if rule == "abs" else alpha * (1 + max(0.0, phi)) ** gamma
                assert diag["alpha"] == pytest.approx(want_alpha, rel=1e-4)
        if synced:
            shears = [ref.shear(a, b) for a, b in zip(rec.calls[1]["grads"], g)]
            last_sync, prev_lazy = t, False
            for p, s in zip(params, shears):
                _assert_rel(opt.state[p]["shear"], s, 1e-9)
        else:
            if prev_lazy:
                nu, nu_count = beta * nu + (1 - beta) * phi**2, nu_count + 1
            prev_lazy = True
    assert opt.sam["nu_count"] == nu_count and opt.sam["nu"] == pytest.approx(nu, rel=1e-5)
    # the run must exercise both outcomes of the φ test (otherwise it checks nothing)
    assert ("phi", True) in outcomes and ("phi", False) in outcomes, outcomes
    if k > 1:
        assert ("forced", True) in outcomes, outcomes


# --------------------------------------------------------------------------------------------------
# ASI: ρ adapts from the surrogate gap, clipped to [0.1ρ0, 10ρ0]
# --------------------------------------------------------------------------------------------------


def _asi_reference(pairs, rho0, alpha, beta, gamma):
    """ρ before each sync step, for (loss, adv_loss) pairs (first observation initialises the EMAs)."""
    rho, ema_gap, ema_loss = rho0, None, None
    out = []
    for loss, adv in pairs:
        out.append(rho)
        h = adv - loss
        if ema_loss is None:
            ema_gap, ema_loss = abs(h), loss
            continue
        ema_gap = beta * ema_gap + (1 - beta) * abs(h)
        previous, ema_loss = ema_loss, beta * ema_loss + (1 - beta) * loss
        eta = 0.01 * alpha
        mu = gamma if abs(h) > ema_gap else 1.0
        rho = rho * (1 + eta * mu) if ema_loss - previous < 0 else rho * (1 - eta * mu)
        rho = min(max(rho, 0.1 * rho0), 10 * rho0)
    out.append(rho)
    return out


def test_asi_rho_update_and_clipping(ref):
    mats, vecs = _float64_tensors(seed=7)
    params = mats + vecs
    rho0, alpha, beta, gamma = 0.1, 50.0, 0.5, 2.0  # η = 0.5: steps ×1.5/×2 up, ×0.5/×0 down
    opt = hf_rmsuon.ARS2Neo([{"params": mats, "track": "matrix"}, {"params": vecs, "track": "adamw"}], k=1, asi=True,
                            rho=rho0, alpha=alpha, aga_beta=beta, aga_gamma=gamma, lr=1e-4, adaptive=False)
    # falling loss with gaps that alternate around their EMA, then a rising loss
    losses = [3.0, 2.5, 2.0, 1.6, 1.2, 1.0, 0.8, 0.7, 0.9, 1.4, 2.0, 2.6, 3.0]
    gaps = [0.1, 0.5, 0.05, 0.6, 0.1, 0.2, 0.9, 0.1, 0.3, 0.01, 0.8, 0.2, 0.3]
    pairs = [(loss, loss + gap) for loss, gap in zip(losses, gaps)]
    expected = _asi_reference(pairs, rho0, alpha, beta, gamma)
    assert max(expected) == pytest.approx(10 * rho0) and min(expected) == pytest.approx(0.1 * rho0)  # both clips
    gen = _gen(8)
    for i, (loss, adv) in enumerate(pairs):
        g = [torch.randn(p.shape, generator=gen, dtype=torch.float64) for p in params]
        w = [p.detach().clone() for p in params]
        due, perturbed = Driver(opt, params).step(g, g, loss=loss, adv_loss=adv)
        assert due
        # the perturbation of this step has the radius ρ held before it (global norm)
        radius = math.sqrt(sum(ref.fro(a - b) ** 2 for a, b in zip(perturbed, w)))
        assert radius == pytest.approx(expected[i], rel=1e-6)
        assert opt.sam["rho"] == pytest.approx(expected[i + 1], rel=1e-12)
        diag = opt.diagnostics()
        assert diag["rho"] == pytest.approx(expected[i + 1], rel=1e-12)
        assert diag["surrogate_gap"] == pytest.approx(adv - loss, abs=1e-6)  # losses may be read as float32


def test_asi_off_keeps_rho_fixed(ref):
    model, _, _ = ref.regression_problem(seed=8)
    for name, extra in (("ars", {}), ("ars2_neo", {"asi": False})):
        opt = create_optimizer(name, model, rho=0.2, **extra)
        rec = Recorder(opt, model)
        for batch in _batches(4):
            rec.step(batch)
        assert opt.sam["rho"] == 0.2 and opt.diagnostics()["rho"] == 0.2


# --------------------------------------------------------------------------------------------------
# Non-finite gradients on sync steps
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("which_pass", [0, 1])
def test_nonfinite_on_a_sync_step_leaves_everything_untouched(ref, which_pass):
    model, _, _ = ref.regression_problem(seed=9)
    opt = create_optimizer("ars2_neo", model, lr=1e-2, k=2, asi=True)
    rec = Recorder(opt, model)
    batches = _batches(6)
    for batch in batches[:2]:  # sync, lazy: step 3 is a sync step
        rec.step(batch)
    params = list(model.parameters())
    before = [p.detach().clone() for p in params]
    state = copy.deepcopy({i: dict(opt.state[p]) for i, p in enumerate(params)})
    sam = copy.deepcopy(opt.sam)
    assert "shear" in opt.state[params[0]] and opt.sam["ema_loss"] is not None

    calls = []

    def poisoned():
        loss = rec()
        if len(calls) == which_pass:
            model.fc1.weight.grad[1, 2] = float("nan")
        calls.append(1)
        return loss

    rec.batch = batches[2]
    opt.step(poisoned)
    assert len(calls) == 2
    for p, b in zip(params, before):
        assert torch.equal(p.detach(), b)
    for i, p in enumerate(params):
        assert opt.state[p].keys() == state[i].keys()
        for key, val in state[i].items():
            assert torch.equal(opt.state[p][key], val) if isinstance(val, torch.Tensor) else opt.state[p][key] == val
    assert_sam_state_unchanged(opt.sam, sam)
    assert opt.sam["step"] == sam["step"] + 1  # the schedule counts the call
    assert opt.diagnostics()["nonfinite_steps"] == 1


# --------------------------------------------------------------------------------------------------
# BatchNorm statistics and dropout in the second pass
# --------------------------------------------------------------------------------------------------


class _BNDropout(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.bn, self.drop, self.fc2 = nn.Linear(8, 16), nn.BatchNorm1d(16), nn.Dropout(0.5), nn.Linear(16, 2)

    def forward(self, x):
        return self.fc2(self.drop(torch.relu(self.bn(self.fc1(x)))))


@pytest.mark.parametrize("replay_rng", [True, False])
def test_second_pass_keeps_batchnorm_stats_and_replays_dropout(replay_rng):
    torch.manual_seed(0)
    model = _BNDropout()
    probe = copy.deepcopy(model)
    opt = create_optimizer("ars", model, lr=1e-3, replay_rng=replay_rng)
    masks = []
    model.drop.register_forward_hook(lambda m, i, o: masks.append(o.detach() == 0))
    x, y = _batches(1, size=16)[0]

    def closure():
        opt.zero_grad()
        loss = mse(model(x), y)
        loss.backward()
        return loss

    opt.step(closure)
    assert len(masks) == 2
    probe(x)  # one training-mode forward: what the running statistics should be after the step
    assert torch.equal(model.bn.running_mean, probe.bn.running_mean)
    assert torch.equal(model.bn.running_var, probe.bn.running_var)
    assert int(model.bn.num_batches_tracked) == 1
    assert torch.equal(masks[0], masks[1]) == replay_rng


# --------------------------------------------------------------------------------------------------
# SAM diagnostics
# --------------------------------------------------------------------------------------------------


def test_sam_diagnostics_keys_and_values(ref):
    model, _, _ = ref.regression_problem(seed=10)
    opt = create_optimizer("ars2_neo", model, lr=3e-3, k=3, adaptive_sync=True, asi=True)
    rec = Recorder(opt, model)
    for batch in _batches(6):
        rec.step(batch)
    diag = opt.diagnostics()
    for key in ("energy", "update_rms", "nonfinite_steps", "phi", "alpha", "rho", "sync_ratio", "effective_k",
                "surrogate_gap"):
        assert key in diag and isinstance(diag[key], float) and math.isfinite(diag[key]), key
    syncs = opt.sam["syncs"]
    assert diag["sync_ratio"] == pytest.approx(syncs / 6) and diag["effective_k"] == pytest.approx(6 / syncs)
    assert 0.0 <= diag["phi"] <= 1.0 and 0.0 < diag["alpha"] <= 0.1

    plain = create_optimizer("ars", model, lr=3e-3)
    rec = Recorder(plain, model)
    rec.step(_batches(1)[0])
    diag = plain.diagnostics()
    for key in ("alpha", "rho", "sync_ratio", "effective_k", "surrogate_gap"):
        assert key in diag, key
    assert "phi" not in diag  # no AGA, no alignment measured
    assert diag["surrogate_gap"] == pytest.approx(rec.calls[1]["loss"] - rec.calls[0]["loss"], rel=1e-6)


@pytest.mark.parametrize("name,hp", [("ars", {}), ("ars2_neo", {"k": 2}), ("ars2_neo", {"k": 3, "adaptive_sync": True})])
def test_kept_sync_buffers_reuse_memory_and_change_nothing(ref, name, hp):
    """keep_buffers (default) reuses the weight-copy / base-gradient memory across sync steps and
    lazy injections; the trajectory is bit-identical to fresh buffers every step, which keep nothing."""
    batches = _batches(7, seed=3)
    runs = {}
    for keep in (True, False):
        model, _, _ = ref.regression_problem(seed=5)
        opt = create_optimizer(name, model, lr=1e-2, keep_buffers=keep, **hp)
        rec = Recorder(opt, model)
        pointers = []
        for batch in batches:
            rec.step(batch)
            pointers.append(sorted(b.data_ptr() for b in opt._buffers.values()))
        runs[keep] = ([p.detach().clone() for p in model.parameters()], pointers, opt)
    kept, fresh = runs[True], runs[False]
    for a, b in zip(kept[0], fresh[0]):
        assert torch.equal(a, b)
    assert kept[1][0] and all(p == kept[1][0] for p in kept[1])  # the same memory every step
    assert fresh[1] == [[]] * len(batches) and fresh[2]._pass is None
