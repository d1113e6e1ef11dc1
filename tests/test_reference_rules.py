"""The research code's rules (issue 13, SPEC §5), each against a transcription written out here.

* AGA ``aga_rule="signed"``: signed φ, ν without bias correction (ν = 0 at step 1), ν updated
  *before* the test on every step whose previous step was lazy, sync when φ < −λ√ν, at step 1 or
  when k > 1 steps have passed, α_t = α·(1 + max(0, φ))^γ — the sync schedule, ν, α_t and the
  gradient each step actually used, over 200 steps with k = 10 and k = 1;
* ASI ``asi_first_sync="adapt"``: the ρ rule also runs on the first sync (ρ ← ρ0·(1 − 0.01·α));
* per-group ρ: a group with ρ = 0 is not perturbed, the others by ρ_g·N/‖N‖ (global / per tensor);
* ``adamw_betas`` / ``adamw_eps`` / ``adamw_weight_decay`` act on the AdamW track only;
* the diagnostics ``aga_threshold``, ``aga_nu_sqrt`` and ``asi_gap_avg``.

Nothing below calls the package's math: φ, the shear force, the injection, ν, ρ and the
perturbation are computed here (or in ``conftest.py``'s float64 references) from the gradients the
test's own closure saw.
"""

from __future__ import annotations

import math

import pytest
import torch
from _numeric import Driver, Recorder
from _numeric import assert_rel as _assert_rel
from _numeric import gen as _gen
from torch import nn

import hf_rmsuon
from hf_rmsuon import create_optimizer, get_optimizer_class

mse = nn.functional.mse_loss




def _minibatches(x, y, n, size, seed):
    """``n`` mini-batches drawn (with a fixed generator) from the regression problem's data."""
    gen = _gen(seed)
    out = []
    for _ in range(n):
        idx = torch.randperm(x.shape[0], generator=gen)[:size]
        out.append((x[idx], y[idx]))
    return out


# --------------------------------------------------------------------------------------------------
# 1. AGA, aga_rule="signed": the research code's rule, transcribed step by step
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("k,aga_lambda,aga_beta", [(10, 2.0, 0.99), (1, 0.5, 0.9), (0, 1.0, 0.9)])
def test_aga_signed_rule_matches_transcription(ref, k, aga_lambda, aga_beta):
    """200 steps of ARS2-Neo with the signed AGA rule on a float64 MLP. Per step, from the closure's
    own gradients (fresh ``g``; ``g_adv`` on sync steps) the test derives the shear force, φ_t, ν,
    the threshold, the decision and α_t, and checks the optimizer's decision (closure calls),
    its ν / last_sync / syncs, the diagnostics (φ, α, aga_threshold, aga_nu_sqrt) and — through the
    first moment of every tensor — that the step used ``g_adv`` on sync steps and
    ``g + α_t·(‖g‖/‖s‖)·s`` on lazy ones."""
    model, x, y = ref.regression_problem(seed=3)
    model = model.double()
    x, y = x.double(), y.double()
    alpha, gamma, beta1 = 0.3, 2.0, 0.9
    opt = create_optimizer("ars2_neo", model, lr=3e-3, betas=(beta1, 0.99), k=k, adaptive_sync=True,
                           aga_rule="signed", alpha=alpha, aga_beta=aga_beta, aga_lambda=aga_lambda,
                           aga_gamma=gamma, rho=0.05)
    rec = Recorder(opt, model)
    params = rec.params

    # the transcription's state
    nu, last_sync, syncs, shears, ties = 0.0, 0, 0, None, 0
    m = [torch.zeros_like(p, dtype=torch.float64) for p in params]
    outcomes = []
    for t, batch in enumerate(_minibatches(x, y, 200, size=8, seed=11), start=1):
        rec.step(batch)
        assert len(rec.calls) in (1, 2)
        synced = len(rec.calls) == 2
        g = rec.calls[0]["grads"]
        if t == 1:
            phi, nu, reason, expected = None, 0.0, "first", True  # ν = φ₁² = 0: no shear force yet
        else:
            phi = ref.signed_alignment(g, shears)
            if last_sync < t - 1:  # the previous step was lazy: ν moves before the test, with φ_t
                nu = aga_beta * nu + (1 - aga_beta) * phi**2
            threshold = aga_lambda * math.sqrt(nu)
            forced = k > 1 and t - last_sync >= k
            if forced:
                reason, expected = "forced", True
            else:
                reason = "phi"
                if abs(phi + threshold) < 1e-6:  # too close to call in float32: follow the optimizer
                    expected = synced
                    ties += 1
                else:
                    expected = phi < -threshold
        assert synced == expected, (t, reason, phi, nu)
        outcomes.append((reason, synced))

        alpha_t = alpha * (1 + max(0.0, phi)) ** gamma if phi is not None else None
        if synced:
            g_adv = rec.calls[1]["grads"]
            used = g_adv
            shears = [ref.shear(a, b) for a, b in zip(g_adv, g)]  # hand-derived from the two passes
            last_sync, syncs = t, syncs + 1
        else:
            used = [ref.inject(gi, s, alpha_t) for gi, s in zip(g, shears)]

        # the optimizer's bookkeeping
        assert opt.sam["step"] == t and opt.sam["last_sync"] == last_sync and opt.sam["syncs"] == syncs
        assert opt.sam["nu"] == pytest.approx(nu, rel=1e-5, abs=1e-12), t
        if phi is not None:
            diag = opt.diagnostics()
            assert diag["phi"] == pytest.approx(phi, rel=1e-4, abs=1e-6), t
            assert diag["aga_threshold"] == pytest.approx(threshold, rel=1e-4, abs=1e-7), t  # the one tested
            assert diag["aga_nu_sqrt"] == pytest.approx(math.sqrt(nu), rel=1e-4, abs=1e-7), t
            if not synced:
                assert diag["alpha"] == pytest.approx(alpha_t, rel=1e-5), t
        # the gradient the step used, seen through every tensor's first moment
        for i, (p, u) in enumerate(zip(params, used)):
            m[i] = beta1 * m[i] + (1 - beta1) * u.double()
            _assert_rel(opt.state[p]["exp_avg"], m[i], 1e-5)

    # the run must exercise both outcomes of the φ test (and, for k > 1, the interval)
    assert ("phi", True) in outcomes and ("phi", False) in outcomes, outcomes
    if k > 1:
        assert ("forced", True) in outcomes, outcomes
    assert 1 < syncs < 200 and ties <= 2
    assert opt.diagnostics()["effective_k"] == pytest.approx(200 / syncs)


# --------------------------------------------------------------------------------------------------
# The trainer-mode protocol with test-supplied gradients
# --------------------------------------------------------------------------------------------------




# --------------------------------------------------------------------------------------------------
# 2. ASI: asi_first_sync="adapt" (research code) vs the default "initialise"
# --------------------------------------------------------------------------------------------------


def _asi_transcription(pairs, rho0, alpha, beta, gamma, first_sync):
    """ρ and ema_gap after each sync step, for (loss, adv_loss) pairs. The first sync initialises
    ema_gap = |h|, ema_loss = loss; with "adapt" the rule then runs too, with Δ = 0 (not improving)
    and μ = 1 (|h| is not > its fresh average)."""
    rho, ema_gap, ema_loss = rho0, None, None
    rhos, gap_avgs = [], []
    for loss, adv in pairs:
        h = adv - loss
        if ema_loss is None:
            ema_gap, ema_loss = abs(h), loss
            delta = 0.0
            run = first_sync == "adapt"
        else:
            ema_gap = beta * ema_gap + (1 - beta) * abs(h)
            previous, ema_loss = ema_loss, beta * ema_loss + (1 - beta) * loss
            delta = ema_loss - previous
            run = True
        if run:
            eta = 0.01 * alpha
            mu = gamma if abs(h) > ema_gap else 1.0  # ema_gap already holds this step's |h|
            rho = rho * (1 + eta * mu) if delta < 0 else rho * (1 - eta * mu)
            rho = min(max(rho, 0.1 * rho0), 10 * rho0)
        rhos.append(rho)
        gap_avgs.append(ema_gap)
    return rhos, gap_avgs


def _float64_tensors(seed):
    gen = _gen(seed)
    mats = [torch.randn(6, 4, generator=gen, dtype=torch.float64).requires_grad_(),
            torch.randn(4, 6, generator=gen, dtype=torch.float64).requires_grad_()]
    vecs = [torch.randn(4, generator=gen, dtype=torch.float64).requires_grad_(),
            torch.randn(6, generator=gen, dtype=torch.float64).requires_grad_()]
    return mats, vecs


@pytest.mark.parametrize("first_sync", ["adapt", "initialise"])
def test_asi_first_sync_option_and_later_rule(ref, first_sync):
    """Trainer-mode protocol, every step a sync (k = 1), given losses. After the first sync ρ is
    ρ0·(1 − 0.01·α) with ``asi_first_sync="adapt"`` and ρ0 with the default; later syncs follow the
    transcribed rule (both clips reached). The adapted ρ scales every group's own ρ: the next
    perturbation (per-tensor norm) has ‖e‖ = ρ_g·ρ/ρ0 on each tensor. ``asi_gap_avg`` = ema_gap."""
    mats, vecs = _float64_tensors(seed=21)
    params = mats + vecs
    # η = 0.01·α = 0.2: ρ moves by ×1.4/×1.2 up, ×0.6/×0.8 down
    rho0, rho_vec, alpha, beta, gamma = 0.1, 0.03, 20.0, 0.6, 2.0
    kwargs = {} if first_sync == "initialise" else {"asi_first_sync": "adapt"}
    opt = hf_rmsuon.ARS2Neo([{"params": mats, "track": "matrix"},
                             {"params": vecs, "track": "adamw", "rho": rho_vec}],
                            k=1, asi=True, rho=rho0, alpha=alpha, aga_beta=beta, aga_gamma=gamma, lr=1e-4,
                            adaptive=False, perturb_norm="per_tensor", **kwargs)
    losses = [3.0, 2.6, 2.2, 1.9, 1.5, 1.2, 1.0, 0.8, 0.6, 0.5, 0.4, 0.3, 0.5,  # falling …
              0.9, 1.4, 2.0, 2.7, 3.5, 4.0, 4.5, 5.0, 5.5, 6.0, 6.5, 7.0, 7.5]  # … then rising
    gaps = [0.2, 0.5, 0.05, 0.6, 0.1, 0.2, 0.9, 0.1, 0.3, 0.01, 0.8, 0.2, 0.3,  # around their average
            0.5, 0.1, 0.7, 0.2, 0.4, 0.1, 0.6, 0.9, 0.1, 0.2, 0.8, 0.3, 0.2]
    pairs = [(loss, loss + gap) for loss, gap in zip(losses, gaps)]
    rhos, gap_avgs = _asi_transcription(pairs, rho0, alpha, beta, gamma, first_sync)
    first = rho0 * (1 - 0.01 * alpha) if first_sync == "adapt" else rho0
    assert rhos[0] == pytest.approx(first, rel=1e-15)  # the transcription says what the issue says
    assert max(rhos) == pytest.approx(10 * rho0) and min(rhos) == pytest.approx(0.1 * rho0)  # both clips

    gen = _gen(22)
    held = rho0  # ρ before the step
    for i, (loss, adv) in enumerate(pairs):
        g = [torch.randn(p.shape, generator=gen, dtype=torch.float64) for p in params]
        w = [p.detach().clone() for p in params]
        # the losses as float64 0-d tensors (what a training loop hands over): a Python float is
        # read through a float32 tensor by the package, which would blur h at the 1e-7 level
        due, perturbed = Driver(opt, params).step(g, g, loss=torch.tensor(loss, dtype=torch.float64),
                                                  adv_loss=torch.tensor(adv, dtype=torch.float64))
        assert due
        scale = held / rho0
        for p, a, b in zip(params, perturbed, w):
            want = (rho0 if p.ndim == 2 else rho_vec) * scale
            assert ref.fro(a - b) == pytest.approx(want, rel=1e-6), i
        assert opt.sam["rho"] == pytest.approx(rhos[i], rel=1e-12), i
        diag = opt.diagnostics()
        assert diag["rho"] == pytest.approx(rhos[i], rel=1e-12), i
        assert diag["asi_gap_avg"] == pytest.approx(gap_avgs[i], rel=1e-12), i
        assert diag["surrogate_gap"] == pytest.approx(adv - loss, abs=1e-9), i
        held = rhos[i]
    if first_sync == "adapt":
        assert rhos[0] < rho0


def test_asi_adapt_in_closure_mode_follows_the_closure_losses(ref):
    """Closure mode on a float64 MLP with k = 3: h = adv_loss − loss from the closure's two calls,
    ρ moves only on sync steps, following the transcription from the first sync on."""
    model, x, y = ref.regression_problem(seed=4)
    model = model.double()
    x, y = x.double(), y.double()
    rho0, alpha, beta, gamma = 0.05, 10.0, 0.8, 2.0
    opt = create_optimizer("ars2_neo", model, lr=3e-3, k=3, asi=True, asi_first_sync="adapt", rho=rho0,
                           alpha=alpha, aga_beta=beta, aga_gamma=gamma)
    rec = Recorder(opt, model)
    pairs = []
    for t, batch in enumerate(_minibatches(x, y, 15, size=16, seed=5), start=1):
        rec.step(batch)
        synced = len(rec.calls) == 2
        assert synced == ((t - 1) % 3 == 0)
        if synced:
            pairs.append((rec.calls[0]["loss"], rec.calls[1]["loss"]))
        rhos, gap_avgs = _asi_transcription(pairs, rho0, alpha, beta, gamma, "adapt")
        assert opt.sam["rho"] == pytest.approx(rhos[-1], rel=1e-9), t
        assert opt.diagnostics()["asi_gap_avg"] == pytest.approx(gap_avgs[-1], rel=1e-9), t
    assert len(pairs) == 5 and opt.sam["rho"] != rho0
    assert rhos[0] == pytest.approx(rho0 * (1 - 0.01 * alpha), rel=1e-15)


# --------------------------------------------------------------------------------------------------
# 3. Per-group ρ: ρ = 0 excludes a group; e = ρ_g·N/‖N‖ (‖N‖ global over the perturbed tensors,
#    or per tensor)
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("perturb_norm", ["global", "per_tensor"])
@pytest.mark.parametrize("adaptive", [True, False])
def test_per_group_rho(ref, perturb_norm, adaptive):
    """Three groups: matrices with ρ = 0.2, a matrix and a vector with ρ = 0 (never perturbed, still
    stepped), AdamW-track vectors with ρ = 0.05 and their own adamw_betas/adamw_eps. Over 4 sync
    steps the weights seen inside the second pass are w + e with e transcribed here:
    N = g/(√v̂_prev + ε) of the tensor's own track (g before its first step), ⊙|w| if adaptive;
    ‖N‖ over the perturbed tensors only ("global") or each tensor's own ("per_tensor")."""
    gen = _gen(31)
    a_mats = [torch.randn(6, 4, generator=gen, dtype=torch.float64).requires_grad_(),
              torch.randn(5, 3, generator=gen, dtype=torch.float64).requires_grad_()]
    z_params = [torch.randn(4, 4, generator=gen, dtype=torch.float64).requires_grad_(),
                torch.randn(4, generator=gen, dtype=torch.float64).requires_grad_()]
    c_vecs = [torch.randn(6, generator=gen, dtype=torch.float64).requires_grad_(),
              torch.randn(3, generator=gen, dtype=torch.float64).requires_grad_()]
    params = a_mats + z_params + c_vecs
    group_rho = [0.2, 0.2, 0.0, 0.0, 0.05, 0.05]
    betas, eps, adamw_betas, adamw_eps = (0.9, 0.95), 1e-3, (0.8, 0.9), 1e-2  # large ε: they must show
    opt = hf_rmsuon.ARS([{"params": a_mats, "rho": 0.2},
                         {"params": z_params, "rho": 0.0},
                         {"params": c_vecs, "rho": 0.05, "track": "adamw"}],
                        k=1, lr=0.05, betas=betas, eps=eps, adamw_betas=adamw_betas, adamw_eps=adamw_eps,
                        adaptive=adaptive, perturb_norm=perturb_norm)
    tracks = [opt.spec_of(p).track for p in params]
    assert tracks == ["matrix", "matrix", "matrix", "adamw", "adamw", "adamw"]
    v = [torch.zeros_like(p) for p in params]
    for t in range(1, 5):
        g = [torch.randn(p.shape, generator=gen, dtype=torch.float64) for p in params]
        g_adv = [gi + 0.3 * torch.randn(gi.shape, generator=gen, dtype=torch.float64) for gi in g]
        w = [p.detach().clone() for p in params]
        # the transcription of e
        n = []
        for i, (gi, wi) in enumerate(zip(g, w)):
            b2, e_ = (betas[1], eps) if tracks[i] == "matrix" else (adamw_betas[1], adamw_eps)
            ni = gi if t == 1 else gi / ((v[i] / (1 - b2 ** (t - 1))).sqrt() + e_)
            n.append(ni * wi.abs() if adaptive else ni)
        on = [i for i, r in enumerate(group_rho) if r > 0]
        total = math.sqrt(sum(ref.fro(n[i]) ** 2 for i in on))
        due, perturbed = Driver(opt, params).step(g, g_adv)
        assert due
        for i, (seen, wi) in enumerate(zip(perturbed, w)):
            if group_rho[i] == 0:
                assert torch.equal(seen, wi), (t, i)  # ρ = 0: not perturbed at all
                continue
            norm = total if perturb_norm == "global" else ref.fro(n[i])
            _assert_rel(seen - wi, group_rho[i] * n[i] / norm, 1e-6)
            if perturb_norm == "per_tensor":
                assert ref.fro(seen - wi) == pytest.approx(group_rho[i], rel=1e-6)
        if perturb_norm == "global":  # Σ ‖e_i/ρ_g‖² = 1 over the perturbed tensors
            unit = sum((ref.fro(perturbed[i] - w[i]) / group_rho[i]) ** 2 for i in on)
            assert unit == pytest.approx(1.0, rel=1e-6)
        for i, p in enumerate(params):
            assert not torch.equal(p.detach(), w[i]), (t, i)  # every group is stepped (with g_adv)
            b2 = betas[1] if tracks[i] == "matrix" else adamw_betas[1]
            v[i] = b2 * v[i] + (1 - b2) * g_adv[i] ** 2


def test_rho_zero_group_is_excluded_in_closure_mode(ref):
    """A model whose first layer sits in a ρ = 0 group: inside the second pass its weights are the
    clean ones while the rest moved."""
    model, x, y = ref.regression_problem(seed=6)
    frozen = list(model.fc1.parameters())
    rest = [p for n, p in model.named_parameters() if not n.startswith("fc1.")]
    opt = hf_rmsuon.ARS([{"params": frozen, "rho": 0.0}, {"params": rest}], rho=0.1, lr=1e-3, adaptive=False)
    rec = Recorder(opt, model)
    rec.step((x, y))
    assert len(rec.calls) == 2
    clean, adv = rec.calls[0]["weights"], rec.calls[1]["weights"]
    ids = {id(p) for p in frozen}
    for p, a, b in zip(rec.params, clean, adv):
        assert torch.equal(a, b) == (id(p) in ids)


# --------------------------------------------------------------------------------------------------
# 4. adamw_betas / adamw_eps / adamw_weight_decay reach the AdamW track only
# --------------------------------------------------------------------------------------------------

NON_SAM = ("muon", "pure_ns_muon", "adamuon", "rmsuon", "ada_rmsuon", "f_ada_rmsuon")


@pytest.mark.parametrize("name", NON_SAM)
def test_adamw_track_hyperparameters_reach_the_adamw_track_only(name):
    """AdamW-track tensors (two 1-D tensors and a 2-D one forced onto the track) follow
    ``torch.optim.AdamW(lr=adamw_lr, betas=adamw_betas, eps=adamw_eps, weight_decay=adamw_weight_decay)``
    step for step; the matrix-track tensors are bit-identical to those of the same optimizer built
    without the options, whose AdamW track in turn follows torch's AdamW with the shared settings."""
    gen = _gen(41)
    mats = [torch.randn(6, 4, generator=gen, dtype=torch.float64),
            torch.randn(4, 5, generator=gen, dtype=torch.float64)]
    forced = torch.randn(5, 3, generator=gen, dtype=torch.float64)
    vecs = [torch.randn(4, generator=gen, dtype=torch.float64),
            torch.randn(6, generator=gen, dtype=torch.float64)]
    shared = dict(lr=0.02, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)
    extra = dict(adamw_lr=0.01, adamw_betas=(0.7, 0.95), adamw_eps=1e-3, adamw_weight_decay=0.3)

    def build(**hp):
        m = [t.clone().requires_grad_() for t in mats]
        f = forced.clone().requires_grad_()
        vv = [t.clone().requires_grad_() for t in vecs]
        opt = get_optimizer_class(name)([{"params": m}, {"params": [f], "track": "adamw"}, {"params": vv}],
                                        no_decay_1d=False, **shared, **hp)
        assert [opt.spec_of(p).track for p in (*m, f, *vv)] == ["matrix"] * 2 + ["adamw"] * 3
        return opt, m, [f, *vv]

    with_opts, m_a, a_a = build(**extra)
    without, m_b, a_b = build()
    torch_a = [t.detach().clone().requires_grad_() for t in (forced, *vecs)]
    torch_b = [t.detach().clone().requires_grad_() for t in (forced, *vecs)]
    ref_a = torch.optim.AdamW(torch_a, lr=extra["adamw_lr"], betas=extra["adamw_betas"],
                              eps=extra["adamw_eps"], weight_decay=extra["adamw_weight_decay"])
    ref_b = torch.optim.AdamW(torch_b, **shared)
    for _ in range(6):
        gm = [torch.randn(t.shape, generator=gen, dtype=torch.float64) for t in mats]
        ga = [1e-2 * torch.randn(t.shape, generator=gen, dtype=torch.float64) for t in (forced, *vecs)]
        for ps, gs in ((m_a, gm), (m_b, gm), (a_a, ga), (a_b, ga), (torch_a, ga), (torch_b, ga)):
            for p, gi in zip(ps, gs):
                p.grad = gi.clone()
        for opt in (with_opts, without, ref_a, ref_b):
            opt.step()
        for p, q in zip(m_a, m_b):
            assert torch.equal(p, q)  # the matrix track does not see the AdamW-track options
        for p, q in zip(a_a, torch_a):
            torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-12, atol=1e-14)
        for p, q in zip(a_b, torch_b):
            torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-12, atol=1e-14)
    # the options changed the AdamW track (the two optimizers' AdamW tensors differ)
    assert all(not torch.allclose(p, q) for p, q in zip(a_a, a_b))


def test_adamw_track_hyperparameters_in_optim_args():
    text = "adamw_betas=0.9:0.999,adamw_eps=1e-6,adamw_weight_decay=0.01"
    parsed = hf_rmsuon.parse_optim_args("ada_rmsuon", text)
    assert parsed == {"adamw_betas": (0.9, 0.999), "adamw_eps": 1e-6, "adamw_weight_decay": 0.01}
    opt = create_optimizer("ada_rmsuon", [torch.zeros(3, 3, requires_grad=True)], **parsed)
    group = opt.param_groups[0]
    assert tuple(group["adamw_betas"]) == (0.9, 0.999)
    assert group["adamw_eps"] == 1e-6 and group["adamw_weight_decay"] == 0.01
    # the matrix track's own settings are untouched
    assert tuple(group["betas"]) == (0.9, 0.999) and group["eps"] == 1e-8 and group["weight_decay"] == 0.01
    text = "aga_rule=signed,asi_first_sync=adapt,k=0,adaptive_sync=true"
    parsed = hf_rmsuon.parse_optim_args("ars2_neo", text)
    assert parsed == {"aga_rule": "signed", "asi_first_sync": "adapt", "k": 0, "adaptive_sync": True}
    with pytest.raises(ValueError, match="adamw_betas"):
        hf_rmsuon.parse_optim_args("ada_rmsuon", "adamw_betas=1.5:0.9")
