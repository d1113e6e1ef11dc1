"""Every family member (SPEC §4) against independent references: torch.optim.Muon, torch.optim.AdamW
and the float64 reference optimizer of conftest.py; training smoke tests; state_dict round trips;
bad gradients; diagnostics."""

from __future__ import annotations

import copy
import inspect
import io
import math
import warnings

import pytest
import torch
from _numeric import assert_rel as _assert_rel
from _numeric import assert_sam_state_unchanged
from _numeric import gen as _gen

import hf_rmsuon
from hf_rmsuon import available_optimizers, create_optimizer, get_optimizer_class

ALL = available_optimizers()
SAM_MEMBERS = ("ars", "ars2_neo")


def _closure(opt, model, x, y):
    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss

    return closure


# --------------------------------------------------------------------------------------------------
# muon ≡ torch.optim.Muon
# --------------------------------------------------------------------------------------------------


def test_muon_defaults_are_torch_muon_defaults():
    theirs = inspect.signature(torch.optim.Muon).parameters
    ours = get_optimizer_class("muon").schema.defaults()
    for key in ("lr", "weight_decay", "momentum", "nesterov", "ns_steps"):
        assert ours[key] == theirs[key].default, key
    assert tuple(ours["ns_coefficients"]) == tuple(theirs["ns_coefficients"].default)


@pytest.mark.parametrize("adjust_lr", ["original", "match_rms_adamw"])
@pytest.mark.parametrize("nesterov", [True, False])
def test_muon_matches_torch_muon_step_for_step(adjust_lr, nesterov):
    shapes = [(32, 16), (16, 48), (24, 24)]
    gen = _gen(1)
    init = [torch.randn(*s, generator=gen) for s in shapes]
    ours = [p.clone().requires_grad_() for p in init]
    theirs = [p.clone().requires_grad_() for p in init]
    # two param groups with different lr / wd: per-group hyperparameters must match too
    opt = hf_rmsuon.Muon(
        [{"params": ours[:2], "track": "matrix"}, {"params": ours[2:], "track": "matrix", "lr": 0.05,
                                                     "weight_decay": 0.3}],
        lr=0.02, weight_decay=0.1, momentum=0.9, nesterov=nesterov, adjust_lr=adjust_lr, ns_dtype="bfloat16")
    ref = torch.optim.Muon(
        [{"params": theirs[:2]}, {"params": theirs[2:], "lr": 0.05, "weight_decay": 0.3}],
        lr=0.02, weight_decay=0.1, momentum=0.9, nesterov=nesterov,
        adjust_lr_fn=None if adjust_lr == "original" else adjust_lr)
    for _ in range(6):
        for a, b in zip(ours, theirs):
            g = torch.randn(a.shape, generator=gen)
            a.grad, b.grad = g.clone(), g.clone()
        opt.step()
        ref.step()
        for a, b in zip(ours, theirs):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
            torch.testing.assert_close(opt.state[a]["momentum_buffer"], ref.state[b]["momentum_buffer"],
                                       rtol=0, atol=1e-7)
    assert not torch.equal(ours[0], init[0])


# --------------------------------------------------------------------------------------------------
# One-to-three steps of every formula against the float64 reference
# --------------------------------------------------------------------------------------------------

VARIANTS = [
    ("muon", dict(nesterov=True, adjust_lr="original")),
    ("muon", dict(nesterov=False, adjust_lr="match_rms_adamw")),
    ("pure_ns_muon", dict(adjust_lr="original")),
    ("pure_ns_muon", dict(adjust_lr="match_rms_adamw")),
    ("adamuon", {}),
    ("rmsuon", {}),
    ("ada_rmsuon", dict(energy_scale="reference")),
    ("ada_rmsuon", dict(energy_scale="rms")),
    ("f_ada_rmsuon", dict(natural_wd="projected")),
    ("f_ada_rmsuon", dict(natural_wd="elementwise")),
    ("f_ada_rmsuon", dict(natural_wd="projected", energy_scale="rms")),
    ("ars", dict(k=0)),  # k = 0 never syncs: plain ada_rmsuon
    ("ars2_neo", dict(k=0, energy_scale="rms")),
]

MATRIX_SHAPES = [(12, 8), (8, 12), (3, 5, 4), (4, 2, 3, 3)]  # tall, wide, stacked (3-D), conv (4-D)
ADAMW_SHAPES = [(8,), (10, 4)]  # a bias and an embedding-like matrix routed to AdamW


def _make_tensors(seed=2):
    gen = _gen(seed)
    mats = [torch.randn(*s, generator=gen, dtype=torch.float64).requires_grad_() for s in MATRIX_SHAPES]
    vecs = [torch.randn(*s, generator=gen, dtype=torch.float64).requires_grad_() for s in ADAMW_SHAPES]
    return mats, vecs


@pytest.mark.parametrize("name,extra", VARIANTS, ids=[f"{n}-{'-'.join(map(str, e.values()))}" for n, e in VARIANTS])
def test_member_matches_float64_reference(ref, name, extra):
    hp = dict(lr=0.05, betas=(0.8, 0.95), eps=1e-8, weight_decay=0.1, **extra)
    if name == "muon":
        hp["momentum"] = 0.9
    mats, vecs = _make_tensors()
    params = mats + vecs
    tracks = ["matrix"] * len(mats) + ["adamw"] * len(vecs)
    opt = get_optimizer_class(name)([{"params": mats, "track": "matrix"}, {"params": vecs, "track": "adamw"}],
                                    ns_dtype="float32", no_decay_1d=False, **hp)
    model = ref.RefOptimizer(name, params, tracks, **hp)
    init = [p.detach().clone() for p in params]
    gen = _gen(3)
    for _ in range(3):
        grads = [torch.randn(p.shape, generator=gen, dtype=torch.float64) for p in params]
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
        directions = model.step(grads)
        for p, p0, want in zip(params, init, model.params):
            _assert_rel(p.detach() - p0, want - p0, 2e-5)
    # diagnostics of the last step: the RMS of the matrix-track step lr·U, and (except for Muon,
    # whose shape factor s goes into its learning rate) the mean energy ‖U‖
    steps_sq = sum(ref.fro(u * hp["lr"]) ** 2 for u in directions if u is not None)
    numel = sum(p.numel() for p in mats)
    diag = opt.diagnostics()
    assert diag["update_rms"] == pytest.approx(math.sqrt(steps_sq / numel), rel=1e-4)
    if name not in ("muon", "pure_ns_muon"):
        energies = [ref.fro(u) for u in directions if u is not None]
        assert diag["energy"] == pytest.approx(sum(energies) / len(energies), rel=1e-4)


def test_per_group_hyperparameters(ref):
    """Two matrix groups of one ada_rmsuon with different lr / energy_scale / weight decay."""
    gen = _gen(4)
    a = torch.randn(10, 6, generator=gen, dtype=torch.float64).requires_grad_()
    b = torch.randn(6, 10, generator=gen, dtype=torch.float64).requires_grad_()
    opt = hf_rmsuon.AdaRMSuon(
        [{"params": [a], "track": "matrix"},
         {"params": [b], "track": "matrix", "lr": 0.2, "energy_scale": "rms", "weight_decay": 0.0}],
        lr=0.01, weight_decay=0.1, ns_dtype="float32")
    ref_a = ref.RefOptimizer("ada_rmsuon", [a], ["matrix"], lr=0.01, weight_decay=0.1)
    ref_b = ref.RefOptimizer("ada_rmsuon", [b], ["matrix"], lr=0.2, weight_decay=0.0, energy_scale="rms")
    for _ in range(2):
        ga, gb = torch.randn(a.shape, generator=gen, dtype=torch.float64), torch.randn(b.shape, generator=gen,
                                                                                      dtype=torch.float64)
        a.grad, b.grad = ga.clone(), gb.clone()
        opt.step()
        ref_a.step([ga])
        ref_b.step([gb])
    torch.testing.assert_close(a.detach(), ref_a.params[0], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(b.detach(), ref_b.params[0], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name", ["rmsuon", "ada_rmsuon", "f_ada_rmsuon", "adamuon", "muon"])
def test_late_starting_parameter_has_its_own_step_count(ref, name):
    """A tensor that first gets a gradient at step 3 is bias-corrected as at its own step 1, while the
    rest of its group is at step 3 (both tracks)."""
    mats, vecs = _make_tensors(seed=9)
    mats, vecs = mats[:2], vecs[:2]
    params = mats + vecs
    hp = dict(lr=0.05, betas=(0.8, 0.95), weight_decay=0.1)
    opt = get_optimizer_class(name)([{"params": mats, "track": "matrix"}, {"params": vecs, "track": "adamw"}],
                                    ns_dtype="float32", no_decay_1d=False, **hp)
    model = ref.RefOptimizer(name, params, ["matrix", "matrix", "adamw", "adamw"], **hp)
    init = [p.detach().clone() for p in params]
    gen = _gen(10)
    for t in range(4):
        late = t < 2  # params[1] and params[3] receive no gradient on the first two steps
        grads = [torch.randn(p.shape, generator=gen, dtype=torch.float64) for p in params]
        if late:
            grads[1] = grads[3] = None
        for p, g in zip(params, grads):
            p.grad = None if g is None else g.clone()
        opt.step()
        model.step(grads)
        for p, p0, want in zip(params, init, model.params):
            if torch.equal(want, p0):
                assert torch.equal(p.detach(), p0)
            else:
                _assert_rel(p.detach() - p0, want - p0, 2e-5)


def test_zero_gradient_decay_paths():
    """A zero gradient gives U = 0 (NS(0) = 0, E = 0), isolating the weight-decay term: Euclidean
    members shrink matrices by (1 − lr·wd); f_ada_rmsuon (projected) has no Euclidean decay on the
    matrix track, so its matrices stay bit-identical, while its AdamW track still decays."""
    lr, wd = 0.1, 0.5
    for name in ("rmsuon", "ada_rmsuon", "f_ada_rmsuon", "muon", "adamuon"):
        w = torch.randn(6, 4, dtype=torch.float64).requires_grad_()
        bias = torch.randn(4, dtype=torch.float64).requires_grad_()
        w0, b0 = w.detach().clone(), bias.detach().clone()
        opt = get_optimizer_class(name)([{"params": [w], "track": "matrix"}, {"params": [bias], "track": "adamw"}],
                                        lr=lr, weight_decay=wd, ns_dtype="float32", no_decay_1d=False)
        w.grad, bias.grad = torch.zeros_like(w), torch.zeros_like(bias)
        opt.step()
        assert not torch.isnan(w).any()
        if name == "f_ada_rmsuon":
            assert torch.equal(w.detach(), w0)
        else:  # (adamuon: NS(sign(0)) = 0 too, so Û = 0 and only the decay remains)
            torch.testing.assert_close(w.detach(), w0 * (1 - lr * wd), rtol=1e-15, atol=0)
        torch.testing.assert_close(bias.detach(), b0 * (1 - lr * wd), rtol=1e-15, atol=0)


# --------------------------------------------------------------------------------------------------
# The shared AdamW track ≡ torch.optim.AdamW
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ALL)
def test_adamw_track_matches_torch_adamw(name):
    gen = _gen(5)
    init = [torch.randn(7, generator=gen), torch.randn(12, 5, generator=gen), torch.randn(3, generator=gen)]
    ours = [p.clone().requires_grad_() for p in init]
    theirs = [p.clone().requires_grad_() for p in init]
    hp = dict(lr=0.01, betas=(0.85, 0.97), eps=1e-6, weight_decay=0.05)
    extra = {"k": 0} if name in SAM_MEMBERS else {}
    opt = get_optimizer_class(name)(
        [{"params": ours[:2], "track": "adamw"}, {"params": ours[2:], "track": "adamw", "lr": 0.03}],
        no_decay_1d=False, **hp, **extra)
    ref = torch.optim.AdamW([{"params": theirs[:2]}, {"params": theirs[2:], "lr": 0.03}], foreach=False, **hp)
    for _ in range(5):
        for a, b in zip(ours, theirs):
            g = torch.randn(a.shape, generator=gen)
            a.grad, b.grad = g.clone(), g.clone()
        opt.step()
        ref.step()
    for a, b, p0 in zip(ours, theirs, init):
        torch.testing.assert_close(a.detach() - p0, b.detach() - p0, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(opt.state[a]["exp_avg_sq"], ref.state[b]["exp_avg_sq"], rtol=1e-6, atol=0)


# --------------------------------------------------------------------------------------------------
# Training smoke tests: every member reduces the loss
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ALL)
def test_reduces_loss_on_regression(ref, name):
    model, x, y = ref.regression_problem(seed=0)
    opt = create_optimizer(name, model, lr=ref.TRAIN_LR[name])
    closure = _closure(opt, model, x, y)
    with torch.no_grad():
        initial = float(torch.nn.functional.mse_loss(model(x), y))
    for _ in range(40):
        opt.step(closure)
    with torch.no_grad():
        final = float(torch.nn.functional.mse_loss(model(x), y))
    assert math.isfinite(final) and final < 0.7 * initial, (initial, final)


@pytest.mark.parametrize("name", ALL)
def test_reduces_loss_on_tiny_transformer(ref, name):
    model = ref.tiny_causal_lm("qwen3", tied=False)
    ids = ref.token_batch(0)
    opt = create_optimizer(name, model, lr=ref.TRAIN_LR[name])

    def closure():
        opt.zero_grad()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        return loss

    first = float(opt.step(closure).detach())
    for _ in range(11):
        opt.step(closure)
    with torch.no_grad():
        final = float(model(input_ids=ids, labels=ids).loss)
    assert math.isfinite(final) and final < 0.85 * first, (first, final)


# --------------------------------------------------------------------------------------------------
# state_dict round trip: bit-identical continuation
# --------------------------------------------------------------------------------------------------

ROUND_TRIP = [(n, {}) for n in ALL] + [
    ("ars", dict(k=3)),
    ("ars2_neo", dict(k=3, adaptive_sync=True, asi=True, aga_lambda=1.0)),
    ("ars2_neo", dict(k=3, adaptive_sync=True, asi=True, aga_rule="signed", aga_lambda=0.5)),
]


def _batches(n_steps, seed=6):
    gen = _gen(seed)
    w = torch.randn(8, 2, generator=gen)
    out = []
    for _ in range(n_steps):
        x = torch.randn(32, 8, generator=gen)
        out.append((x, torch.sin(x @ w)))
    return out


def _run(opt, model, batches):
    for x, y in batches:
        opt.step(_closure(opt, model, x, y))


@pytest.mark.parametrize("name,extra", ROUND_TRIP, ids=[f"{n}-{'-'.join(map(str, e.values()))}" for n, e in ROUND_TRIP])
def test_state_dict_round_trip_is_bit_identical(ref, name, extra):
    hp = dict(lr=ref.TRAIN_LR[name], **extra)
    batches = _batches(9)
    base, _, _ = ref.regression_problem(seed=1)

    straight = copy.deepcopy(base)
    opt = create_optimizer(name, straight, **hp)
    _run(opt, straight, batches)

    first = copy.deepcopy(base)
    opt1 = create_optimizer(name, first, **hp)
    _run(opt1, first, batches[:4])
    buf = io.BytesIO()
    torch.save({"model": first.state_dict(), "optim": opt1.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=False)
    del opt1, first

    resumed = copy.deepcopy(base)
    resumed.load_state_dict(saved["model"])
    opt2 = create_optimizer(name, resumed, **hp)
    opt2.load_state_dict(saved["optim"])
    _run(opt2, resumed, batches[4:])

    for (n, a), b in zip(straight.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), n
    for pa, pb in zip(straight.parameters(), resumed.parameters()):
        sa, sb = opt.state[pa], opt2.state[pb]
        assert sa.keys() == sb.keys()
        for key in sa:
            va, vb = sa[key], sb[key]
            assert torch.equal(va, vb) if isinstance(va, torch.Tensor) else va == vb, key
    if name in SAM_MEMBERS:
        assert opt2.sam == opt.sam
        # the family state travels inside the first param group (distributed checkpoints keep only
        # "state" and "param_groups")
        assert "sam" in saved["optim"]["param_groups"][0]["family"]
    assert opt2.diagnostics() == opt.diagnostics()

    # negative control: continuing from the model alone (fresh optimizer state) does not reproduce it
    control = copy.deepcopy(base)
    control.load_state_dict(saved["model"])
    _run(create_optimizer(name, control, **hp), control, batches[4:])
    assert not all(torch.equal(a, b) for a, b in zip(straight.parameters(), control.parameters()))


def test_round_trip_exercises_aga_and_asi(ref):
    """The AGA/ASI round-trip case above must actually see lazy steps, φ-evaluations and a moving ρ."""
    model, _, _ = ref.regression_problem(seed=1)
    opt = create_optimizer("ars2_neo", model, lr=ref.TRAIN_LR["ars2_neo"], k=3, adaptive_sync=True, asi=True,
                           aga_lambda=1.0)
    _run(opt, model, _batches(9))
    assert 1 < opt.sam["syncs"] < 9
    assert opt.sam["rho"] != 0.1
    assert "phi" in opt.diagnostics()


# --------------------------------------------------------------------------------------------------
# Bad gradients and parameters
# --------------------------------------------------------------------------------------------------


def _snapshot(opt, params):
    return ([p.detach().clone() for p in params],
            copy.deepcopy({id(p): dict(opt.state[p]) for p in params}),
            copy.deepcopy(getattr(opt, "sam", None)))


def _assert_unchanged(opt, params, snap):
    values, state, sam = snap
    for p, v in zip(params, values):
        assert torch.equal(p.detach(), v)
    now = {id(p): dict(opt.state[p]) for p in params}
    assert now.keys() == state.keys()
    for pid, st in state.items():
        assert now[pid].keys() == st.keys()
        for key, val in st.items():
            assert torch.equal(now[pid][key], val) if isinstance(val, torch.Tensor) else now[pid][key] == val
    if sam is not None:
        assert_sam_state_unchanged(opt.sam, sam)


NONFINITE_CASES = [(n, {"k": 2} if n in SAM_MEMBERS else {}) for n in ALL] + [
    ("ars2_neo", dict(k=3, adaptive_sync=True, asi=True))]


def _stepped_then_poisoned(ref, name, extra, poison):
    """An optimizer after three good steps, its parameters, a snapshot, and a closure whose gradients
    ``poison(model)`` then spoils."""
    model, x, y = ref.regression_problem(seed=2)
    opt = create_optimizer(name, model, lr=ref.TRAIN_LR[name], **extra)
    params = list(model.parameters())
    good = _closure(opt, model, x, y)
    for _ in range(3):
        opt.step(good)

    def poisoned():
        loss = good()
        poison(model)
        return loss

    return model, opt, params, good, poisoned, _snapshot(opt, params)


@pytest.mark.parametrize("name,extra", NONFINITE_CASES, ids=[f"{n}-{len(e)}" for n, e in NONFINITE_CASES])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_gradient_skips_the_whole_step(ref, name, extra, bad):
    def poison(model):
        model.fc1.weight.grad[0, 0] = bad  # one entry of one matrix-track tensor

    model, opt, params, good, poisoned, snap = _stepped_then_poisoned(ref, name, extra, poison)
    opt.step(poisoned)  # decided on the device: nothing is read, nothing warned inside step()
    _assert_unchanged(opt, params, snap)
    with pytest.warns(RuntimeWarning, match="non-finite"):  # reported where the count is read
        assert opt.diagnostics()["nonfinite_steps"] == 1
    # warned once: a second bad step is skipped and counted silently
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        opt.step(poisoned)
    _assert_unchanged(opt, params, snap)
    assert opt.diagnostics()["nonfinite_steps"] == 2
    # and training continues normally afterwards
    opt.step(good)
    assert not torch.equal(model.fc1.weight.detach(), snap[0][0])


@pytest.mark.parametrize("name,extra", [("muon", {}), ("ada_rmsuon", {}), ("ars2_neo", {"k": 2})])
def test_nonfinite_gradient_skips_with_the_paired_halves_gate(ref, monkeypatch, name, extra):
    """Every gradient read as the dot product of its halves (the CPU path for large tensors, forced here
    onto the tiny model): an inf in the second half of an AdamW-track tensor still skips the step."""
    from hf_rmsuon import functional as F

    def poison(model):
        model.fc2.bias.grad.view(-1)[-1] = float("inf")

    monkeypatch.setitem(F.PAIRED_HALVES_MIN_NUMEL, "cpu", 1)
    _, opt, params, _, poisoned, snap = _stepped_then_poisoned(ref, name, extra, poison)
    opt.step(poisoned)
    _assert_unchanged(opt, params, snap)
    with pytest.warns(RuntimeWarning, match="non-finite"):
        assert opt.diagnostics()["nonfinite_steps"] == 1


@pytest.mark.parametrize("name", ALL)
def test_nonfinite_gradient_raises_when_asked(ref, name):
    model, x, y = ref.regression_problem(seed=3)
    opt = create_optimizer(name, model, on_nonfinite="raise")
    params = list(model.parameters())
    good = _closure(opt, model, x, y)
    opt.step(good)
    snap = _snapshot(opt, params)

    def poisoned():
        loss = good()
        model.fc2.bias.grad[0] = float("nan")  # an AdamW-track tensor this time
        return loss

    with pytest.raises(FloatingPointError, match="non-finite"):
        opt.step(poisoned)
    _assert_unchanged(opt, params, snap)


@pytest.mark.parametrize("name", ALL)
def test_params_without_grad_are_skipped(name):
    gen = _gen(7)
    w_used, w_idle = torch.randn(6, 4, generator=gen).requires_grad_(), torch.randn(6, 4, generator=gen).requires_grad_()
    b_used, b_idle = torch.randn(4, generator=gen).requires_grad_(), torch.randn(4, generator=gen).requires_grad_()
    idle0 = (w_idle.detach().clone(), b_idle.detach().clone())
    used0 = w_used.detach().clone()
    opt = get_optimizer_class(name)([{"params": [w_used, w_idle], "track": "matrix"},
                                     {"params": [b_used, b_idle], "track": "adamw"}], weight_decay=0.5, lr=0.01)

    def closure():
        opt.zero_grad()
        loss = (torch.randn(6, generator=_gen(8)) @ w_used @ b_used).pow(2)
        loss.backward()
        return loss

    for _ in range(3):
        opt.step(closure)
    assert torch.equal(w_idle.detach(), idle0[0]) and torch.equal(b_idle.detach(), idle0[1])
    assert len(opt.state[w_idle]) == 0 and len(opt.state[b_idle]) == 0
    assert not torch.equal(w_used.detach(), used0)
    assert len(opt.state[b_used]) > 0 and (len(opt.state[w_used]) > 0 or name == "pure_ns_muon")


@pytest.mark.parametrize("name", ALL)
def test_sparse_gradients_are_rejected(name):
    emb = torch.nn.Embedding(10, 4, sparse=True)
    opt = get_optimizer_class(name)([{"params": emb.parameters(), "track": "adamw"}], k=0) if name in SAM_MEMBERS \
        else get_optimizer_class(name)([{"params": emb.parameters(), "track": "adamw"}])
    emb(torch.tensor([1, 2])).sum().backward()
    before = emb.weight.detach().clone()
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()
    assert torch.equal(emb.weight.detach(), before)


@pytest.mark.parametrize("name", ALL)
def test_complex_parameters_are_rejected(name):
    z = torch.randn(4, 4, dtype=torch.complex64, requires_grad=True)
    for params in ([z], [{"params": [z], "track": "adamw"}], [{"params": [z], "track": "matrix"}]):
        with pytest.raises(ValueError, match="complex"):
            get_optimizer_class(name)(params)


@pytest.mark.parametrize("name", ALL)
def test_vector_on_matrix_track_is_rejected(name):
    with pytest.raises(ValueError, match="matrix track"):
        get_optimizer_class(name)([{"params": [torch.zeros(5, requires_grad=True)], "track": "matrix"}])


# --------------------------------------------------------------------------------------------------
# Diagnostics
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ALL)
def test_diagnostics_common_keys(ref, name):
    model, x, y = ref.regression_problem(seed=4)
    opt = create_optimizer(name, model, lr=ref.TRAIN_LR[name])
    assert opt.diagnostics()["nonfinite_steps"] == 0
    w0 = model.fc1.weight.detach().clone()
    opt.step(_closure(opt, model, x, y))
    diag = opt.diagnostics()
    for key in ("energy", "update_rms", "nonfinite_steps"):
        assert key in diag and isinstance(diag[key], float) and math.isfinite(diag[key]), key
    assert diag["energy"] > 0 and diag["update_rms"] > 0 and diag["nonfinite_steps"] == 0
    # update_rms really is the RMS of the matrix-track step (fc1, fc2 weights), up to decay
    matrices = [model.fc1.weight, model.fc2.weight]
    assert diag["update_rms"] > 0.5 * ref.fro(model.fc1.weight.detach() - w0) / math.sqrt(
        sum(p.numel() for p in matrices))
