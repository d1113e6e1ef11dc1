"""Scale benchmark: the optimizer step at the Qwen3-0.6B layer shapes, against peers, in one process.

Model: Qwen3-0.6B's shapes (hidden 1024, MLP 3072, 16×128 query heads, 8 KV heads, vocab 151,936,
tied embedding) with ``--layers`` layers (default 2: 187 M parameters, 31 M on the matrix track).

* **optimizer step** (gradients preset, ``step()`` timed alone): torch AdamW (foreach, fused),
  torch.optim.Muon + AdamW with Newton–Schulz in bf16 (as shipped) and in fp32, pytorch-optimizer's
  Muon and AdaMuon likewise (when ``pytorch_optimizer`` is installed; rows skipped otherwise), and
  every family member (``ns_dtype`` from ``--ns_dtype``), plus ``muon`` with the standard iteration
  only (the Gram iteration's gain). bf16 rows are not timed where bf16 matmul is emulated (a CPU
  without AVX512-BF16/AMX): the bf16/fp32 ratio of one 1024×1024 NS is recorded instead.
  Rounds are interleaved (A, B, C, A, …, the start rotating) after a warm-up; medians and paired
  ratios are reported. All contenders step the *same* parameters (one model), and after its first
  step each contender's AdamW-track moments are replaced by one shared set: ~1.2 GB per contender
  at these shapes would not fit otherwise. The arithmetic per step is unchanged (the values are
  meaningless, and not read).
* **limit**: standard-NS FLOPs of the matrix track / step time, ÷ the matmul throughput measured in
  the same process (1024×1024 @ 1024×3072 in the NS dtype). Above 100% is possible with the Gram
  iteration, which needs fewer FLOPs.
* **AdamW track**: our AdamW track alone (its params only) vs ``torch._fused_adamw_`` (torch AdamW
  ``fused=True``) and foreach on the same tensors; ours twice: computing its finiteness gate, and
  taking it from a gradient norm given as ``transformers.Trainer`` gives it (untimed: the Trainer
  takes that norm before every step to clip and log it); and the gate alone (``F.all_finite``: one
  read of the gradients), the least any gated step adds to the fused kernel.
* **host syncs**: calls of ``Tensor.item/__bool__/__float__/__int__/__index__/tolist/cpu/numpy``
  during one steady-state ``step()`` per contender (the last timed round), by patching; on CUDA
  also the warnings of ``torch.cuda.set_sync_debug_mode``.
* **training step** (batch × context random tokens, forward + backward + ``step(closure)``):
  torch AdamW, ada_rmsuon, ars2_neo k=5 (lazy steps) and k=1.

Timers synchronize CUDA before reading the clock, so the same code is right on a GPU.

    python -m benchmarks.scale --setting quick            # → benchmarks/results/scale.json
    python -m benchmarks.scale --device cuda --ns_dtype float32 --json benchmarks/results/scale_cuda_fp32.json
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import math
import statistics
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from . import common

NAME = "scale"
QWEN3_06B = {"hidden_size": 1024, "intermediate_size": 3072, "num_attention_heads": 16, "num_key_value_heads": 8,
             "head_dim": 128, "vocab_size": 151936}
TINY = {"hidden_size": 64, "intermediate_size": 192, "num_attention_heads": 4, "num_key_value_heads": 2,
        "head_dim": 16, "vocab_size": 512}


@dataclass(frozen=True)
class ScaleSetting:
    layers: int
    opt_rounds: int
    opt_warmup: int
    train_rounds: int  # timed training steps per contender (≥ 4: ars2_neo k=5 needs lazy steps)
    train_warmup: int
    batch: int
    context: int
    matmul_reps: int
    tiny: bool = False  # TINY shapes (tests)
    only: tuple[str, ...] = ()  # optimizer-step contenders to run (labels; empty: all)


SETTINGS = {
    "quick": ScaleSetting(layers=2, opt_rounds=3, opt_warmup=1, train_rounds=4, train_warmup=1, batch=2,
                          context=128, matmul_reps=5),
    "full": ScaleSetting(layers=2, opt_rounds=10, opt_warmup=2, train_rounds=9, train_warmup=1, batch=2,
                         context=128, matmul_reps=20),
    # a GPU steps in milliseconds: more rounds, and a training batch that is not launch-bound
    "gpu": ScaleSetting(layers=2, opt_rounds=10, opt_warmup=2, train_rounds=10, train_warmup=2, batch=8,
                        context=512, matmul_reps=20),
    "tiny": ScaleSetting(layers=1, opt_rounds=2, opt_warmup=1, train_rounds=4, train_warmup=1, batch=1,
                         context=8, matmul_reps=2, tiny=True),
}

MEMBERS = [("muon", {}), ("pure_ns_muon", {}), ("adamuon", {}), ("rmsuon", {}), ("ada_rmsuon", {}),
           ("f_ada_rmsuon", {}), ("ars", {"k": 1}), ("ars2_neo", {"k": 5})]


# --------------------------------------------------------------------------------------------------
# timing and host-sync counting
# --------------------------------------------------------------------------------------------------


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device) -> float:
    """Wall seconds of ``fn()``, the device synchronized before and after."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


SYNC_METHODS = ("item", "__bool__", "__float__", "__int__", "__index__", "tolist", "cpu", "numpy")
#: torch functions that turn Python data into a tensor: a blocking host→device copy on an accelerator
UPLOAD_FUNCTIONS = ("tensor", "as_tensor")


class HostSyncCounter:
    """Counts calls that read a tensor's value on the host (each a device synchronisation on an
    accelerator), by patching ``torch.Tensor`` methods while active::

        with HostSyncCounter() as c:
            opt.step()
        c.total, c.by_method, c.on_device   # on_device: calls on non-CPU tensors
        c.uploads                           # torch.tensor/as_tensor of Python data, counted apart
        c.calls                             # every counted call, in order

    Reads made inside C++ kernels are not seen (they are not host reads). On CUDA, ``cuda_sync_debug``
    also records torch's sync debug mode warnings (every synchronizing CUDA call).
    """

    def __init__(self, cuda_sync_debug: bool = False) -> None:
        self.by_method: Counter[str] = Counter()
        self.uploads: Counter[str] = Counter()
        self.calls: list[str] = []
        self.on_device = 0
        self.cuda_warnings = 0
        self._cuda = cuda_sync_debug and torch.cuda.is_available()
        self._saved: dict[str, Any] = {}
        self._depth = 0
        self._catch: Any = None

    @property
    def total(self) -> int:
        return sum(self.by_method.values())

    def _wrap(self, name: str, original: Callable[..., Any]) -> Callable[..., Any]:
        counter = self

        @functools.wraps(original)
        def wrapper(t: Tensor, *args: Any, **kwargs: Any) -> Any:
            if counter._depth == 0:  # count the outermost call only (e.g. __int__ → item)
                counter.by_method[name] += 1
                counter.calls.append(name)
                if t.device.type != "cpu":
                    counter.on_device += 1
            counter._depth += 1
            try:
                return original(t, *args, **kwargs)
            finally:
                counter._depth -= 1

        return wrapper

    def _wrap_upload(self, name: str, original: Callable[..., Any]) -> Callable[..., Any]:
        counter = self

        @functools.wraps(original)
        def wrapper(data: Any, *args: Any, **kwargs: Any) -> Any:
            if counter._depth == 0 and not isinstance(data, Tensor):
                counter.uploads[name] += 1
                counter.calls.append(name)
            return original(data, *args, **kwargs)

        return wrapper

    def __enter__(self) -> HostSyncCounter:
        for name in SYNC_METHODS:
            self._saved[name] = torch.Tensor.__dict__.get(name)  # None: inherited from TensorBase
            setattr(torch.Tensor, name, self._wrap(name, getattr(torch.Tensor, name)))
        self._saved_uploads = {name: getattr(torch, name) for name in UPLOAD_FUNCTIONS}
        for name, original in self._saved_uploads.items():
            setattr(torch, name, self._wrap_upload(name, original))
        if self._cuda:
            self._catch = warnings.catch_warnings(record=True)
            self._records = self._catch.__enter__()
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
        return self

    def __exit__(self, *exc: Any) -> None:
        for name, original in self._saved.items():
            if original is None:
                delattr(torch.Tensor, name)
            else:
                setattr(torch.Tensor, name, original)
        self._saved.clear()
        for name, original in self._saved_uploads.items():
            setattr(torch, name, original)
        if self._cuda:
            torch.cuda.set_sync_debug_mode(0)
            # CUDA's "called a synchronizing CUDA operation" — not the mode's one-time notice that it is a
            # prototype ("Synchronization debug mode is a prototype feature…"), which runs before this fix counted
            self.cuda_warnings = sum("called a synchronizing" in str(w.message) for w in self._records)
            self._catch.__exit__(*exc)

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"total": self.total, "on_device": self.on_device,
                               "by_method": dict(sorted(self.by_method.items()))}
        if self._cuda:
            out["cuda_sync_warnings"] = self.cuda_warnings
        return out


def matmul_gflops(device: torch.device, dtype: torch.dtype, reps: int, tiny: bool) -> dict[str, Any]:
    """Throughput of one ``(m×k) @ (k×n)`` matmul of the NS shapes (best of ``reps``)."""
    m, k, n = (64, 64, 192) if tiny else (1024, 1024, 3072)
    a = torch.randn(m, k, device=device).to(dtype)
    b = torch.randn(k, n, device=device).to(dtype)
    a @ b
    best = min(timed(lambda: a @ b, device) for _ in range(reps))
    return {"shape": [m, k, n], "dtype": str(dtype).replace("torch.", ""), "seconds": best,
            "gflops": 2 * m * k * n / best / 1e9}


# --------------------------------------------------------------------------------------------------
# model and contenders
# --------------------------------------------------------------------------------------------------


def build_model(layers: int, tiny: bool, device: torch.device, seed: int = 0) -> nn.Module:
    from transformers import Qwen3Config, Qwen3ForCausalLM

    shapes = TINY if tiny else QWEN3_06B
    config = Qwen3Config(**shapes, num_hidden_layers=layers, tie_word_embeddings=True, use_cache=False,
                         max_position_embeddings=512)
    torch.manual_seed(seed)
    return Qwen3ForCausalLM(config).to(device)


def split_tracks(model: nn.Module) -> tuple[list[Tensor], list[Tensor]]:
    """(matrix-track, AdamW-track) parameters with the family's model-aware routing."""
    import hf_rmsuon

    report = hf_rmsuon.route_model(model)
    params = dict(model.named_parameters())
    return ([params[e.name] for e in report.entries if e.track == "matrix"],
            [params[e.name] for e in report.entries if e.track != "matrix"])


def bf16_is_native(device: torch.device) -> bool:
    from hf_rmsuon import functional as F

    return device.type != "cpu" or F._cpu_has_native_bf16()


def _torch_ns_fp32(grad: Tensor, ns_coefficients: tuple[float, float, float], ns_steps: int, eps: float) -> Tensor:
    """torch.optim.Muon's Newton–Schulz with the iteration in float32 instead of bfloat16."""
    a, b, c = ns_coefficients
    x = grad.float()
    if grad.size(0) > grad.size(1):
        x = x.T
    x = x / x.norm().clamp(min=eps)
    for _ in range(ns_steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.T if grad.size(0) > grad.size(1) else x


@contextlib.contextmanager
def ns_fp32_patch(kind: str) -> Iterator[None]:
    """Run a peer's Newton–Schulz in float32 (both ship it in bfloat16)."""
    if kind == "torch":
        import torch.optim._muon as mod

        saved = {"_zeropower_via_newtonschulz": mod._zeropower_via_newtonschulz}
        mod._zeropower_via_newtonschulz = _torch_ns_fp32
        mods = [mod]
    else:
        import pytorch_optimizer.optimizer.muon.adamuon as ada
        import pytorch_optimizer.optimizer.muon.base as base

        mods = [base, ada]
        saved = {"zero_power_via_newton_schulz_5": base.zero_power_via_newton_schulz_5}
        for mod in mods:
            mod.zero_power_via_newton_schulz_5 = functools.partial(saved["zero_power_via_newton_schulz_5"],
                                                                   dtype=torch.float32)
    try:
        yield
    finally:
        for mod in mods:
            for name, fn in saved.items():
                if hasattr(mod, name):
                    setattr(mod, name, fn)


@contextlib.contextmanager
def standard_ns_only() -> Iterator[None]:
    """The family's Newton–Schulz without the Gram iteration (the old kernel)."""
    from hf_rmsuon import functional as F

    saved = F.ns_method
    F.ns_method = lambda *args, **kwargs: "standard"
    try:
        yield
    finally:
        F.ns_method = saved


@dataclass(frozen=True)
class Contender:
    label: str
    kind: str  # torch_adamw, torch_adamw_fused, torch_muon, ptopt_muon, ptopt_adamuon, member
    optim: str = ""  # registry name for members
    hp: tuple[tuple[str, Any], ...] = ()
    ns: str = "bf16"  # peers: bf16 (as shipped) or fp32; members: --ns_dtype
    standard_ns: bool = False
    params: str = "all"  # all, or adamw (the AdamW-track params only)
    norm_hint: bool = False  # members: the step is given ‖g‖ as a training loop has it (accept_gradient_norm)


def optimizer_contenders(ns_dtype: str) -> list[Contender]:
    out = [Contender("torch AdamW (foreach)", "torch_adamw"), Contender("torch AdamW (fused)", "torch_adamw_fused")]
    for ns in ("bf16", "fp32"):
        out.append(Contender(f"torch Muon + AdamW (NS {ns}{', as shipped' if ns == 'bf16' else ''})", "torch_muon",
                             ns=ns))
    for kind, name in (("ptopt_muon", "Muon"), ("ptopt_adamuon", "AdaMuon")):
        for ns in ("bf16", "fp32"):
            out.append(Contender(f"pytorch-optimizer {name} (NS {ns}{', as shipped' if ns == 'bf16' else ''})",
                                 kind, ns=ns))
    tag = "" if ns_dtype == "auto" else f", NS {ns_dtype}"
    for name, hp in MEMBERS:
        extra = ", ".join(f"{k}={v}" for k, v in hp.items())
        label = name + (f" ({extra}{tag})" if extra else f" ({tag[2:]})" if tag else "")
        out.append(Contender(label, "member", name, tuple(hp.items()), ns=ns_dtype))
    out.append(Contender(f"muon (standard NS only{tag})", "member", "muon", ns=ns_dtype, standard_ns=True))
    return out


class Stepper:
    """One contender's optimizer(s) on the shared model, and how one step is taken."""

    def __init__(self, c: Contender, model: nn.Module, lr: float = 1e-3):
        import hf_rmsuon

        self.c = c
        self.model = model
        matrix, rest = split_tracks(model)
        self.params = rest if c.params == "adamw" else [p for p in model.parameters() if p.requires_grad]
        self.optimizers: list[torch.optim.Optimizer] = []
        if c.kind in ("torch_adamw", "torch_adamw_fused"):
            fused = c.kind.endswith("fused")
            self.optimizers.append(torch.optim.AdamW(self.params, lr=lr, weight_decay=0.01,
                                                     foreach=not fused, fused=fused or None))
        elif c.kind == "torch_muon":
            self.optimizers.append(torch.optim.Muon(matrix, lr=lr, weight_decay=0.1))
            self.optimizers.append(torch.optim.AdamW(rest, lr=lr, weight_decay=0.01, foreach=True))
        elif c.kind in ("ptopt_muon", "ptopt_adamuon"):
            import pytorch_optimizer

            cls = pytorch_optimizer.Muon if c.kind == "ptopt_muon" else pytorch_optimizer.AdaMuon
            self.optimizers.append(cls([{"params": matrix, "use_muon": True},
                                        {"params": rest, "use_muon": False}], lr=lr, adamw_lr=lr))
        elif c.params == "adamw":
            self.optimizers.append(hf_rmsuon.AdaRMSuon([{"params": rest, "track": "adamw"}], lr=lr))
        else:
            hp = dict(c.hp)
            if c.ns != "auto":
                hp["ns_dtype"] = c.ns
            self.optimizers.append(hf_rmsuon.create_optimizer(c.optim, model, lr=lr, **hp))
        self.sam = getattr(self.optimizers[0], "sharpness_aware", False)
        self.shared = False

    @property
    def opt(self) -> torch.optim.Optimizer:
        return self.optimizers[0]

    def context(self) -> contextlib.AbstractContextManager:
        if self.c.kind in ("torch_muon", "ptopt_muon", "ptopt_adamuon") and self.c.ns == "fp32":
            return ns_fp32_patch("torch" if self.c.kind == "torch_muon" else "ptopt")
        if self.c.standard_ns:
            return standard_ns_only()
        return contextlib.nullcontext()

    def prepare(self, grads: dict[int, Tensor], adv_grads: dict[int, Tensor]) -> tuple[str, float]:
        """Point the gradients at the preset ones (SAM members: copies, since their pass writes
        ``p.grad``); a SAM sync step gets its recorded second pass here. Returns the step kind and
        the seconds of the SAM bookkeeping (perturb + restore)."""
        for p in self.model.parameters():
            p.grad = None
        for p in self.params:
            p.grad = grads[id(p)].clone() if self.sam else grads[id(p)]
        if self.c.norm_hint:  # the Trainer takes ‖g‖ before every step (clip, log): not ours to time
            self.opt.accept_gradient_norm(torch.nn.utils.get_total_norm([p.grad for p in self.params]),
                                          self.params)
        if not self.sam:
            return "update", 0.0
        opt = self.opt
        if not opt.sam_pass_due():
            return "lazy", 0.0
        device = self.params[0].device
        # the bookkeeping is begin + end; the copy of the preset adversarial gradient between them
        # stands in for the second backward and is not counted
        begin = timed(opt.begin_sam_pass, device)
        for p in self.params:
            p.grad.copy_(adv_grads[id(p)])
        return "sync", begin + timed(opt.end_sam_pass, device)

    def step(self) -> None:
        with self.context():
            for opt in self.optimizers:
                opt.step()

    def share_state(self, pool: dict[int, dict[str, Tensor]]) -> None:
        """After the first step: AdamW-track moments of the large tensors come from one shared pool."""
        if self.shared:
            return
        for opt in self.optimizers:
            for p, st in opt.state.items():
                if p.numel() < 1_000_000:
                    continue
                for key in ("exp_avg", "exp_avg_sq"):
                    value = st.get(key)
                    if not isinstance(value, Tensor) or value.shape != p.shape:
                        continue
                    mine = pool.setdefault(id(p), {})
                    if key not in mine and value.dtype == torch.float32:
                        mine[key] = value
                    elif key in mine and mine[key].dtype == value.dtype:
                        st[key] = mine[key]
        self.shared = True


def _stats(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    qs = statistics.quantiles(values, n=4) if len(values) >= 2 else [values[0]] * 3
    return {"median_ms": 1e3 * statistics.median(values), "q1_ms": 1e3 * qs[0], "q3_ms": 1e3 * qs[2],
            "min_ms": 1e3 * min(values), "n": len(values)}


def interleaved(names: list[str], rounds: int, warmup: int, body: Callable[[str, int], dict[str, Any]]
                ) -> dict[str, list[dict[str, Any]]]:
    """``body(name, round)`` for every name, ``warmup + rounds`` rounds, round-robin with the start
    rotating; the timed samples (after warm-up) per name."""
    samples: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
    gc.collect()
    gc.disable()
    try:
        for r in range(warmup + rounds):
            shift = r % len(names)
            for name in names[shift:] + names[:shift]:
                sample = body(name, r - warmup)
                if r >= warmup:
                    samples[name].append({**sample, "round": r - warmup})
            common.log(f"scale: round {r + 1}/{warmup + rounds} done")
    finally:
        gc.enable()
    return samples


def paired(a: list[dict[str, Any]], b: list[dict[str, Any]], kind: str | None = None) -> float | None:
    """Median over rounds of a's time / b's time in the same round."""
    tb = {s["round"]: s["wall"] for s in b}
    ratios = [s["wall"] / tb[s["round"]] for s in a
              if s["round"] in tb and tb[s["round"]] > 0 and (kind is None or s["kind"] == kind)]
    return statistics.median(ratios) if ratios else None


# --------------------------------------------------------------------------------------------------
# the measurements
# --------------------------------------------------------------------------------------------------


def preset_gradients(params: list[Tensor], seed: int, adversarial: bool = True
                     ) -> tuple[dict[int, Tensor], dict[int, Tensor]]:
    """Fixed gradients and "adversarial" ones near them (without ``adversarial``: the same tensors)."""
    g = torch.Generator(device=params[0].device).manual_seed(seed)
    grads = {id(p): torch.randn(p.shape, generator=g, device=p.device, dtype=p.dtype) * 1e-2 for p in params}
    if not adversarial:
        return grads, grads
    adv = {k: v + 0.5e-2 * torch.randn(v.shape, generator=g, device=v.device, dtype=v.dtype) for k, v in grads.items()}
    return grads, adv


def bf16_ns_slowdown(device: torch.device) -> dict[str, Any]:
    """bf16 vs fp32 time of torch Muon's own NS on one 1024×1024 matrix (where bf16 rows are not timed)."""
    import torch.optim._muon as mod

    x = torch.randn(1024, 1024, device=device)
    coeffs = (3.4445, -4.7750, 2.0315)
    t32 = min(timed(lambda: _torch_ns_fp32(x, coeffs, 5, 1e-7), device) for _ in range(2))
    t16 = timed(lambda: mod._zeropower_via_newtonschulz(x, coeffs, 5, 1e-7), device)
    return {"shape": [1024, 1024], "fp32_s": t32, "bf16_s": t16, "bf16_over_fp32": t16 / t32}


NS_SHAPES = [(1024, 1024), (2048, 1024), (1024, 2048), (3072, 1024), (1024, 3072), (512, 1024)]


def _ns_standard_fresh_outputs(x: Tensor, steps: int, coefficients: tuple[float, float, float],
                               dtype: torch.dtype) -> Tensor:
    """The standard iteration as it was before its products wrote into reused buffers (a fresh output
    per product) and before tall matrices were multiplied from the right (here: on a transposed copy;
    same polynomial), kept as the comparison for ``F.newton_schulz_standard``."""
    a, b, c = coefficients
    y = x.to(dtype)
    transposed = y.size(-2) > y.size(-1)
    y = (y.mT if transposed else y).unsqueeze(0)
    y = y / (torch.linalg.matrix_norm(y, keepdim=True) + 1e-7)
    for _ in range(steps):
        gram = y @ y.mT
        poly = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)
        y = torch.baddbmm(y, poly, y, beta=a)
    y = y[0]
    return (y.mT if transposed else y).to(x.dtype)


def bench_ns_shapes(cfg: ScaleSetting, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """Per shape: the standard iteration, the Gram iteration, the standard one with fresh outputs and
    the ``compile=True`` path (``torch.compile`` of ``F.newton_schulz``; its compile time recorded
    apart), interleaved, and which one ``F.newton_schulz`` picks — the measurement behind ``F.ns_method``
    and the ``compile`` default."""
    from hf_rmsuon import functional as F

    shapes = [(r // 16, c // 16) for r, c in NS_SHAPES] if cfg.tiny else NS_SHAPES
    kernels = {"standard": F.newton_schulz_standard, "gram": F.newton_schulz_gram,
               "standard, fresh outputs": _ns_standard_fresh_outputs}
    if not cfg.tiny:  # (compiling takes tens of seconds per shape: not in the test-sized run)
        kernels["compiled"] = F.compiled_newton_schulz()
    out = {}
    g = torch.Generator().manual_seed(4)
    for shape in shapes:
        x = torch.randn(shape, generator=g).to(device)
        start = time.perf_counter()
        results = {n: kernels[n](x, 5, F.NS_COEFFICIENTS, dtype) for n in kernels if n == "compiled"}  # compiles
        compile_s = time.perf_counter() - start
        results.update({n: k(x, 5, F.NS_COEFFICIENTS, dtype) for n, k in kernels.items() if n != "compiled"})
        samples = interleaved(list(kernels), max(3, cfg.opt_rounds + 2), 1, lambda n, r, x=x: {
            "wall": timed(lambda: kernels[n](x, 5, F.NS_COEFFICIENTS, dtype), device)})
        std = statistics.median(s["wall"] for s in samples["standard"])
        ref = results["standard"].double()
        out["×".join(map(str, shape))] = {
            "chosen": F.ns_method(*shape, 5, dtype, device.type),
            **({"compile_s": compile_s} if "compiled" in kernels else {}),
            "flop_ratio_gram": F.ns_flops(*shape, 5, "gram") / F.ns_flops(*shape, 5, "standard"),
            **{n: {"median_ms": 1e3 * statistics.median(s["wall"] for s in ss),
                   "vs_standard": statistics.median(s["wall"] for s in ss) / std,
                   "paired_vs_standard": paired(ss, samples["standard"]),
                   "rel_diff_vs_standard": float((results[n].double() - ref).norm() / ref.norm())}
               for n, ss in samples.items()}}
    return {"dtype": str(dtype).replace("torch.", ""), "shapes": out}


LIMIT = "matmul (limit)"


def bench_optimizer_step(cfg: ScaleSetting, device: torch.device, ns_dtype: str) -> dict[str, Any]:
    from hf_rmsuon import functional as F

    model = build_model(cfg.layers, cfg.tiny, device)
    params = [p for p in model.parameters() if p.requires_grad]
    matrix, rest = split_tracks(model)
    grads, adv = preset_gradients(params, 1)
    skipped: dict[str, str] = {}
    native_bf16 = bf16_is_native(device)
    try:
        import pytorch_optimizer  # noqa: F401

        have_ptopt = True
    except ImportError:
        have_ptopt = False
    steppers: dict[str, Stepper] = {}
    for c in optimizer_contenders(ns_dtype):
        if cfg.only and c.label not in cfg.only:
            continue
        if c.kind.startswith("ptopt") and not have_ptopt:
            skipped[c.label] = "pytorch_optimizer is not installed (pip install pytorch-optimizer)"
            continue
        if c.kind in ("torch_muon", "ptopt_muon", "ptopt_adamuon") and c.ns == "bf16" and not native_bf16:
            skipped[c.label] = "bf16 matmul is emulated on this CPU (see bf16_ns_slowdown)"
            continue
        steppers[c.label] = Stepper(c, model)
    pool: dict[int, dict[str, Tensor]] = {}
    counts: dict[str, list[dict[str, Any]]] = {n: [] for n in steppers}
    last_round = cfg.opt_rounds - 1
    # the limit, measured inside the rounds (same machine load as the steps): 1024×1024 @ 1024×3072 matmuls
    compute = (torch.float32 if ns_dtype == "float32" or (ns_dtype == "auto" and not bf16_is_native(device))
               else torch.bfloat16)
    mm = (64, 64, 192) if cfg.tiny else (1024, 1024, 3072)
    a = torch.randn(mm[0], mm[1], device=device).to(compute)
    b = torch.randn(mm[1], mm[2], device=device).to(compute)
    reps = 2 if cfg.tiny else 10

    def matmuls() -> None:
        for _ in range(reps):
            a @ b

    def body(name: str, r: int) -> dict[str, Any]:
        if name == LIMIT:
            wall = timed(matmuls, device)
            return {"kind": "matmul", "wall": wall, "gflops": reps * 2 * math.prod(mm) / wall / 1e9}
        st = steppers[name]
        kind, bookkeeping = st.prepare(grads, adv)
        if r == last_round:
            with HostSyncCounter(cuda_sync_debug=device.type == "cuda") as counter:
                wall = timed(st.step, device)
            counts[name].append({"kind": kind, **counter.as_dict()})
        else:
            wall = timed(st.step, device)
        st.share_state(pool)  # the replaced moments are freed here (no reference cycles)
        return {"kind": kind, "wall": wall, "sam_pass_s": bookkeeping}

    samples = interleaved([*steppers, LIMIT], cfg.opt_rounds, cfg.opt_warmup, body)
    limit = [s["gflops"] for s in samples.pop(LIMIT)]
    ns_std = sum(F.ns_flops(*F.matrix_shape(p.shape, "matrix"), 5, "standard") for p in matrix)
    ns_gram = sum(F.ns_flops(*F.matrix_shape(p.shape, "matrix"), 5,
                             F.ns_method(*F.matrix_shape(p.shape, "matrix"), 5, torch.float32, device.type))
                 for p in matrix)
    rows = {}
    for name, st in steppers.items():
        ss = samples[name]
        row: dict[str, Any] = {"kind": st.c.kind, "optim": st.c.optim, "hp": dict(st.c.hp), "ns": st.c.ns,
                               "wall": _stats([s["wall"] for s in ss]), "samples": ss, "host_syncs": counts[name]}
        for kind in sorted({s["kind"] for s in ss}):
            row[f"wall_{kind}"] = _stats([s["wall"] for s in ss if s["kind"] == kind])
        passes = [s["sam_pass_s"] for s in ss if s["kind"] == "sync"]
        if passes:
            row["sam_pass_bookkeeping"] = _stats(passes)
        rows[name] = row
    return {"rows": rows, "rounds": cfg.opt_rounds, "warmup": cfg.opt_warmup, "skipped": skipped,
            "n_params": sum(p.numel() for p in params),
            "matmul_in_rounds": {"shape": list(mm), "dtype": str(compute).replace("torch.", ""), "reps": reps,
                                 "gflops": limit, "median_gflops": statistics.median(limit)},
            "matrix_params": sum(p.numel() for p in matrix), "adamw_params": sum(p.numel() for p in rest),
            "ns_flops_standard": ns_std, "ns_flops_chosen_fp32": ns_gram,
            "matrix_shapes": sorted({str(tuple(p.shape)) for p in matrix})}


#: Qwen3-0.6B's own depth: the SAM bookkeeping is also measured there (the 2-layer model is 83% embedding)
DEPTH_LAYERS = 28
#: compile=False; compile=True as shipped (fused passes where ``F.fuses_sam_passes``, else the chain); and
#: the fused passes forced onto every tensor — measured only where that differs from compile=True
SAM_PATHS = ("in_place", "compiled", "fused")
#: not ours: the least any exact SAM does per sync step, timed beside ours on the same tensors
SAM_FLOOR = "plain_floor"


def bench_sam_bookkeeping(cfg: ScaleSetting, device: torch.device, ns_dtype: str) -> dict[str, Any]:
    """SAM's sync-step bookkeeping (``begin_sam_pass`` + ``end_sam_pass``: perturb, copy, restore) by the
    in-place chain and by the fused passes of ``compile=True``, against the sync step itself, at the
    benchmark's depth and at Qwen3-0.6B's 28 layers — the bookkeeping grows with every parameter, the step
    with the matrices, so the embedding's share sets the ratio."""
    depths = dict.fromkeys((cfg.layers, 1 if cfg.tiny else DEPTH_LAYERS))
    out = {}
    for layers in depths:
        out[str(layers)] = _sam_bookkeeping_at(layers, cfg, device, ns_dtype)
        gc.collect()
    return {"depths": out}


def _sam_bookkeeping_at(layers: int, cfg: ScaleSetting, device: torch.device, ns_dtype: str) -> dict[str, Any]:
    import hf_rmsuon
    from hf_rmsuon import functional as F

    model = build_model(layers, cfg.tiny, device)
    params = [p for p in model.parameters() if p.requires_grad]
    grads, _ = preset_gradients(params, 1, adversarial=False)  # memory: 28 layers hold 596 M values per copy
    for p in params:
        p.grad = grads[id(p)].clone()
    opt = hf_rmsuon.create_optimizer("ars", model, k=1, **({} if ns_dtype == "auto" else {"ns_dtype": ns_dtype}))

    routing = F.FUSED_SAM_MIN_NUMEL
    paths = (*(SAM_PATHS if routing.get(device.type) != 0 else SAM_PATHS[:2]), SAM_FLOOR)
    values = [p.detach() for p in params]

    def plain_sam_floor() -> float:
        """The least an exact SAM does per sync step: copy ``w``, ‖g‖ (one read), ``w += (ρ/‖g‖)·g`` and, after
        the second pass, restore ``w`` from the copy — four passes (eight streams) over every parameter; no
        preconditioned direction, no shear force. The copy goes into the optimizer's own weight buffers."""
        weights = [opt._buffer(p, "weights", v) for p, v in zip(params, values)]
        grad_list = [p.grad for p in params]

        def begin() -> None:
            torch._foreach_copy_(weights, values)
            norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grad_list)))
            torch._foreach_add_(values, grad_list, alpha=0.05 / float(norm))

        seconds = timed(begin, device)
        return seconds + timed(lambda: torch._foreach_copy_(values, weights), device)

    def bookkeeping(path: str) -> float:
        if path == SAM_FLOOR:
            return plain_sam_floor()
        # the same optimizer state every way: only the SAM path differs (compile=False keeps the NS eager)
        opt.reset_sam_pass()
        for p in params:
            p.grad.copy_(grads[id(p)])
        opt.defaults["compile"] = path != "in_place"
        if path == "fused":
            F.FUSED_SAM_MIN_NUMEL = {**routing, device.type: 0}
        try:
            assert opt.sam_pass_due()
            seconds = timed(opt.begin_sam_pass, device)
            for p in params:  # stands in for the second backward (not counted)
                p.grad.copy_(grads[id(p)])
            return seconds + timed(opt.end_sam_pass, device)
        finally:
            opt.defaults["compile"] = False
            F.FUSED_SAM_MIN_NUMEL = routing

    rounds, warmup = (cfg.opt_rounds, cfg.opt_warmup) if layers == cfg.layers else (3, 1)
    bookkeeping("in_place")  # a first step, untimed: the moments exist from here on (ε, √v in N)
    opt.step()
    samples = []
    gc.collect()
    gc.disable()
    try:
        for r in range(warmup + rounds):  # the first round also compiles the fused passes
            order = paths if r % 2 == 0 else paths[::-1]
            sample: dict[str, Any] = {path: bookkeeping(path) for path in order}
            sample["step"] = timed(opt.step, device)  # the sync step's update from the recorded pass
            if r >= warmup:
                samples.append({**sample, "round": r - warmup})
            common.log(f"scale: SAM bookkeeping at {layers} layer(s): round {r + 1}/{warmup + rounds} done")
    finally:
        gc.enable()
    row: dict[str, Any] = {"layers": layers, "n_params": sum(p.numel() for p in params),
                           "matrix_params": sum(p.numel() for p in split_tracks(model)[0]),
                           "samples": samples, "step": _stats([s["step"] for s in samples])}
    for path in paths:
        row[path] = _stats([s[path] for s in samples])
        row[f"{path}_vs_step"] = statistics.median(s[path] / s["step"] for s in samples)
        if path not in ("in_place", SAM_FLOOR):
            row[f"{path}_vs_in_place"] = statistics.median(s[path] / s["in_place"] for s in samples)
    return row


HINTED_TRACK = "hf_rmsuon AdamW track, gate from the loop's ‖g‖"
GATE_ALONE = "finiteness gate alone (F.all_finite)"


def bench_adamw_track(cfg: ScaleSetting, device: torch.device) -> dict[str, Any]:
    from hf_rmsuon import functional as F

    model = build_model(cfg.layers, cfg.tiny, device)
    _, rest = split_tracks(model)
    grads, adv = preset_gradients(rest, 2)
    contenders = [Contender("hf_rmsuon AdamW track", "member", params="adamw"),
                  Contender(HINTED_TRACK, "member", params="adamw", norm_hint=True),
                  Contender("torch AdamW (fused)", "torch_adamw_fused", params="adamw"),
                  Contender("torch AdamW (foreach)", "torch_adamw", params="adamw")]
    steppers = {c.label: Stepper(c, model) for c in contenders}
    gate_grads = [grads[id(p)] for p in rest]

    def body(name: str, r: int) -> dict[str, Any]:
        if name == GATE_ALONE:  # the one read of the gradients a gated step adds to the fused kernel
            return {"kind": "gate", "wall": timed(lambda: F.all_finite(gate_grads), device)}
        st = steppers[name]
        st.prepare(grads, adv)
        return {"kind": "update", "wall": timed(st.step, device)}

    samples = interleaved([*steppers, GATE_ALONE], max(3, 2 * cfg.opt_rounds), 1, body)
    rows = {n: {"wall": _stats([s["wall"] for s in ss]), "samples": ss} for n, ss in samples.items()}
    return {"rows": rows, "params": sum(p.numel() for p in rest), "shapes": sorted({str(tuple(p.shape)) for p in rest})}


def bench_training_step(cfg: ScaleSetting, device: torch.device, ns_dtype: str) -> dict[str, Any]:
    import hf_rmsuon

    model = build_model(cfg.layers, cfg.tiny, device)
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(3)
    batches = [torch.randint(0, vocab, (cfg.batch, cfg.context), generator=g).to(device) for _ in range(4)]
    hp = {} if ns_dtype == "auto" else {"ns_dtype": ns_dtype}
    opts: dict[str, torch.optim.Optimizer] = {
        "torch AdamW (foreach)": torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01, foreach=True),
        "ada_rmsuon": hf_rmsuon.create_optimizer("ada_rmsuon", model, lr=1e-4, **hp),
        "ars2_neo (k=5, Lazy)": hf_rmsuon.create_optimizer("ars2_neo", model, lr=1e-4, k=5, **hp),
        "ars2_neo (k=1)": hf_rmsuon.create_optimizer("ars2_neo", model, lr=1e-4, k=1, **hp),
    }
    holders = {n: Stepper.__new__(Stepper) for n in opts}
    for n, h in holders.items():
        h.shared, h.optimizers = False, [opts[n]]
    pool: dict[int, dict[str, Tensor]] = {}
    counter = Counter()

    def body(name: str, r: int) -> dict[str, Any]:
        opt = opts[name]
        batch = batches[counter[name] % len(batches)]
        counter[name] += 1
        before = opt.sam["syncs"] if hasattr(opt, "sam") else 0

        def closure() -> Tensor:
            opt.zero_grad(set_to_none=True)
            loss = model(input_ids=batch, labels=batch).loss
            loss.backward()
            return loss

        def one() -> None:
            opt.step(closure)
            model.zero_grad(set_to_none=True)

        wall = timed(one, device)
        holders[name].share_state(pool)
        kind = ("sync" if opt.sam["syncs"] > before else "lazy") if hasattr(opt, "sam") else "plain"
        return {"kind": kind, "wall": wall}

    samples = interleaved(list(opts), cfg.train_rounds, cfg.train_warmup, body)
    rows = {}
    for name, ss in samples.items():
        row = {"wall": _stats([s["wall"] for s in ss]), "samples": ss}
        for kind in sorted({s["kind"] for s in ss}):
            row[f"wall_{kind}"] = _stats([s["wall"] for s in ss if s["kind"] == kind])
        rows[name] = row
    return {"rows": rows, "batch": cfg.batch, "context": cfg.context, "tokens": "random",
            "rounds": cfg.train_rounds, "warmup": cfg.train_warmup}


# --------------------------------------------------------------------------------------------------
# summary, run, report section
# --------------------------------------------------------------------------------------------------


def _med(row: dict[str, Any], kind: str | None = None) -> float:
    return row[f"wall_{kind}" if kind else "wall"]["median_ms"]


def summarize(result: dict[str, Any]) -> dict[str, Any]:
    opt = result["optimizer_step"]
    rows = opt["rows"]
    # the throughput measured inside the rounds where recorded (same load as the steps), else the one before
    gflops = opt.get("matmul_in_rounds", {}).get("median_gflops") or result["matmul"]["gflops"]
    torch_fp32 = next((n for n in rows if n.startswith("torch Muon") and "fp32" in n), None)
    torch_bf16 = next((n for n in rows if n.startswith("torch Muon") and "bf16" in n), None)  # timed where native
    muon = next((n for n in rows if n.startswith("muon") and "standard" not in n), None)
    table = {}
    for name, row in rows.items():
        entry: dict[str, Any] = {"median_ms": _med(row)}
        if torch_fp32:
            entry["vs_torch_muon_fp32"] = _med(row) / _med(rows[torch_fp32])
            entry["paired_vs_torch_muon_fp32"] = paired(row["samples"], rows[torch_fp32]["samples"])
        if torch_bf16:
            entry["vs_torch_muon_bf16"] = _med(row) / _med(rows[torch_bf16])
            entry["paired_vs_torch_muon_bf16"] = paired(row["samples"], rows[torch_bf16]["samples"])
        if muon:
            entry["paired_vs_muon"] = paired(row["samples"], rows[muon]["samples"])
        if row["kind"] not in ("torch_adamw", "torch_adamw_fused"):
            kind = "lazy" if "wall_lazy" in row else None
            seconds = _med(row, kind) / 1e3
            entry["effective_gflops"] = opt["ns_flops_standard"] / seconds / 1e9
            entry["limit_fraction"] = entry["effective_gflops"] / gflops
        syncs = row.get("host_syncs") or []
        entry["host_syncs"] = {s["kind"]: s["total"] for s in syncs}
        if "sam_pass_bookkeeping" in row:
            entry["sam_bookkeeping_vs_step"] = row["sam_pass_bookkeeping"]["median_ms"] / _med(row, "sync")
        table[name] = entry
    adamw = result["adamw_track"]["rows"]
    track = {"ours_vs_fused": _med(adamw["hf_rmsuon AdamW track"]) / _med(adamw["torch AdamW (fused)"]),
             "paired_ours_vs_fused": paired(adamw["hf_rmsuon AdamW track"]["samples"],
                                            adamw["torch AdamW (fused)"]["samples"]),
             "foreach_vs_fused": _med(adamw["torch AdamW (foreach)"]) / _med(adamw["torch AdamW (fused)"])}
    if GATE_ALONE in adamw:
        track["gate_vs_fused"] = _med(adamw[GATE_ALONE]) / _med(adamw["torch AdamW (fused)"])
    if HINTED_TRACK in adamw:
        track["hinted_vs_fused"] = _med(adamw[HINTED_TRACK]) / _med(adamw["torch AdamW (fused)"])
        track["paired_hinted_vs_fused"] = paired(adamw[HINTED_TRACK]["samples"], adamw["torch AdamW (fused)"]["samples"])
    train = result["training_step"]["rows"]
    ada = train["ada_rmsuon"]
    k5, k1 = train["ars2_neo (k=5, Lazy)"], train["ars2_neo (k=1)"]
    training = {
        "ada_rmsuon_vs_adamw": _med(ada) / _med(train["torch AdamW (foreach)"]),
        "lazy_vs_ada_rmsuon": (_med(k5, "lazy") / _med(ada)) if "wall_lazy" in k5 else None,
        "paired_lazy_vs_ada_rmsuon": paired(k5["samples"], ada["samples"], "lazy"),
        "k1_vs_ada_rmsuon": _med(k1) / _med(ada),
        "paired_k1_vs_ada_rmsuon": paired(k1["samples"], ada["samples"]),
    }
    targets = issue14_targets(table, track, training, muon,
                              "fp32" if result.get("ns_compute_dtype", "float32") == "float32" else "bf16")
    out = {"optimizer_step": table, "adamw_track": track, "training_step": training, "targets": targets}
    if "sam_bookkeeping" in result:
        depths = result["sam_bookkeeping"]["depths"]
        out["sam_bookkeeping"] = {layers: {k: v for k, v in row.items() if k.endswith(("_vs_step", "_vs_in_place"))}
                                  for layers, row in depths.items()}
        for layers, row in depths.items():
            for path in SAM_PATHS[:2]:  # the shipped paths
                value = row[f"{path}_vs_step"]
                targets[f"sam_bookkeeping_{path}_{layers}_layers"] = {"value": value, "target": 0.05, "op": "<=",
                                                                       "met": value <= 0.05}
    return out


def issue14_targets(table: dict[str, Any], track: dict[str, Any], training: dict[str, Any], muon: str | None,
                    ns: str) -> dict[str, dict[str, Any]]:
    """Issue 14's "must show" ratios on this run (value, target, met). Peers are compared in the family
    run's Newton–Schulz dtype (``ns``: "fp32" or "bf16"), like for like."""
    out: dict[str, dict[str, Any]] = {}

    def add(name: str, value: float | None, target: float, op: str = "<=") -> None:
        if value is not None:
            out[name] = {"value": value, "target": target, "op": op,
                         "met": bool(value <= target if op == "<=" else value >= target)}

    peers = [e["median_ms"] for n, e in table.items() if n.startswith("pytorch-optimizer") and f"NS {ns}" in n]
    if muon and f"vs_torch_muon_{ns}" in table[muon]:
        add(f"muon_vs_torch_muon_{ns}", table[muon][f"vs_torch_muon_{ns}"], 0.95)
    if muon and peers:
        add("muon_vs_fastest_pytorch_optimizer_muon", table[muon]["median_ms"] / min(peers), 1.0)
    ada = next((n for n in table if n.startswith("ada_rmsuon")), None)
    if muon and ada:
        add("ada_rmsuon_vs_muon", table[ada]["median_ms"] / table[muon]["median_ms"], 1.05)
    add("adamw_track_vs_fused", track["ours_vs_fused"], 1.2)
    add("adamw_track_vs_fused_under_trainer", track.get("hinted_vs_fused"), 1.2)
    if muon:
        add("muon_limit_fraction", table[muon].get("limit_fraction"), 0.95, ">=")
    add("lazy_training_step_vs_ada_rmsuon", training["lazy_vs_ada_rmsuon"], 1.03)
    sam = [e["sam_bookkeeping_vs_step"] for e in table.values() if "sam_bookkeeping_vs_step" in e]
    if sam:
        add("sam_bookkeeping_vs_sync_step", max(sam), 0.05)
    syncs = [v for n, e in table.items() if e.get("host_syncs") and not n.startswith(("torch", "pytorch"))
             for v in e["host_syncs"].values()]
    if syncs:
        add("family_host_reads_per_step", float(max(syncs)), 0.0)
    return out


PARTS = ("ns_shapes", "optimizer_step", "adamw_track", "training_step")
#: measured only when named in --parts (the 28-layer model takes ~15 GB and minutes per step on a CPU)
EXTRA_PARTS = ("sam_bookkeeping",)


def _measure_parts(result: dict[str, Any], parts: tuple[str, ...], cfg: ScaleSetting, device: torch.device,
                   ns_dtype: str, compute: torch.dtype, json_path: Path) -> None:
    """Measure ``parts`` in the order asked into ``result``, writing ``json_path`` after each: a run
    stopped at a time limit (a lent GPU) keeps the parts it finished."""
    measures = {"ns_shapes": lambda: bench_ns_shapes(cfg, device, compute),
                "optimizer_step": lambda: bench_optimizer_step(cfg, device, ns_dtype),
                "adamw_track": lambda: bench_adamw_track(cfg, device),
                "training_step": lambda: bench_training_step(cfg, device, ns_dtype),
                "sam_bookkeeping": lambda: bench_sam_bookkeeping(cfg, device, ns_dtype)}
    for part in parts:
        result[part] = measures[part]()
        common.write_json(json_path, result)


def run_scale(cfg: ScaleSetting, device: torch.device, ns_dtype: str, json_path: Path,
              setting: str = "custom", parts: tuple[str, ...] = PARTS) -> dict[str, Any]:
    """Run ``parts`` (all by default) and write ``json_path``; with fewer parts, the parts run are
    merged into an existing result file (recorded under ``added_parts``)."""
    if device.type == "cpu":
        torch.set_num_threads(1)
    if set(parts) != set(PARTS) and json_path.is_file():
        result = common.read_json(json_path)
        added = {"parts": list(parts), "setting": setting, "config": asdict(cfg), "environment": common.environment()}
        _measure_parts(result, parts, cfg, device, ns_dtype, getattr(torch, result["ns_compute_dtype"]), json_path)
        result.setdefault("added_parts", []).append(added)
        result["summary"] = summarize(result)
        common.write_json(json_path, result)
        common.log(f"scale: {', '.join(parts)} added to {json_path}")
        return result
    start = time.perf_counter()
    compute = torch.float32 if ns_dtype == "float32" or (ns_dtype == "auto" and device.type == "cpu"
                                                         and not bf16_is_native(device)) else torch.bfloat16
    result: dict[str, Any] = {"benchmark": NAME, "setting": setting, "config": asdict(cfg), "device": str(device),
                              "ns_dtype": ns_dtype, "ns_compute_dtype": str(compute).replace("torch.", ""),
                              "shapes": TINY if cfg.tiny else QWEN3_06B, "environment": common.environment()}
    if device.type == "cuda":
        result["environment"]["gpu"] = torch.cuda.get_device_name(device)
    common.log(f"scale ({setting}): {cfg.layers} layer(s) on {device}, NS {ns_dtype} → {json_path}")
    result["matmul"] = matmul_gflops(device, compute, cfg.matmul_reps, cfg.tiny)
    common.log(f"scale: matmul {result['matmul']['gflops']:.1f} GFLOP/s ({result['matmul']['dtype']})")
    if not bf16_is_native(device) and not cfg.tiny:
        result["bf16_ns_slowdown"] = bf16_ns_slowdown(device)
    _measure_parts(result, parts, cfg, device, ns_dtype, compute, json_path)
    if all(part in result for part in PARTS):
        result["summary"] = summarize(result)
    result["seconds"] = time.perf_counter() - start
    result["environment_end"] = {"load_average": common.environment()["load_average"]}
    common.write_json(json_path, result)
    common.log(f"scale: done in {result['seconds']:.0f}s → {json_path}")
    return result


def run(setting: str, paths: common.Paths, **_: Any) -> dict[str, Any]:
    """The ``scale`` part of ``benchmarks.run`` (CPU, NS dtype auto; quick at 2 layers)."""
    cfg = SETTINGS[setting]
    return run_scale(cfg, torch.device("cpu"), "auto", paths.result(NAME), setting)


#: gpu.sh's "sam" stage writes the SAM bookkeeping on CUDA here (beside the scale runs, not merged into them)
SAM_CUDA_FILE = "sam_cuda.json"


def gpu_results(results: Path) -> list[dict[str, Any]]:
    """The CUDA runs of ``benchmarks/gpu.sh`` recorded beside ``scale.json`` (``scale_cuda_*.json``)."""
    return [common.read_json(p) for p in sorted(Path(results).glob("scale_cuda_*.json"))]


def _limit_gflops(data: dict[str, Any]) -> float:
    return data["optimizer_step"].get("matmul_in_rounds", {}).get("median_gflops") or data["matmul"]["gflops"]


def _f(x: float | None, digits: int = 2) -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def _reuse_gain(e: dict[str, Any]) -> float | None:
    """Reused product buffers ÷ fresh outputs (runs before the package adopted the reused buffers timed
    them as a variant of the standard iteration; later runs time the fresh-output one as the variant)."""
    if "standard, reused buffers" in e:
        return e["standard, reused buffers"]["paired_vs_standard"]
    if "standard, fresh outputs" in e:
        return 1.0 / e["standard, fresh outputs"]["paired_vs_standard"]
    return None


def ns_shapes_table(ns: dict[str, Any], title: str = "Newton–Schulz per shape") -> list[str]:
    """The per-shape Newton–Schulz table of the ``ns_shapes`` part, under ``title``."""
    out = [f"{title} ({ns['dtype']}, 5 steps, one matrix; time ÷ the standard iteration, paired; FLOP ratio of the Gram "
           "iteration; the standard iteration's products into reused buffers ÷ into fresh outputs (runs from git "
           "c36569c on: for tall shapes also multiplied from the right ÷ on a transposed copy); what "
           "`F.newton_schulz` picks):", "",
           "| shape | standard ms | Gram | Gram FLOPs | reused ÷ fresh buffers | compiled (`compile=True`; compile s) "
           "| picked | Gram vs standard (rel.) |",
           "|---|---|---|---|---|---|---|---|"]
    for shape, e in ns["shapes"].items():
        compiled = (f"{_f(e['compiled']['paired_vs_standard'])} ({e['compile_s']:.0f} s)" if "compiled" in e
                    else "not measured")
        out.append(f"| {shape} | {_f(e['standard']['median_ms'], 1 if e['standard']['median_ms'] >= 10 else 3)} | "
                   f"{_f(e['gram']['paired_vs_standard'])} | {_f(e['flop_ratio_gram'])} | {_f(_reuse_gain(e))} | "
                   f"{compiled} | {e['chosen']} | {e['gram']['rel_diff_vs_standard']:.1e} |")
    return out


def sam_floor_sentence(data: dict[str, Any]) -> str:
    """What the plain-SAM floor column says about the ≤ 5% target, where it was measured."""
    depths = data.get("sam_bookkeeping", {}).get("depths", {})
    measured = {layers: row for layers, row in depths.items() if SAM_FLOOR in row}
    if not measured:
        return ""
    parts = [f"{100 * row[f'{SAM_FLOOR}_vs_step']:.1f}% of the sync step at {layers} layer(s) (`compile=True` "
             f"{row['compiled']['median_ms'] / row[SAM_FLOOR]['median_ms']:.1f}× it)" for layers, row in measured.items()]
    return ("Even plain SAM's least — copy, one norm, one move, restore, with no preconditioned direction — "
            f"measured {'; '.join(parts)}: the floor for exact SAM on this machine (a kernel fusing the copy into the "
            "move would save one of its eight streams)"
            + "".join(f", {'above' if row[f'{SAM_FLOOR}_vs_step'] > 0.05 else 'within'} the 5% target at {layers} "
                      "layer(s)" for layers, row in measured.items()) + ".")


def sam_bookkeeping_table(data: dict[str, Any]) -> list[str]:
    """The ``sam_bookkeeping`` part (when measured): in-place chain vs compiled passes, by depth."""
    if "sam_bookkeeping" not in data:
        return []
    out = ["", "SAM bookkeeping by depth (`ars`, k=1; `begin_sam_pass` + `end_sam_pass` of one optimizer, its "
           "in-place chain (`compile=False`), `compile=True` (fused passes for the tensors `F.fuses_sam_passes` "
           "picks on this device, the chain for the rest) and, where that is not every tensor, the fused passes "
           "forced onto all, timed alternately on the same state, each ÷ the sync step of the same round; "
           "medians). Beside them, not ours: the least any exact SAM does — copy `w`, `‖g‖`, `w += (ρ/‖g‖)·g`, "
           "restore `w` from the copy (four passes, eight streams over every parameter, no preconditioning):", "",
           "| layers | parameters | matrix track | sync step | in-place chain | `compile=True` | all fused "
           "| `compile=True` ÷ in-place | plain SAM's least |",
           "|---|---|---|---|---|---|---|---|---|"]

    def duration(stats: dict[str, float]) -> str:
        ms = stats["median_ms"]
        return f"{ms:.1f} ms" if ms < 1000 else f"{ms / 1e3:.2f} s"

    for layers, row in data["sam_bookkeeping"]["depths"].items():
        out.append(f"| {layers} | {row['n_params'] / 1e6:.0f} M | {100 * row['matrix_params'] / row['n_params']:.0f}% "
                   f"| {duration(row['step'])} | {duration(row['in_place'])} ({100 * row['in_place_vs_step']:.1f}%) "
                   f"| {duration(row['compiled'])} ({100 * row['compiled_vs_step']:.1f}%) "
                   + (f"| {duration(row['fused'])} ({100 * row['fused_vs_step']:.1f}%) " if "fused" in row
                      else "| = `compile=True` ")
                   + f"| {row['compiled_vs_in_place']:.2f} "
                   + (f"| {duration(row[SAM_FLOOR])} ({100 * row[f'{SAM_FLOOR}_vs_step']:.1f}%) |" if SAM_FLOOR in row
                      else "| not measured |"))
    floor = sam_floor_sentence(data)
    return out + (["", floor] if floor else []) + [""]


def section(data: dict[str, Any], results: Path | None = None) -> list[str]:
    """The BENCHMARKS.md section (``benchmarks.report`` calls it); ``results``: the folder whose GPU runs
    (``benchmarks/gpu.sh``'s files) it reports too."""
    s = summarize(data)
    env, cfg, opt = data["environment"], data["config"], data["optimizer_step"]
    layers = cfg["layers"]
    out = ["## Scale: Qwen3-0.6B shapes", "",
           f"`make bench-scale` (`python -m benchmarks.scale --setting {data['setting']}`), one process, "
           f"{env.get('torch_threads', 1)} thread, on **{env['cpu_model']}** (flags: "
           f"{', '.join(env['cpu_flags']) or 'none of avx2/avx512/amx'}; bf16 matmul "
           f"{'native' if any(f in env['cpu_flags'] for f in ('avx512_bf16', 'amx_bf16')) else 'emulated'}), "
           f"device {data['device']}, {data['environment']['date']}, git {env['hf_rmsuon_git']}"
           f"{' (+ uncommitted changes)' if env['hf_rmsuon_dirty'] else ''}. Shapes: hidden "
           f"{data['shapes']['hidden_size']}, MLP {data['shapes']['intermediate_size']}, "
           f"{data['shapes']['num_attention_heads']}×{data['shapes']['head_dim']} query heads, "
           f"{data['shapes']['num_key_value_heads']} KV heads, vocab {data['shapes']['vocab_size']:,}, tied; "
           f"**{layers} layer{'s' if layers > 1 else ''}** ({opt['n_params'] / 1e6:.0f} M parameters, "
           f"{opt['matrix_params'] / 1e6:.1f} M on the matrix track). {opt.get('rounds', cfg['opt_rounds'])} timed rounds after "
           f"{opt.get('warmup', cfg['opt_warmup'])} warm-up, interleaved; medians (and the median of per-round ratios, "
           "\"paired\"). Shared 2-core machine: ratios, not absolute times, are the result."
           + "".join(f" Re-measured in a later process: {', '.join(a['parts'])} (`--setting {a.get('setting', '?')} "
                     f"--parts {','.join(a['parts'])}`, {a['environment']['date']}, git "
                     f"{a['environment']['hf_rmsuon_git']}{' + uncommitted changes' if a['environment']['hf_rmsuon_dirty'] else ''})."
                     for a in data.get("added_parts", [])), "",
           f"Matmul throughput in this process ({data['matmul']['dtype']}, "
           f"{'×'.join(map(str, data['matmul']['shape']))}): **{_limit_gflops(data):.1f} GFLOP/s**"
           + (" (median over the rounds, timed as one more contender; before the rounds: "
              f"{data['matmul']['gflops']:.1f})" if "matmul_in_rounds" in opt else "") + ". "
           f"The matrix track's standard Newton–Schulz is {opt['ns_flops_standard'] / 1e9:.0f} GFLOP per step; "
           f"with the Gram iteration where it is chosen (fp32) {opt['ns_flops_chosen_fp32'] / 1e9:.0f} GFLOP. "
           "\"limit\" = standard-NS FLOPs / step time ÷ matmul throughput (the Gram iteration can pass 100%).",
           ""]
    if "ns_shapes" in data:
        ns = data["ns_shapes"]
        note = ", measured in a separate process after the rest" if any(
            "ns_shapes" in a["parts"] for a in data.get("added_parts", [])) else ""
        out += ns_shapes_table(ns, f"Newton–Schulz per shape{note}")
        out.append("")
        picked = [(e["compiled"]["paired_vs_standard"] / e[e["chosen"]]["paired_vs_standard"], e["compile_s"])
                  for e in ns["shapes"].values() if "compiled" in e]
        if picked:
            out += [f"`compile=True` (`torch.compile` of the same per-shape choice) runs at "
                    f"{_f(min(r for r, _ in picked))}–{_f(max(r for r, _ in picked))}× the eager pick, after "
                    f"{min(c for _, c in picked):.0f}–{max(c for _, c in picked):.0f} s of compilation per shape: the "
                    "matmuls dominate and the elementwise work it could fuse is small, so `compile` stays off by "
                    "default on this kind of device.", ""]
    head = ["optimizer step (gradients preset)", "median s", "× torch Muon (NS fp32)", "paired", "limit",
            "host reads / step"]
    rows = []
    for name, e in s["optimizer_step"].items():
        syncs = ", ".join(f"{k} {v}" for k, v in e["host_syncs"].items()) or "—"
        rows.append([name, _f(e["median_ms"] / 1e3), _f(e.get("vs_torch_muon_fp32")),
                     _f(e.get("paired_vs_torch_muon_fp32")),
                     f"{100 * e['limit_fraction']:.0f}%" if "limit_fraction" in e else "—", syncs])
    out += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    for label, why in opt["skipped"].items():
        out.append(f"| {label} | not timed: {why} | | | | |")
    out.append("")
    if "bf16_ns_slowdown" in data:
        b = data["bf16_ns_slowdown"]
        out += [f"bf16 Newton–Schulz on this CPU (torch Muon's own kernel, one 1024×1024): {b['bf16_s']:.2f} s vs "
                f"{b['fp32_s']:.2f} s in fp32 (**{b['bf16_over_fp32']:.0f}×**), so the bf16 (as shipped) rows would "
                f"take ~{b['bf16_over_fp32']:.0f}× their fp32 rows' Newton–Schulz time; `ns_dtype=\"auto\"` picks "
                "fp32 here.", ""]
    sam = [(n, e["sam_bookkeeping_vs_step"]) for n, e in s["optimizer_step"].items() if "sam_bookkeeping_vs_step" in e]
    out += ["Host reads: calls of `Tensor.item/__bool__/__float__/__int__/__index__/tolist/cpu/numpy` during one "
            "steady-state `step()` (last timed round) by kind of step, as the code is today (on CUDA each is a "
            "device synchronisation; torch AdamW's count comes from its CPU step tensors)."]
    if sam:
        out += ["SAM sync-step bookkeeping (`begin_sam_pass` + `end_sam_pass`: perturb, copy, restore) ÷ the "
                "sync step: " + ", ".join(f"{n} {100 * v:.0f}%" for n, v in sam) + ". Exact SAM with a restore "
                "from a saved copy takes ten passes over every parameter per sync step in eager PyTorch, eleven "
                "when Lazy/AGA keep a shear force (copy `g`, `√v`, `+ ε·√(1−β2ᵗ)`, `g ÷`, `|p|`, `· |p|`, "
                "`‖N‖`, copy `w`, `w += c·N`, zero `g`, restore; the bias correction rides on ε and the "
                "per-tensor scale), all in place in reused buffers; at these shapes each pass over the 187 M "
                "values is ~1.5–2% of an NS-dominated step, so ~15% is near this protocol's floor on a CPU. "
                "`compile=True` fuses the direction into two passes per tensor (`‖Ñ‖` by rows, then `w += c·Ñ`, each "
                "reading `g`, `v`, `p`): five passes in all (six with a shear force) — the table below. The 2-layer "
                "model is 83% embedding; at Qwen3-0.6B's own 28 layers the matrices' Newton–Schulz dominates."]
    out += sam_bookkeeping_table(data)
    tr = s["adamw_track"]
    ad = data["adamw_track"]
    out += ["", f"**AdamW track alone** ({ad['params'] / 1e6:.0f} M parameters: embedding + norms): ours "
            f"{_f(tr['ours_vs_fused'])}× torch fused AdamW (paired {_f(tr['paired_ours_vs_fused'])}), torch foreach "
            f"{_f(tr['foreach_vs_fused'])}× fused. Ours is the same kernel, given the step's finiteness gate as "
            "`found_inf`; the difference is computing that gate — one read of the gradients (on a CPU the dot "
            "product of a large tensor's two halves: two streams read faster than one)"
            + (f", which alone measured {_f(tr['gate_vs_fused'])}× the fused update in this run: a step that checks "
               "its gradients before writing anything cannot take less than the sum" if "gate_vs_fused" in tr else "")
            + "."
            + (f" Under `transformers.Trainer` the gate comes from the gradient norm the Trainer takes before every "
               f"step anyway (to clip and log; `accept_gradient_norm`): {_f(tr['hinted_vs_fused'])}× fused (paired "
               f"{_f(tr.get('paired_hinted_vs_fused'))})." if "hinted_vs_fused" in tr else ""), ""]
    t = s["training_step"]
    trs = data["training_step"]
    out += [f"**Training step** (forward + backward + `step(closure)`, batch {trs['batch']}×{trs['context']} "
            f"random tokens, {trs.get('rounds', cfg['train_rounds'])} timed steps each after "
            f"{trs.get('warmup', cfg['train_warmup'])}): ada_rmsuon "
            f"{_f(t['ada_rmsuon_vs_adamw'])}× torch AdamW; ars2_neo lazy step {_f(t['lazy_vs_ada_rmsuon'])}× "
            f"ada_rmsuon (paired {_f(t['paired_lazy_vs_ada_rmsuon'])}); ars2_neo k=1 "
            f"{_f(t['k1_vs_ada_rmsuon'])}× (paired {_f(t['paired_k1_vs_ada_rmsuon'])}).", ""]
    targets = s.get("targets", {})
    if targets:
        out += ["Issue 14's targets on this run: " + "; ".join(
            f"{n.replace('_', ' ')} {_f(t['value'])} ({t['op']} {t['target']}: {'met' if t['met'] else '**missed**'})"
            for n, t in targets.items()) + ".", ""]
    return out + gpu_section(results)


def kernel_times(path: Path) -> dict[str, float]:
    """``{"<label>: <phase>": CUDA kernel ms}`` from :mod:`benchmarks.kernel_profile`'s printout."""
    times: dict[str, float] = {}
    key = None
    for line in path.read_text().splitlines():
        if line.startswith("==== "):
            key = line[5:].split(" (")[0]
        elif key and line.startswith("Self CUDA time total:"):
            value = line.split(":", 1)[1].strip()
            times[key] = float(value[:-2]) if value.endswith("ms") else float(value[:-2]) / 1e3
    return times


def gpu_section(results: Path | None) -> list[str]:
    """BENCHMARKS.md's GPU part: ``benchmarks/gpu.sh``'s scale runs, tests, FSDP2 and kernel profile, as
    recorded in ``results``."""
    out = ["### Scale on a GPU", ""]
    runs = gpu_results(results) if results is not None else []
    if results is None or not runs:
        return out + ["Not run — no GPU was available in this session. `benchmarks/gpu.sh` (`make bench-gpu`) runs "
                      "this benchmark on CUDA in bf16 and fp32 NS and the GPU-marked tests, and records the card.", ""]
    env = runs[0]["environment"]
    out += [f"`benchmarks/gpu.sh` (`make bench-gpu`) on **{env.get('gpu', 'a GPU')}** (torch {env['torch']}, "
            f"transformers {env['transformers']}; {env['date']}; git {env['hf_rmsuon_git']}), setting "
            f"`{runs[0]['setting']}`: {runs[0]['optimizer_step']['rounds']} interleaved rounds after "
            f"{runs[0]['optimizer_step']['warmup']} warm-up, the same shapes as above. Each run times the peers in "
            "both NS dtypes and the family in one; ratios are against torch Muon in the family run's NS dtype "
            "(like for like), from the same process. Host reads: the patched counter plus "
            "`torch.cuda.set_sync_debug_mode` warnings (\"cuda\"), one steady-state step.", ""]
    for run in runs:
        s = summarize(run)
        ns = "fp32" if run["ns_compute_dtype"] == "float32" else "bf16"
        out += [f"**Newton–Schulz {run['ns_compute_dtype']}** (matmul {_limit_gflops(run) / 1e3:.0f} TFLOP/s at "
                f"{'×'.join(map(str, run['matmul']['shape']))} in this process):", "",
                f"| optimizer step | median ms | × torch Muon (NS {ns}) | paired | limit | host reads / step |",
                "|---|---|---|---|---|---|"]
        for name, e in s["optimizer_step"].items():
            row = run["optimizer_step"]["rows"][name]
            cuda = sum(h.get("cuda_sync_warnings", 0) for h in row.get("host_syncs") or [])
            reads = ", ".join(f"{k} {v}" for k, v in e["host_syncs"].items()) or "—"
            out.append(f"| {name} | {e['median_ms']:.2f} | {_f(e.get(f'vs_torch_muon_{ns}'))} | "
                       f"{_f(e.get(f'paired_vs_torch_muon_{ns}'))} | "
                       + (f"{100 * e['limit_fraction']:.0f}%" if "limit_fraction" in e else "—")
                       + f" | {reads}; cuda {cuda} |")
        if "ns_shapes" in run:
            out += [""] + ns_shapes_table(run["ns_shapes"])
        tr, t = s["adamw_track"], s["training_step"]
        sam = [(n, e["sam_bookkeeping_vs_step"]) for n, e in s["optimizer_step"].items()
               if "sam_bookkeeping_vs_step" in e]
        trs = run["training_step"]
        out += ["", f"AdamW track alone: ours {_f(tr['ours_vs_fused'])}× torch fused AdamW, "
                f"{_f(tr.get('hinted_vs_fused'))}× with the gate from the Trainer's ‖g‖"
                + (f", the gate alone {_f(tr['gate_vs_fused'])}×" if "gate_vs_fused" in tr else "")
                + f" (foreach {_f(tr['foreach_vs_fused'])}×). Training step (batch {trs['batch']}×{trs['context']}): ada_rmsuon "
                f"{_f(t['ada_rmsuon_vs_adamw'])}× torch AdamW; ars2_neo lazy step {_f(t['lazy_vs_ada_rmsuon'])}× "
                f"ada_rmsuon (paired {_f(t['paired_lazy_vs_ada_rmsuon'])}), k=1 {_f(t['k1_vs_ada_rmsuon'])}×. SAM "
                "sync-step bookkeeping ÷ sync step: " + ", ".join(f"{n} {100 * v:.0f}%" for n, v in sam) + ".",
                "", "Issue 14's targets in this run: " + "; ".join(
                    f"{n.replace('_', ' ')} {_f(v['value'])} ({v['op']} {v['target']}: "
                    f"{'met' if v['met'] else '**missed**'})" for n, v in s["targets"].items()) + ".", ""]
        out += sam_bookkeeping_table(run)
    sam_file = results / SAM_CUDA_FILE
    if sam_file.is_file():  # gpu.sh's "sam" stage: its own process, perhaps another card or commit
        sam = common.read_json(sam_file)
        env = sam["environment"]
        out += [f"SAM bookkeeping on **{env.get('gpu', 'a GPU')}** (`gpu.sh`'s \"sam\" stage, `results/{SAM_CUDA_FILE}`; "
                f"torch {env['torch']}, {env['date']}, git {env['hf_rmsuon_git']}"
                f"{' + uncommitted changes' if env['hf_rmsuon_dirty'] else ''}; NS {sam['ns_compute_dtype']})."]
        out += sam_bookkeeping_table(sam)
    profile = results / "kernel_profile_cuda.txt"
    if profile.is_file():
        k = kernel_times(profile)
        sam_ms, step_ms = k.get("ars k=1 bf16: begin+end_sam_pass"), k.get("ars k=1 bf16: step")
        hinted, own, fused = (k.get(f"{n}: step") for n in ("track hinted", "track own gate", "fused"))
        if all(v is not None for v in (sam_ms, step_ms, hinted, own, fused)):
            out += [f"Kernel time (`benchmarks/kernel_profile.py`, `results/{profile.name}`), which leaves out the "
                    f"host's launch overhead: the AdamW track's step is {hinted / fused:.2f}× torch fused AdamW's "
                    f"kernels with the Trainer's norm ({own / fused:.2f}× computing its gate), so the wall-clock "
                    "excess above is Python and launch time of a ~1 ms step. ARS k=1's bookkeeping is "
                    f"{sam_ms:.1f} ms of kernels (one of them the stand-in copy of the second gradient) against "
                    f"{step_ms:.1f} ms for the whole bf16 step: on a GPU Newton–Schulz takes a few milliseconds "
                    "while each elementwise pass over the 187 M values costs ~0.4 ms of memory traffic, so exact "
                    "SAM's passes over every parameter (ten; eleven with a shear force) "
                    "weigh about as much as the step itself. `compile=True` replaces the chain with two fused passes "
                    "for large tensors (`F.FUSED_SAM_MIN_NUMEL`; on a CPU for all): the SAM table above, where "
                    "`gpu.sh`'s \"sam\" stage ran.",
                    ""]
    log = results / "gpu_tests.log"
    if log.is_file():
        lines = log.read_text().splitlines()
        tally = next((ln for ln in reversed(lines) if " passed" in ln or " failed" in ln), "no summary")
        out += [f"GPU-marked tests (`pytest -m gpu`, `results/{log.name}`: {lines[0]}; {lines[2] if len(lines) > 2 else ''}): "
                f"{tally.strip('= ')}. They check: no host synchronisation in steady-state steps of every member "
                "(fp32 and bf16 parameters, SAM sync and lazy steps, ASI, natural weight decay) under "
                "`torch.cuda.set_sync_debug_mode(\"error\")`; every member's three CUDA steps equal the CPU's; bf16 "
                "Newton–Schulz on tensor cores stays in the band and matches fp32; `compile=True` agrees with "
                "eager; fp16 GradScaler training (ars2_neo k=2); bf16 Trainer training taking its finiteness "
                "gate from the Trainer's gradient norm. Collection errors, where listed, are test modules that "
                "import `datasets` (not in the card's image; they hold no GPU test).", ""]
    notes = results / "gpu_notes.md"  # hand-written observations on these runs, kept beside them
    if notes.is_file():
        out += [notes.read_text().rstrip(), ""]
    fsdp = results / "fsdp2_cuda.json"
    if fsdp.is_file():
        f = common.read_json(fsdp)
        rows = f["rows"]
        members = sorted({k.split(" / ")[0] for k in rows})
        out += [f"FSDP2 on CUDA (`benchmarks/fsdp2.py`, NCCL, world size {f['world']}, {f['device_name']}): step ms "
                "DDP / FSDP2 (DTensor state, owner-computes Newton–Schulz) — " + ", ".join(
                    f"{m} {rows[f'{m} / ddp']['step_ms']:.1f} / {rows[f'{m} / fsdp2']['step_ms']:.1f}"
                    for m in members) + ".", ""]
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="scale benchmark: Qwen3-0.6B shapes (see the module docstring)")
    p.add_argument("--setting", choices=list(SETTINGS), default="quick")
    p.add_argument("--layers", type=int, default=None, help="override the setting's layer count")
    p.add_argument("--device", default="cpu")
    p.add_argument("--ns_dtype", choices=("auto", "bfloat16", "float32"), default="auto")
    p.add_argument("--json", default=None, help="result file (default benchmarks/results/scale.json on CPU)")
    p.add_argument("--parts", default=",".join(PARTS),
                   help=f"comma-separated subset of {','.join(PARTS + EXTRA_PARTS)} (the last only when named); "
                        "a subset is merged into an existing --json")
    args = p.parse_args(argv)
    parts = tuple(x.strip() for x in args.parts.split(",") if x.strip())
    if set(parts) - set(PARTS + EXTRA_PARTS):
        p.error(f"--parts: unknown {sorted(set(parts) - set(PARTS + EXTRA_PARTS))}")
    cfg = SETTINGS[args.setting]
    if args.layers is not None:
        cfg = replace(cfg, layers=args.layers)
    device = torch.device(args.device)
    default = f"scale_{device.type}_{args.ns_dtype}.json" if device.type != "cpu" else "scale.json"
    path = Path(args.json) if args.json else common.REPO / "benchmarks" / "results" / default
    run_scale(cfg, device, args.ns_dtype, path, args.setting, parts)


if __name__ == "__main__":
    common.run_main_guard(main)
