"""Performance contracts that can be checked without timing: host synchronisation per step, lean
optimizer state, batched Newton–Schulz, and the optional torch.compile path."""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import hf_rmsuon
from benchmarks.scale import HostSyncCounter
from hf_rmsuon import functional as F


@contextlib.contextmanager
def count_host_reads():
    """Host synchronisations inside the block — tensor → Python reads and Python data turned into
    tensors — counted by the benchmarks' :class:`~benchmarks.scale.HostSyncCounter`; ``n`` and ``calls``
    are filled when the block ends."""
    counted: dict = {}
    with HostSyncCounter() as c:
        yield counted
    counted.update(n=c.total + sum(c.uploads.values()), calls=list(c.calls))


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 16),
                               torch.nn.ReLU(), torch.nn.Linear(16, 4))


def _set_grads(model: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=g).to(p.dtype)


PLAIN = ["muon", "pure_ns_muon", "adamuon", "rmsuon", "ada_rmsuon", "f_ada_rmsuon"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("hp", [{}, {"natural_wd": "elementwise"}, {"energy_scale": "rms"}], ids=["default", "nwd", "rms"])
@pytest.mark.parametrize("name", PLAIN)
def test_steady_state_step_never_synchronises(name, hp, dtype):
    """Zero host synchronisations per step (fused AdamW track in fp32; foreach with fp32 state in bf16)."""
    schema = hf_rmsuon.get_optimizer_class(name).schema
    if not all(k in schema for k in hp):
        pytest.skip("option not in this member")
    model = _model().to(dtype)
    opt = hf_rmsuon.create_optimizer(name, model, **hp)
    for step in range(5):
        _set_grads(model, step)
        with count_host_reads() as reads:
            opt.step()
        if step >= 1:  # after the first step (lazy state creation, cached constants)
            assert reads["n"] == 0, f"{name}: host syncs in step {step + 1}: {reads['calls']}"
    assert opt.diagnostics()["optimizer_steps"] == 5  # and the step really ran


@pytest.mark.parametrize("hp", [dict(k=1), dict(k=3), dict(k=2, asi=True), dict(k=2, asi=True, asi_first_sync="adapt")],
                         ids=["k1", "k3", "k2-asi", "k2-asi-adapt"])
@pytest.mark.parametrize("name", ["ars", "ars2_neo"])
def test_sam_sync_and_lazy_steps_never_synchronise(name, hp):
    """Sync steps (second pass, shear force, ASI's ρ) and lazy steps, both through step(closure) and
    through the training-loop protocol with the losses given as device tensors."""
    if name == "ars" and "asi" in hp:
        pytest.skip("ASI is ARS2-Neo's")
    model = _model()
    opt = hf_rmsuon.create_optimizer(name, model, **hp)
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(0))

    def closure():
        opt.zero_grad()
        loss = model(x).square().mean()
        loss.backward()
        return loss

    reads_per_step = []
    for step in range(7):
        if step % 2:
            with count_host_reads() as reads:
                opt.step(closure)
        else:  # the Trainer's protocol
            loss = closure().detach()
            with count_host_reads() as reads:
                if opt.sam_pass_due():
                    opt.begin_sam_pass()
                    adv = closure()
                    opt.end_sam_pass(loss, adv.detach())
                opt.step()
        reads_per_step.append(reads["calls"])
    assert reads_per_step[1:] == [[]] * 6
    assert opt.sam["syncs"] == {1: 7, 2: 4, 3: 3}[hp["k"]]
    if hp.get("asi"):
        assert float(opt.sam["rho"]) != opt.defaults["rho"]  # ASI adapted ρ, on the device


def test_aga_reads_once_per_step_where_it_decides():
    """AGA's decision is a host read, made in sam_pass_due (where the Trainer must decide on the second
    pass); step() itself reads nothing, on lazy and sync steps alike."""
    model = _model()
    opt = hf_rmsuon.create_optimizer("ars2_neo", model, k=50, adaptive_sync=True, aga_lambda=1e6)
    decide, steps = [], []
    for step in range(6):
        _set_grads(model, step)
        with count_host_reads() as reads:
            due = opt.sam_pass_due()
        decide.append(reads["n"])
        if due:
            opt.begin_sam_pass()
            _set_grads(model, 100 + step)  # the adversarial gradient
            opt.end_sam_pass()
        with count_host_reads() as reads:
            opt.step()
        steps.append(reads["n"])
    assert opt.sam["syncs"] == 1  # only step 1 synced (λ huge, k large)
    assert decide == [0] + [1] * 5 and steps == [0] * 6


def test_raise_policy_reads_the_flag_once():
    """on_nonfinite="raise" must decide on the host before anything is written: one read per step."""
    model = _model()
    opt = hf_rmsuon.create_optimizer("ada_rmsuon", model, on_nonfinite="raise")
    for step in range(3):
        _set_grads(model, step)
        with count_host_reads() as reads:
            opt.step()
    assert reads["calls"] == ["__bool__"]


def test_state_holds_only_what_the_algorithm_needs():
    model = _model()
    layer = model[2].weight

    def state_keys(name, **hp):
        opt = hf_rmsuon.create_optimizer(name, model, **hp)
        for step in range(3):
            _set_grads(model, step)
            opt.step(lambda: None) if not getattr(opt, "sharpness_aware", False) else opt.step(
                lambda: _set_grads(model, 7))
        return {k for k, v in opt.state[layer].items() if torch.is_tensor(v)}

    assert state_keys("muon") == {"momentum_buffer"}
    assert state_keys("pure_ns_muon") == set()
    assert state_keys("adamuon") == {"momentum_buffer", "exp_avg_sq"}
    # Adam moments come with the step count, a 0-d tensor on the device
    assert state_keys("ada_rmsuon") == {"exp_avg", "exp_avg_sq", "step"}
    assert state_keys("ars") == {"exp_avg", "exp_avg_sq", "step"}  # k=1: no shear force kept
    assert state_keys("ars2_neo", k=3) == {"exp_avg", "exp_avg_sq", "step", "shear"}
    opt = hf_rmsuon.create_optimizer("ars", model)
    _set_grads(model, 0)
    opt.step(lambda: _set_grads(model, 1))
    assert opt._pass is None  # the weight copy and base gradients are released after the step


class _CountOps(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize(("device", "shape", "most_ops"),
                         [("meta", (1024, 3072), 3), ("meta", (151_936, 1024), 21), ("cpu", (1024, 3072), None)],
                         ids=["gpu-matrix", "gpu-embedding", "cpu-matrix"])
def test_dot_products_block_rows_in_cache_sized_blocks_only_on_a_cpu(device, shape, most_ops):
    """Per-tensor ⟨a, b⟩ (F-AdaRMSuon's decay, SAM's shear force): cache-sized blocks of rows on a CPU;
    on any other device, where each block costs two kernel launches, blocks only bound the temporary —
    a 1024×3072 matrix takes three kernels (row products, row sums, their total), a Qwen3 embedding ten
    blocks. The meta device stands in for a GPU: same dispatch, no values."""
    a, b = (torch.ones(shape, device=device) for _ in range(2))
    with _CountOps() as counted:
        result = F.dots([a], [b])
    products = counted.ops.count("mul") + counted.ops.count("sum")
    if most_ops is None:
        assert products > 10 and float(result[0]) == shape[0] * shape[1]  # blocked, and still exact
    else:
        assert products <= most_ops, counted.ops


def test_same_shape_matrices_share_one_newton_schulz_call(monkeypatch):
    calls = []
    original = F.newton_schulz
    monkeypatch.setattr(F, "newton_schulz", lambda x, *a, **k: calls.append(tuple(x.shape)) or original(x, *a, **k))
    model = torch.nn.Sequential(*[torch.nn.Linear(16, 16) for _ in range(4)], torch.nn.Linear(16, 8))
    opt = hf_rmsuon.create_optimizer("muon", model)
    _set_grads(model, 0)
    opt.step()
    assert sorted(calls) == [(1, 8, 16), (4, 16, 16)]


@pytest.mark.slow
def test_compiled_newton_schulz_agrees_with_eager():
    torch.manual_seed(0)
    x = torch.randn(3, 24, 40)
    eager = F.newton_schulz(x, dtype=torch.bfloat16)
    compiled = F.compiled_newton_schulz()(x, 5, F.NS_COEFFICIENTS, torch.bfloat16)
    torch.testing.assert_close(compiled, eager, rtol=2e-2, atol=2e-2)
    model_a, model_b = _model(), _model()
    opt_a = hf_rmsuon.create_optimizer("ada_rmsuon", model_a, ns_dtype="bfloat16")
    opt_b = hf_rmsuon.create_optimizer("ada_rmsuon", model_b, ns_dtype="bfloat16", compile=True)
    for step in range(2):
        _set_grads(model_a, step)
        _set_grads(model_b, step)
        opt_a.step()
        opt_b.step()
    for a, b in zip(model_a.parameters(), model_b.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-2, atol=1e-3)


@pytest.mark.parametrize("dtype,grad_scale", [(torch.float32, None), (torch.bfloat16, 64.0)], ids=["fp32", "bf16-scaled"])
def test_compiled_sam_passes_match_the_in_place_chain(monkeypatch, dtype, grad_scale):
    """``compile=True``: SAM's perturbation in two fused passes moves the weights where the in-place
    chain does (every sync step, the first without moments included; bf16 weights with fp32 state and a
    GradScaler's loss scale), restores them exactly, and leaves the run where the eager one ends."""
    monkeypatch.setattr(F, "compiled_newton_schulz", lambda: F.newton_schulz)  # the SAM passes are under test
    models = [_model().to(dtype), _model().to(dtype)]
    opts = [hf_rmsuon.create_optimizer("ars2_neo", m, k=2, rho=0.05, compile=c, state_dtype=torch.float32)
            for m, c in zip(models, (False, True))]
    syncs = 0
    for step in range(4):
        perturbed = []
        for model, opt in zip(models, opts):
            _set_grads(model, step)
            if grad_scale:
                for p in model.parameters():
                    p.grad.mul_(grad_scale)
            before = [p.detach().clone() for p in model.parameters()]
            if opt.sam_pass_due():
                opt.begin_sam_pass(grad_scale=grad_scale)
                perturbed.append([p.detach().float() - b.float() for p, b in zip(model.parameters(), before)])
                assert all(float(p.grad.abs().sum()) == 0 for p in model.parameters())  # zeroed for the replay
                _set_grads(model, 100 + step)  # the "adversarial" gradient
                if grad_scale:
                    for p in model.parameters():
                        p.grad.mul_(grad_scale)
                opt.end_sam_pass()
                assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))  # exact restore
            if grad_scale:
                for p in model.parameters():
                    p.grad.div_(grad_scale)
            opt.step()
        if perturbed:
            syncs += 1
            eager, fused = perturbed
            assert max(float(e.abs().max()) for e in eager) > 1e-4  # a real move
            tol = 1e-5 if dtype == torch.float32 else 2e-2
            for e, f in zip(eager, fused):
                torch.testing.assert_close(f, e, rtol=tol, atol=tol * 1e-2)
    assert syncs == 2
    for a, b in zip(*(m.parameters() for m in models)):
        torch.testing.assert_close(b.float(), a.float(), rtol=1e-4 if dtype == torch.float32 else 2e-2, atol=1e-5)


@pytest.mark.parametrize("least", [0, 100, None], ids=["all-fused", "by-size", "chain-only"])
def test_compile_routes_sam_passes_by_size_and_device_kind(monkeypatch, least):
    """``compile=True`` perturbs the tensors ``F.fuses_sam_passes`` picks (by device kind and size,
    ``F.FUSED_SAM_MIN_NUMEL``) in the fused passes and the rest in the in-place chain, under one global
    ``‖N‖``: the run agrees with ``compile=False`` to rounding, and where no tensor is picked it is that
    run bit for bit."""
    monkeypatch.setattr(F, "compiled_newton_schulz", lambda: F.newton_schulz)
    monkeypatch.setattr(F, "FUSED_SAM_MIN_NUMEL", {} if least is None else {"cpu": least})
    fused_sizes = []
    fused_perturb = F.fused_perturb_
    monkeypatch.setattr(F, "fused_perturb_", lambda params, *a: fused_sizes.extend(p.numel() for p in params)
                        or fused_perturb(params, *a))
    models = [_model(), _model()]
    opts = [hf_rmsuon.create_optimizer("ars", m, k=1, rho=0.05, compile=c) for m, c in zip(models, (False, True))]
    for step in range(3):
        for model, opt in zip(models, opts):
            _set_grads(model, step)
            assert opt.sam_pass_due()  # k=1: every step
            opt.begin_sam_pass()
            _set_grads(model, 100 + step)
            opt.end_sam_pass()
            opt.step()
    sizes = sorted(p.numel() for p in models[0].parameters())
    expected = [] if least is None else [n for n in sizes if n >= least]
    assert sorted(fused_sizes) == sorted(expected * 3)
    if least == 100:
        assert 0 < len(expected) < len(sizes)  # both paths in one perturbation
    for a, b in zip(*(m.parameters() for m in models)):
        if least is None:  # the chain is the compile=False run itself
            assert torch.equal(a, b)
        else:
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7)


def test_later_sync_steps_write_the_shear_force_in_place():
    """After the first sync step the new shear force is computed in the idle weight-copy buffer and
    copied into the stored one: the same memory every sync step (no full-size tensor per sync step)."""
    model = _model()
    opt = hf_rmsuon.create_optimizer("ars2_neo", model, k=2)
    pointers = []
    for step in range(5):
        _set_grads(model, step)
        if opt.sam_pass_due():
            opt.begin_sam_pass()
            _set_grads(model, 50 + step)
            opt.end_sam_pass()
            opt.step()
            pointers.append([opt.state[p]["shear"].data_ptr() for p in model.parameters()])
        else:
            opt.step()
    assert len(pointers) == 3 and pointers[0] == pointers[1] == pointers[2]
    assert opt.state[next(model.parameters())]["shear"].abs().sum() > 0
