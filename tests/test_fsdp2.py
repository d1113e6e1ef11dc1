"""FSDP2 (DTensor, ``Shard(0)`` on a 1-D mesh) with raw ``fully_shard`` on 2 spawned CPU ranks (gloo):
owner-computes Newton–Schulz equals the unsharded run, sharded state, exact SAM, non-finite agreement,
distributed-checkpoint round trip and refusal of unsupported layouts. Each scenario runs inside one
pair of spawned processes (bounded by a timeout) and reports back plain values."""

from __future__ import annotations

import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from _numeric import free_port
from torch import nn

WORLD = 2
TIMEOUT = 240


class _Experts(nn.Module):
    def __init__(self):
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.randn(3, 6, 8) * 0.3)


class Mixed(nn.Module):
    """A tiny Qwen3 plus uneven shapes: a 33-row and a 1-row matrix, a 3-D expert stack, a conv."""

    def __init__(self):
        super().__init__()
        import transformers

        cfg = transformers.Qwen3Config(vocab_size=48, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                       num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                                       max_position_embeddings=32, tie_word_embeddings=False)
        self.lm = transformers.Qwen3ForCausalLM(cfg)
        self.wide = nn.Linear(16, 33, bias=False)
        self.one = nn.Linear(33, 1, bias=False)
        self.experts = _Experts()
        self.conv = nn.Conv1d(8, 4, 3, bias=False)

    def forward(self, ids):
        hidden = self.lm.model(input_ids=ids).last_hidden_state  # (b, t, 16)
        logits = self.lm.lm_head(hidden)
        extra = self.one(torch.tanh(self.wide(hidden))).mean()
        mixed = torch.einsum("btd,ehd->beh", hidden[..., :8], self.experts.gate_up_proj).pow(2).mean()
        conv = self.conv(hidden[..., :8].transpose(1, 2)).pow(2).mean()
        loss = nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 48), ids[:, 1:].reshape(-1))
        return loss + 0.1 * extra + 0.1 * mixed + 0.1 * conv


def make_model(seed: int = 0) -> Mixed:
    torch.manual_seed(seed)
    return Mixed()


def shard(model: nn.Module) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    fully_shard(model.lm.model.layers[0])
    fully_shard(model)
    return model


def full(p: torch.Tensor) -> torch.Tensor:
    return p.full_tensor().detach() if hasattr(p, "full_tensor") else p.detach()


def batch(step: int) -> torch.Tensor:
    return torch.randint(0, 48, (4, 10), generator=torch.Generator().manual_seed(50 + step))


def preset_grads(model: nn.Module, step: int) -> None:
    """The same full random gradient on every rank, as after a reduction (sliced for shards)."""
    from torch.distributed.tensor import distribute_tensor

    g = torch.Generator().manual_seed(100 + step)
    for p in model.parameters():
        grad = torch.randn(p.shape, generator=g)
        p.grad = distribute_tensor(grad, p.device_mesh, p.placements) if hasattr(p, "device_mesh") else grad


def run_preset(name: str, sharded: bool, steps: int = 3, **hp):
    import hf_rmsuon

    model = make_model()
    if sharded:
        shard(model)
    opt = hf_rmsuon.create_optimizer(name, model, lr=2e-2, ns_dtype="float32", **hp)
    for step in range(steps):
        preset_grads(model, step)
        opt.step()
    return model, opt


def run_closure(name: str, sharded: bool, steps: int = 3, accumulate: int = 1, **hp):
    import hf_rmsuon

    model = make_model()
    if sharded:
        shard(model)
    opt = hf_rmsuon.create_optimizer(name, model, ns_dtype="float32", **hp)
    for step in range(steps):
        def closure(step=step):
            opt.zero_grad()
            total = 0.0
            for micro in range(accumulate):
                loss = model(batch(10 * step + micro)) / accumulate
                loss.backward()
                total += loss.detach()
            return total

        opt.step(closure)
    return model, opt


# --------------------------------------------------------------------------------------------------
# scenarios (run on every rank; return plain values)
# --------------------------------------------------------------------------------------------------


def scenario_equivalence(rank: int) -> dict:
    """Parameters after 3 steps: sharded vs unsharded, per member."""
    from hf_rmsuon import functional as F

    out = {}
    counted = {"mine": 0}
    original = F.newton_schulz

    def counting(x, *args, **kwargs):
        counted["mine"] += x.shape[0] if x.ndim == 3 else 1
        return original(x, *args, **kwargs)

    for name in ("muon", "pure_ns_muon", "ada_rmsuon", "rmsuon", "adamuon", "f_ada_rmsuon"):
        counted["mine"] = 0
        F.newton_schulz = counting
        try:
            sharded, opt = run_preset(name, True)
            sharded_calls = counted["mine"]
            counted["mine"] = 0
            plain, _ = run_preset(name, False)
            plain_calls = counted["mine"]
        finally:
            F.newton_schulz = original
        matrix, vector = [], []
        for (n, a), b in zip(sharded.named_parameters(), plain.parameters()):
            exact = torch.equal(full(a), b.detach())
            rel = float((full(a) - b.detach()).norm() / b.detach().norm().clamp_min(1e-12))
            (matrix if opt.spec_of(a).track == "matrix" else vector).append((n, exact, rel))
        # every state tensor sharded like its parameter; the step counts are plain 0-d tensors on the local
        # device (identical on every rank, as torch's own optimizers keep them under FSDP2)
        state_ok = all((isinstance(v, torch.distributed.tensor.DTensor) and v.placements == p.placements)
                       if key != "step" else (type(v) is torch.Tensor and v.ndim == 0)
                       for p in sharded.parameters() for key, v in opt.state[p].items() if isinstance(v, torch.Tensor))
        out[name] = {"matrix": matrix, "vector": vector, "ns_calls": sharded_calls, "ns_calls_plain": plain_calls,
                     "state_dtensors": state_ok}
    return out


def scenario_state_memory(rank: int) -> dict:
    def state_bytes(opt, local: bool):
        total = 0
        for st in opt.state.values():
            for key, v in st.items():
                if isinstance(v, torch.Tensor) and key != "step":  # (4-byte step counters: not sharded)
                    t = v.to_local() if local and hasattr(v, "to_local") else v
                    total += t.numel() * t.element_size()
        return total

    _, sharded = run_preset("ada_rmsuon", True, steps=1)
    _, plain = run_preset("ada_rmsuon", False, steps=1)
    return {"sharded": state_bytes(sharded, True), "plain": state_bytes(plain, False)}


def _sam_against_hand_computed(accumulate: int, rho: float = 0.05) -> tuple[float, bool]:
    """One ARS step at lr 0 on the sharded model: (relative error of the adversarial gradient against
    a hand-computed full-model SAM gradient, whether the weights were restored exactly)."""
    from torch.func import functional_call

    import hf_rmsuon

    model = shard(make_model())
    opt = hf_rmsuon.create_optimizer("ars", model, lr=0.0, weight_decay=0.0, rho=rho, ns_dtype="float32")
    before = {n: full(p).clone() for n, p in model.named_parameters()}

    def closure():
        opt.zero_grad()
        total = 0.0
        for micro in range(accumulate):
            loss = model(batch(micro)) / accumulate
            loss.backward()
            total += loss.detach()
        return total

    opt.step(closure)
    adv = {n: full(p.grad) for n, p in model.named_parameters()}
    after = {n: full(p) for n, p in model.named_parameters()}
    ref = make_model()
    names = [n for n, _ in ref.named_parameters()]

    def loss_at(weights):
        return sum(functional_call(ref, weights, (batch(m),)) / accumulate for m in range(accumulate))

    w = {n: before[n].clone().requires_grad_() for n in names}
    g = torch.autograd.grad(loss_at(w), [w[n] for n in names])
    direction = [gi * before[n].abs() for gi, n in zip(g, names)]  # first step: N = g, adaptive ⊙|w|
    norm = torch.sqrt(sum((d.double() ** 2).sum() for d in direction))
    w_adv = {n: (before[n] + rho * d / (norm.float() + 1e-12)).requires_grad_() for n, d in zip(names, direction)}
    g_adv = torch.autograd.grad(loss_at(w_adv), [w_adv[n] for n in names])
    rel = max(float((adv[n] - gi).norm() / gi.norm().clamp_min(1e-12)) for n, gi in zip(names, g_adv))
    return rel, all(torch.equal(after[n], before[n]) for n in names)


def scenario_sam(rank: int) -> dict:
    """ars2_neo Lazy + AGA vs the unsharded run; the adversarial gradient vs a hand-computed one;
    exact restore at lr 0 with reshard_after_backward=False."""
    import hf_rmsuon

    out = {}
    hp = dict(lr=3e-3, k=2, adaptive_sync=True, rho=0.05)
    a, opt_a = run_closure("ars2_neo", True, steps=4, **hp)
    b, opt_b = run_closure("ars2_neo", False, steps=4, **hp)
    out["neo_rel"] = max(float((full(x) - y.detach()).norm() / y.detach().norm().clamp_min(1e-12))
                         for x, y in zip(a.parameters(), b.parameters()))
    out["neo_syncs"] = (opt_a.sam["syncs"], opt_b.sam["syncs"])
    # compile=True's fused perturbation passes (row norms gathered like the in-place chain's); the
    # Newton–Schulz kernel stays eager here, it is not what is under test
    from hf_rmsuon import functional as F

    compiled_ns, F.compiled_newton_schulz = F.compiled_newton_schulz, lambda: F.newton_schulz
    routing = F.FUSED_SAM_MIN_NUMEL
    try:
        a_c, _ = run_closure("ars2_neo", True, steps=4, compile=True, **hp)
        b_c, _ = run_closure("ars2_neo", False, steps=4, compile=True, **hp)
        # fused passes by size: 264 splits `wide` (33×16) into local shards of 272 and 256 values and the
        # 512-value MLP matrices into 256 each — ranks deciding on their shards would disagree with each
        # other and with the unsharded run (and pair their row-reduction collectives wrongly)
        F.FUSED_SAM_MIN_NUMEL = {"cpu": 264}
        a_m, _ = run_closure("ars2_neo", True, steps=4, compile=True, **hp)
        b_m, _ = run_closure("ars2_neo", False, steps=4, compile=True, **hp)
    finally:
        F.compiled_newton_schulz = compiled_ns
        F.FUSED_SAM_MIN_NUMEL = routing
    out["neo_compiled_rel"] = max(float((full(x) - y.detach()).norm() / y.detach().norm().clamp_min(1e-12))
                                  for x, y in zip(a_c.parameters(), b_c.parameters()))
    out["neo_mixed_rel"] = max(float((full(x) - y.detach()).norm() / y.detach().norm().clamp_min(1e-12))
                               for x, y in zip(a_m.parameters(), b_m.parameters()))
    out["compiled_vs_eager_rel"] = max(float((x - y).detach().norm() / y.detach().norm().clamp_min(1e-12))
                                       for x, y in zip(b_c.parameters(), b.parameters()))

    for accumulate in (1, 2):
        out[f"adv_rel_{accumulate}"], out[f"restored_{accumulate}"] = _sam_against_hand_computed(accumulate)

    # reshard_after_backward=False: the second pass must still see w + e (not the stale gathered w)
    model = make_model()
    shard(model)
    model.set_reshard_after_backward(False)  # recurses into the layer's FSDP module
    opt = hf_rmsuon.create_optimizer("ars", model, lr=0.0, weight_decay=0.0, rho=0.5)
    losses = []

    def closure():
        opt.zero_grad()
        loss = model(batch(0))
        loss.backward()
        losses.append(float(loss))
        return loss

    opt.step(closure)
    out["second_pass_differs"] = losses[0] != losses[1]
    return out


def scenario_nonfinite(rank: int) -> dict:
    import hf_rmsuon

    model = shard(make_model())
    opt = hf_rmsuon.create_optimizer("muon", model, lr=1e-2)
    preset_grads(model, 0)
    if rank == 1:
        local = model.wide.weight.grad.to_local()
        if local.numel():
            local[0, 0] = float("nan")
    before = [full(p).clone() for p in model.parameters()]
    opt.step()  # the gate is all-reduced on the device: both ranks skip, neither reads
    unchanged = all(torch.equal(full(p), b) for p, b in zip(model.parameters(), before))
    with pytest.warns(RuntimeWarning, match="non-finite"):
        skipped = opt.diagnostics()["nonfinite_steps"]
    return {"unchanged": unchanged, "skipped": skipped}


def scenario_checkpoint(rank: int) -> dict:
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    import hf_rmsuon

    def train(model, opt, steps, start):
        for step in range(start, start + steps):
            def closure(step=step):
                opt.zero_grad()
                loss = model(batch(step))
                loss.backward()
                return loss

            opt.step(closure)

    hp = dict(lr=3e-3, k=2, adaptive_sync=True, ns_dtype="float32")
    model = shard(make_model())
    opt = hf_rmsuon.create_optimizer("ars2_neo", model, **hp)
    train(model, opt, 2, 0)
    osd = get_optimizer_state_dict(model, opt)  # aliases the live state: load it before training on
    weights = {n: full(p).clone() for n, p in model.named_parameters()}
    resumed_model = shard(make_model(seed=1))  # other weights and a fresh optimizer: all comes from the checkpoint
    with torch.no_grad():
        for n, p in resumed_model.named_parameters():
            p.copy_(torch.distributed.tensor.distribute_tensor(weights[n], p.device_mesh, p.placements))
    resumed = hf_rmsuon.create_optimizer("ars2_neo", resumed_model, **hp)
    set_optimizer_state_dict(resumed_model, resumed, osd)
    train(model, opt, 2, 2)
    uninterrupted = [full(p) for p in model.parameters()]
    train(resumed_model, resumed, 2, 2)
    identical = all(torch.equal(full(p), u) for p, u in zip(resumed_model.parameters(), uninterrupted))
    return {"identical": identical, "sam": dict(resumed.sam) == dict(opt.sam)}


def scenario_layouts(rank: int) -> dict:
    """Unsupported layouts raise before any step, naming what is supported."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    import hf_rmsuon

    messages = {}
    mesh1 = init_device_mesh("cpu", (WORLD,))
    mesh2 = init_device_mesh("cpu", (1, WORLD), mesh_dim_names=("replicate", "shard"))
    cases = {
        "hsdp_2d_mesh": [nn.Parameter(distribute_tensor(torch.randn(8, 4), mesh2, [Replicate(), Shard(0)]))],
        "shard_dim1": [nn.Parameter(distribute_tensor(torch.randn(8, 4), mesh1, [Shard(1)]))],
        "replicate": [nn.Parameter(distribute_tensor(torch.randn(8, 4), mesh1, [Replicate()]))],
        "mixed": [nn.Parameter(distribute_tensor(torch.randn(8, 4), mesh1, [Shard(0)])), nn.Parameter(torch.randn(4, 4))],
    }
    for key, params in cases.items():
        try:
            hf_rmsuon.Muon(params)
            messages[key] = None
        except ValueError as err:
            messages[key] = str(err)
    try:  # a SAM member over sharded parameters without the model
        hf_rmsuon.ARS([nn.Parameter(distribute_tensor(torch.randn(8, 4), mesh1, [Shard(0)]))])
        messages["sam_without_model"] = None
    except ValueError as err:
        messages["sam_without_model"] = str(err)
    return messages


SCENARIOS = {f.__name__: f for f in (scenario_equivalence, scenario_state_memory, scenario_sam, scenario_nonfinite,
                                     scenario_checkpoint, scenario_layouts)}


def _worker(rank: int, port: int, names: list[str], queue) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    try:
        for name in names:
            try:
                queue.put((rank, name, SCENARIOS[name](rank)))
            except Exception:  # report, do not hang the other rank's test
                queue.put((rank, name, {"error": traceback.format_exc()}))
                raise
    finally:
        dist.destroy_process_group()



@pytest.fixture(scope="module")
def results() -> dict:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    names = list(SCENARIOS)
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, port, names, queue)) for r in range(WORLD)]
    for p in procs:
        p.start()
    out: dict = {}
    try:
        for _ in range(WORLD * len(names)):
            rank, name, value = queue.get(timeout=TIMEOUT)
            out.setdefault(name, {})[rank] = value
            if "error" in value:
                break
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    return out



def _both(results, name):
    assert name in results, f"{name} did not report (timeout or an earlier scenario failed): {results}"
    for rank in range(WORLD):
        value = results[name].get(rank)
        assert value is not None, f"rank {rank} did not report {name}"
        assert "error" not in value, value.get("error")
    return results[name][0], results[name][1]


def test_owner_computes_equals_unsharded(results):
    first, second = _both(results, "scenario_equivalence")
    for name, r0 in first.items():
        r1 = second[name]
        for label, exact, rel in r0["matrix"]:  # whole-matrix NS on the owner, row-ordered reductions
            assert exact, f"{name} {label}: not bit-identical (rel {rel:.2e})"
        for label, exact, rel in r0["vector"]:  # the AdamW track: elementwise on the local shards
            assert exact, f"{name} {label}: not bit-identical (rel {rel:.2e})"
        assert r0["state_dtensors"] and r1["state_dtensors"], name
        # every matrix orthogonalized exactly once, by its owner
        assert r0["ns_calls"] + r1["ns_calls"] == r0["ns_calls_plain"] == r1["ns_calls_plain"], name
        assert r0["ns_calls"] > 0 and r1["ns_calls"] > 0, name


def test_state_is_sharded(results):
    first, second = _both(results, "scenario_state_memory")
    for r in (first, second):
        assert 0.35 < r["sharded"] / r["plain"] < 0.65, r
    assert first["sharded"] + second["sharded"] == first["plain"]


def test_sam_under_fsdp2(results):
    first, second = _both(results, "scenario_sam")
    for r in (first, second):
        # the SAM reductions (‖N‖, φ, shear coefficients, injection norms) sum per-row results in row
        # order, gathered from the shards: bit-identical to the unsharded run
        assert r["neo_rel"] == 0.0 and r["neo_syncs"][0] == r["neo_syncs"][1]
        # compile=True: each process compiles its kernels for the sizes it sees first (here its shards), and
        # their row sums round differently from the eager ones and from another process's: sharded =
        # unsharded to float32 rounding, not bit for bit (seen: rank 0 identical, rank 1 1.9e-5 after 4 steps)
        assert r["neo_compiled_rel"] < 1e-4 and r["compiled_vs_eager_rel"] < 1e-4, r
        assert r["neo_mixed_rel"] < 1e-4, r  # fused and chained tensors in one perturbation, chosen alike
        for accumulate in (1, 2):
            assert r[f"adv_rel_{accumulate}"] < 1e-4, r
            assert r[f"restored_{accumulate}"]
        assert r["second_pass_differs"]


def test_nonfinite_shard_skips_on_every_rank(results):
    for r in _both(results, "scenario_nonfinite"):
        assert r["unchanged"] and r["skipped"] == 1.0


def test_distributed_checkpoint_resumes_exactly(results):
    for r in _both(results, "scenario_checkpoint"):
        assert r["identical"] and r["sam"]


def test_unsupported_layouts_are_refused(results):
    for r in _both(results, "scenario_layouts"):
        assert "2-D device mesh" in r["hsdp_2d_mesh"] and "Shard(0)" in r["hsdp_2d_mesh"]
        assert "Shard(dim=1)" in r["shard_dim1"]
        assert "Replicate" in r["replicate"]
        assert "mixes DTensor" in r["mixed"]
        assert "need the model" in r["sam_without_model"]
