"""Functional core: the pure tensor math of the family (no optimizer state, no Python-side control flow
that depends on tensor values).

The family is a composition of five stages, and this module holds one implementation of each:

    moments (EMA of g, g²)  →  preconditioning (bias correction, whitening)
    →  orthogonalization (Newton–Schulz)  →  energy (Frobenius norms)  →  decay

plus the sharpness-aware pieces (perturbation, shear force, AGA alignment, ASI ρ-update).
Every function works on lists of tensors so callers can use ``torch._foreach_*`` kernels and keep
global reductions on the device.
"""

from __future__ import annotations

import functools
import math
from collections import defaultdict
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

NS_COEFFICIENTS: tuple[float, float, float] = (3.4445, -4.7750, 2.0315)
NS_EPS = 1e-7
ENERGY_EPS = 1e-10
SHEAR_EPS = 1e-12

# --------------------------------------------------------------------------------------------------
# Orthogonalization
# --------------------------------------------------------------------------------------------------

VIEW_MATRIX = "matrix"  # a 2-D weight as it is
VIEW_FLATTEN = "flatten"  # (out, in·∏kernel): conv weights, undeclared ≥3-D tensors
VIEW_STACK = "stack"  # a stack of matrices over the last two dims, orthogonalized per slice
VIEW_NONE = "-"  # not orthogonalized (AdamW track)


def matrix_shape(shape: Sequence[int], view: str) -> tuple[int, int]:
    """``(rows, cols)`` of one matrix of the view."""
    if view == VIEW_FLATTEN:
        return int(shape[0]), math.prod(shape[1:])
    if view in (VIEW_MATRIX, VIEW_STACK):
        return int(shape[-2]), int(shape[-1])
    raise ValueError(f"a tensor with view {view!r} has no matrix shape")


def matrix_view(t: Tensor, view: str) -> Tensor:
    """``t`` as a matrix (``matrix``/``flatten``) or a ``(batch, rows, cols)`` stack (``stack``)."""
    if view == VIEW_MATRIX:
        if t.ndim != 2:
            raise ValueError(f"view 'matrix' needs a 2-D tensor, got shape {tuple(t.shape)}")
        return t
    if view == VIEW_FLATTEN:
        return t.reshape(t.shape[0], -1)
    if view == VIEW_STACK:
        return t.reshape(-1, t.shape[-2], t.shape[-1])
    raise ValueError(f"a tensor with view {view!r} cannot be orthogonalized")


@functools.cache
def _cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX512-BF16 or AMX); read once from /proc/cpuinfo."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def default_ns_dtype(device: torch.device | str) -> torch.dtype:
    """Newton–Schulz compute dtype chosen per device, by measurement (see BENCHMARKS.md).

    bfloat16 on accelerators (tensor cores) and on CPUs with native bf16 matmul (AVX512-BF16/AMX:
    measured 1.9–2.7× faster than fp32 for NS on an AVX512-BF16 EPYC); float32 on other CPUs, where
    bf16 matmul is emulated and slower. The quintic iteration is robust to bf16 rounding (Muon's
    default). Override with ``ns_dtype``.
    """
    device = torch.device(device)
    if device.type == "cpu":
        return torch.bfloat16 if _cpu_has_native_bf16() else torch.float32
    return torch.bfloat16


#: Newton–Schulz iterations: "standard" (Muon's: iterate on X), "gram" (iterate on the m×m Gram matrix,
#: one rectangular product at the end) and "auto" (per shape and dtype, see :func:`ns_method`).
NS_METHODS = ("auto", "standard", "gram")
#: "auto" takes the Gram iteration only where its FLOP count is below this share of the standard one
#: (measured on CPU at the Qwen3-0.6B shapes in fp32, BENCHMARKS.md: time follows the FLOP ratio —
#: 1024×3072 0.66, 1024×2048 0.83, 1024×1024 1.25 — so the margin only keeps near-ties on the standard one).
GRAM_FLOP_MARGIN = 0.9
#: dtypes in which the Gram iteration is accurate enough to be chosen by "auto": it squares the condition
#: number (G = X Xᵀ) and carries G itself across the steps, so in bf16 the rounding of G grows into
#: singular values far outside the band on low-rank inputs (measured: up to ~100 instead of ≤ 1.2); in fp32
#: it matches the standard iteration within float32 rounding on the band.
GRAM_DTYPES = (torch.float32, torch.float64)
#: Off a CPU the Gram iteration also needs a short side of at least this: its extra m×m products are
#: launch- and occupancy-bound when small (measured on an H200 in fp32: 512×1024 1.22× the standard
#: iteration's time, 1024×2048 0.90×, 1024×3072 0.73×; BENCHMARKS.md, "Scale on a GPU").
GRAM_MIN_SIDE_ACCELERATOR = 1024


def ns_flops(rows: int, cols: int, steps: int = 5, method: str = "standard") -> int:
    """Floating-point operations of one ``rows × cols`` Newton–Schulz (2 per multiply-add).

    With ``m = min(rows, cols)``, ``n = max``: standard ``steps·(2m²n + m³)`` multiply-adds (``X Xᵀ``,
    ``A·A``, ``B·X``); Gram ``2m²n + (4·steps − 3)·m³`` (``G = X Xᵀ`` and ``Q X`` once; per step ``A·A``,
    ``P·Q`` and ``P·A·P``, minus the products that are identities on the first step or unused on the last).
    """
    m, n = min(rows, cols), max(rows, cols)
    if method == "standard":
        return 2 * steps * (2 * m * m * n + m**3)
    if method == "gram":
        return 2 * (2 * m * m * n + (4 * steps - 3) * m**3)
    raise ValueError(f"method must be 'standard' or 'gram', got {method!r}")


def ns_method(rows: int, cols: int, steps: int, dtype: torch.dtype, device_type: str = "cpu") -> str:
    """The iteration ``newton_schulz`` runs for one shape: "gram" where it needs clearly fewer FLOPs
    (``< GRAM_FLOP_MARGIN`` of the standard count; with 5 steps that is ``max/min > 1.79``), the
    compute dtype is float32/float64 and, off a CPU, the short side is at least
    ``GRAM_MIN_SIDE_ACCELERATOR``; else "standard" (square and near-square matrices, bf16, small ones
    on a GPU)."""
    if dtype not in GRAM_DTYPES:
        return "standard"
    if device_type != "cpu" and min(rows, cols) < GRAM_MIN_SIDE_ACCELERATOR:
        return "standard"
    gram = ns_flops(rows, cols, steps, "gram")
    return "gram" if gram < GRAM_FLOP_MARGIN * ns_flops(rows, cols, steps, "standard") else "standard"


def _ns_prepare(x: Tensor, dtype: torch.dtype) -> tuple[Tensor, bool, torch.Size]:
    """``x`` in ``dtype`` as a contiguous ``(batch, rows, cols)`` stack divided by its Frobenius norm (a
    new tensor: the iterations may write into it), and whether it is tall (``rows > cols``: the iterations
    multiply from the right, so the short side is the Gram side without a transposed copy)."""
    batch_shape = x.shape[:-2]
    y = x.to(dtype).reshape(-1, *x.shape[-2:])
    y = (y / (torch.linalg.matrix_norm(y, keepdim=True) + NS_EPS)).contiguous()
    return y, y.size(-2) > y.size(-1), batch_shape


def _ns_finish(y: Tensor, batch_shape: torch.Size, out_dtype: torch.dtype) -> Tensor:
    return y.reshape(*batch_shape, *y.shape[-2:]).to(out_dtype)


def newton_schulz_standard(
    x: Tensor,
    steps: int = 5,
    coefficients: tuple[float, float, float] = NS_COEFFICIENTS,
    dtype: torch.dtype = torch.bfloat16,
) -> Tensor:
    """Muon's quintic iteration on ``X`` itself: repeat ``A = X Xᵀ; B = b·A + c·A²; X = a·X + B X``
    (tall ``X``: ``A = XᵀX``, ``X = a·X + X B`` — the same polynomial in ``X``, on the short side).

    Every product writes into buffers allocated once per call (``X`` alternates between two): measured
    0.82–0.90× the time of fresh outputs per product in bf16 on an H200 at the Qwen3-0.6B shapes, the
    same time in fp32 there and on a CPU (BENCHMARKS.md, "Scale on a GPU")."""
    if steps < 1:
        raise ValueError(f"ns_steps must be >= 1, got {steps}")
    a, b, c = coefficients
    y, tall, batch_shape = _ns_prepare(x, dtype)
    batch, m = y.size(0), min(y.shape[-2:])
    gram, poly, spare = y.new_empty(batch, m, m), y.new_empty(batch, m, m), torch.empty_like(y)
    for _ in range(steps):
        torch.bmm(*((y.mT, y) if tall else (y, y.mT)), out=gram)
        # fused multiply-adds round once, like torch.optim.Muon's addmm
        torch.baddbmm(gram, gram, gram, beta=b, alpha=c, out=poly)
        torch.baddbmm(y, *((y, poly) if tall else (poly, y)), beta=a, out=spare)
        y, spare = spare, y
    return _ns_finish(y, batch_shape, x.dtype)


def newton_schulz_gram(
    x: Tensor,
    steps: int = 5,
    coefficients: tuple[float, float, float] = NS_COEFFICIENTS,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """The same quintic iteration carried on the ``m × m`` Gram matrix (``m`` the short side).

    Every iterate is ``X_k = Q_k X_0`` with ``Q_{k+1} = P_k Q_k``, ``P_k = a·I + b·A_k + c·A_k²`` and
    ``A_k = X_k X_kᵀ``; since ``A_{k+1} = P_k A_k P_kᵀ`` (``P_k`` symmetric), only ``G = X_0 X_0ᵀ`` and
    the final ``Q X_0`` touch the rectangular matrix. Fewer FLOPs than :func:`newton_schulz_standard`
    when ``max/min`` is well above 1.5 (see :func:`ns_flops`); exact arithmetic gives the same result.
    Use it in float32/float64 (see ``GRAM_DTYPES``). A zero input stays zero."""
    if steps < 1:
        raise ValueError(f"ns_steps must be >= 1, got {steps}")
    a, b, c = coefficients
    y, tall, batch_shape = _ns_prepare(x, dtype)
    gram = y.mT @ y if tall else y @ y.mT
    q: Tensor | None = None
    for k in range(steps):
        poly = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)
        poly.diagonal(dim1=-2, dim2=-1).add_(a)
        q = poly if q is None else poly @ q
        if k < steps - 1:
            gram = poly @ (gram @ poly)
    # the P_k are polynomials in A_0 and commute, so the tall form's X_0·Q is the same product
    return _ns_finish(y @ q if tall else q @ y, batch_shape, x.dtype)  # type: ignore[operator]


def newton_schulz(
    x: Tensor,
    steps: int = 5,
    coefficients: tuple[float, float, float] = NS_COEFFICIENTS,
    dtype: torch.dtype = torch.bfloat16,
) -> Tensor:
    """Quintic Newton–Schulz approximation of ``U Vᵀ`` for ``X = U S Vᵀ`` over the last two dims.

    ``X ← X/(‖X‖+1e-7)``; repeat ``A = X Xᵀ; B = b·A + c·A²; X = a·X + B X``. Works on the short side
    (rows > cols: ``A = XᵀX``, ``X = a·X + X B``, which needs no transposed copy). The singular values
    land in roughly [0.7, 1.2] rather than exactly 1 — the coefficients trade exactness for speed, as in
    Muon. A zero input stays zero.
    The result is returned in ``x.dtype``; leading dims are a batch.

    The iteration is chosen per shape and device (:func:`ns_method`): the Gram form
    (:func:`newton_schulz_gram`) for clearly rectangular matrices in float32/float64 (off a CPU, large
    ones only), the standard one otherwise.
    """
    if ns_method(x.size(-2), x.size(-1), steps, dtype, x.device.type) == "gram":
        return newton_schulz_gram(x, steps, coefficients, dtype)
    return newton_schulz_standard(x, steps, coefficients, dtype)


def orthogonalize(
    tensors: Sequence[Tensor],
    views: Sequence[str],
    steps: int = 5,
    coefficients: tuple[float, float, float] = NS_COEFFICIENTS,
    dtype: torch.dtype | None = None,
    kernel: Callable[..., Tensor] | None = None,
) -> list[Tensor]:
    """``NS`` of each tensor's matrix view (see :mod:`hf_rmsuon.routing`), with same-shape matrices
    stacked into one batched call. Results keep each input's shape and dtype."""
    if len(tensors) != len(views):
        raise ValueError(f"orthogonalize: {len(tensors)} tensors but {len(views)} views")
    results: list[Tensor | None] = [None] * len(tensors)
    buckets: dict[tuple, list[tuple[int, Tensor]]] = defaultdict(list)
    for i, (t, view) in enumerate(zip(tensors, views)):
        m = matrix_view(t, view)
        buckets[(tuple(m.shape[-2:]), m.dtype, m.device)].append((i, m))
    for (_, _, device), members in buckets.items():
        compute_dtype = dtype or default_ns_dtype(device)
        batch = torch.cat([m.reshape(-1, *m.shape[-2:]) for _, m in members])
        ortho = (kernel or newton_schulz)(batch, steps, coefficients, compute_dtype)
        offset = 0
        for i, m in members:
            count = m.numel() // (m.shape[-2] * m.shape[-1])
            # contiguous: later elementwise work and row reductions see one memory layout whatever the
            # path (sharded or not; a compiled kernel may return another layout)
            results[i] = ortho[offset:offset + count].reshape(tensors[i].shape).contiguous()
            offset += count
    return results  # type: ignore[return-value]


@functools.cache
def compiled_newton_schulz() -> Callable[..., Tensor]:
    """``torch.compile``-d :func:`newton_schulz` (built once per process, on first use)."""
    return torch.compile(newton_schulz, dynamic=False)


def muon_lr_scale(rows: int, cols: int, adjust_lr: str) -> float:
    """Muon's shape factor ``s`` of a ``rows × cols`` matrix view: ``√max(1, rows/cols)``
    ("original") or ``0.2·√max(rows, cols)`` ("match_rms_adamw")."""
    if adjust_lr == "original":
        return math.sqrt(max(1.0, rows / cols))
    if adjust_lr == "match_rms_adamw":
        return 0.2 * math.sqrt(max(rows, cols))
    raise ValueError(f"adjust_lr must be 'original' or 'match_rms_adamw', got {adjust_lr!r}")


# --------------------------------------------------------------------------------------------------
# Moments and preconditioning
# --------------------------------------------------------------------------------------------------


def gated(keep: Tensor | None, applied: float, skipped: float) -> float | Tensor:
    """``applied`` on an applied step, ``skipped`` on a skipped one: a 0-d tensor chosen on the device
    from the step gate ``keep`` (a 0-d bool: every gradient finite), or ``applied`` without a gate.
    Choosing rather than multiplying keeps the applied value bit-exact; it is float64 (float32 on MPS)
    so that float64 tensors see the number itself, and lower precisions round it as a Python number."""
    if keep is None:
        return applied
    dtype = torch.float32 if keep.device.type == "mps" else torch.float64
    return torch.where(keep, torch.full((), applied, dtype=dtype, device=keep.device), skipped)


def zero_unless(keep: Tensor | None, tensors: list[Tensor]) -> list[Tensor]:
    """The tensors on an applied step, zeros on a skipped one (new tensors). A skipped step's gradients
    may hold inf/NaN, and a masked update ``0·NaN`` is still NaN, so they are replaced before any
    arithmetic instead of being multiplied away."""
    if keep is None:
        return tensors
    return [torch.where(keep, t, 0.0) for t in tensors]


def ema_lerp_(buffers: list[Tensor], values: list[Tensor], beta: float, keep: Tensor | None = None) -> None:
    """In place: ``b ← β·b + (1−β)·x``; unchanged on a step the gate ``keep`` skips (``values`` finite)."""
    if not buffers:
        return
    if keep is None:
        torch._foreach_lerp_(buffers, values, 1.0 - beta)
    else:
        torch._foreach_lerp_(buffers, values, [gated(keep, 1.0 - beta, 0.0)] * len(buffers))


def update_moments_(
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    grads: list[Tensor],
    beta1: float,
    beta2: float,
    keep: Tensor | None = None,
) -> None:
    """In place: ``m ← β1·m + (1−β1)·g``, ``v ← β2·v + (1−β2)·g²``; unchanged on a skipped step
    (``grads`` zero there: :func:`zero_unless`)."""
    if not grads:
        return
    ema_lerp_(exp_avgs, grads, beta1, keep)
    ema_square_(exp_avg_sqs, grads, beta2, keep)


def ema_square_(buffers: list[Tensor], values: list[Tensor], beta: float, keep: Tensor | None = None) -> None:
    """In place: ``v ← β·v + (1−β)·x²`` (Adam's second moment; AdaMuon's of the orthogonalized sign);
    unchanged on a step the gate ``keep`` skips, where ``values`` must be zero."""
    if buffers:
        decay = gated(keep, beta, 1.0)
        torch._foreach_mul_(buffers, decay)
        torch._foreach_addcmul_(buffers, values, values, value=1.0 - beta)


def advance_steps_(steps: list[Tensor], keep: Tensor | None) -> None:
    """In place: ``t ← t + 1`` per step-count tensor, or ``t + keep`` under a step gate (no host read;
    the list form of the add, as torch's own found_inf handling, runs everywhere, ``meta`` included)."""
    if keep is None:
        torch._foreach_add_(steps, 1.0)
    elif steps:
        torch._foreach_add_(steps, [keep] * len(steps))


def bias_correction(steps: Tensor, beta: float) -> Tensor:
    """``1−β^t`` for a vector of step counts on the device (no host read), as ``−expm1(t·ln β)``: accurate
    to float32 precision even where ``β^t`` is close to 1 (``1−0.999`` in float32 loses 4 digits).
    Counts below 1 (a tensor whose every step was skipped) are taken as 1; such a value only ever
    meets a zero update."""
    if beta == 0.0:
        return torch.ones_like(steps)
    return torch.expm1(steps.clamp(min=1.0) * math.log(beta)).neg_()


def rms_denominators(exp_avg_sqs: list[Tensor], bias_corrections2: Tensor, eps: float) -> list[Tensor]:
    """``√v̂ + ε`` with ``v̂ = v/(1−β2^t)`` (one bias correction per tensor, a vector on the device:
    :func:`bias_correction`)."""
    if not exp_avg_sqs:
        return []
    denoms = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_div_(denoms, list(bias_corrections2.sqrt().unbind()))
    torch._foreach_add_(denoms, eps)
    return list(denoms)


def folded_rms_denominators(exp_avg_sqs: list[Tensor | None], eps: Tensor,
                            out: list[Tensor | None] | None = None) -> list[Tensor | None]:
    """``√v + ε_i`` per tensor (``None`` where there is no ``v``), written into ``out`` where given. With
    ``ε_i = ε·√(1−β2ᵗ)`` this is ``√(1−β2ᵗ)·(√v̂+ε)``: the bias correction rides on ε, one full pass fewer
    than :func:`rms_denominators`, for uses that carry the factor ``√(1−β2ᵗ)`` per tensor anyway (SAM's
    perturbation). ``eps``: one value per tensor, a vector on the device."""
    outs = out if out is not None else [None] * len(exp_avg_sqs)
    denoms = [None if v is None else torch.sqrt(v, out=o) if o is not None else v.sqrt()
              for v, o in zip(exp_avg_sqs, outs)]
    present = [i for i, d in enumerate(denoms) if d is not None]
    if present:
        eps_values = eps.unbind()
        torch._foreach_add_([denoms[i] for i in present], [eps_values[i] for i in present])
    return denoms


def whiten(exp_avgs: list[Tensor], denoms: list[Tensor], bias_corrections1: Tensor | None = None,
           overwrite_denominators: bool = False) -> list[Tensor]:
    """Adam's direction ``m̂/(√v̂+ε)`` — the pre-whitened (diagonal natural) gradient; without
    ``bias_corrections1``, ``m/(√v̂+ε)`` (its direction, for scale-invariant uses). With
    ``overwrite_denominators`` the result is written over ``denoms`` (no new full-size tensors)."""
    if not exp_avgs:
        return []
    if overwrite_denominators:
        whitened = [torch.div(m, d, out=d) for m, d in zip(exp_avgs, denoms)]
    else:
        whitened = torch._foreach_div(exp_avgs, denoms)
    if bias_corrections1 is not None:
        torch._foreach_div_(whitened, list(bias_corrections1.unbind()))
    return list(whitened)


@functools.lru_cache(maxsize=256)
def constant_vector(values: tuple[float, ...], device: torch.device, dtype: torch.dtype) -> Tensor:
    """A vector of constants on ``device``, built once and reused: a tensor made from a Python list
    every step is a host→device copy (a synchronisation on CUDA). Never write to the result."""
    return torch.tensor(values, dtype=dtype, device=device)


#: Under FSDP2 (row-sharded tensors): maps each tensor's per-row partial results on this rank to the
#: whole tensor's per-row results (gathered from every rank, in row order). The reductions below sum
#: per-row results in row order, so a sharded tensor gives bit-for-bit the unsharded result.
Reduce = Callable[[list[Tensor]], list[Tensor]]


def local(t: Tensor) -> Tensor:
    """The local shard of a ``DTensor`` (aliasing it: in-place changes reach the DTensor), else ``t``."""
    inner = getattr(t, "_local_tensor", None)
    return inner if inner is not None else t


def _rows(t: Tensor) -> Tensor:
    # contiguous: a row reduction over strided memory (e.g. a transposed NS result) rounds differently
    return t.contiguous().reshape(t.shape[0], math.prod(t.shape[1:])) if t.ndim else t.reshape(1, 1)


def _accumulation(*tensors: Tensor) -> torch.dtype:
    """float32 for float32 and lower precision; float64 for float64 tensors."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def whole_norms(tensors: list[Tensor]) -> Tensor:
    """Frobenius norms of whole (unsharded) tensors, stacked (one multi-tensor kernel)."""
    if not tensors:
        return torch.zeros(0)
    if all(t.dtype != torch.float64 for t in tensors):
        return torch.stack(list(torch._foreach_norm(tensors, 2, dtype=torch.float32)))
    return torch.stack([torch.linalg.vector_norm(t, dtype=_accumulation(t)) for t in tensors])


#: The smallest tensor whose finiteness :func:`all_finite` reads as the dot product of its two halves, per
#: device kind (absent kinds: never). On a CPU one core streaming a single array leaves memory bandwidth
#: unused; two streams read the same values faster — measured 0.81× an L2 norm's time on 155 M float32
#: values and 0.84–0.88× from 1 M values up (1 thread). A GPU's one kernel already saturates its memory.
PAIRED_HALVES_MIN_NUMEL: dict[str, int] = {"cpu": 1 << 20}


def all_finite(tensors: list[Tensor]) -> Tensor:
    """Whether every value of ``tensors`` is finite, as a 0-d bool tensor on their device (no host read),
    in one read of each value: a sum that any inf/NaN makes non-finite (``inf·0`` and ``inf − inf`` are
    NaN) — L2 norms in one multi-tensor kernel, and for large float32/float64 tensors
    (:data:`PAIRED_HALVES_MIN_NUMEL`) the dot product of the tensor's two halves. Values so large that
    their squares or products overflow (|x| ≳ 1e19) count as non-finite too: such a gradient is broken."""
    if not tensors:
        return torch.tensor(True)
    partials: list[Tensor] = []
    low, full = [], []
    for t in tensors:
        least = PAIRED_HALVES_MIN_NUMEL.get(t.device.type)
        if (least is not None and t.numel() >= least and t.dtype in (torch.float32, torch.float64)
                and t.is_contiguous()):
            flat = t.view(-1)
            half = flat.numel() // 2
            partials.append(torch.dot(flat[:half], flat[half:2 * half]))
            if flat.numel() % 2:
                full.append(flat[-1:])
        elif t.dtype in (torch.float16, torch.bfloat16):
            low.append(t)
        else:
            full.append(t)
    if full:
        partials += torch._foreach_norm(full)
    if low:
        partials += torch._foreach_norm(low, 2, dtype=torch.float32)
    return torch.isfinite(torch.stack([x.float() for x in partials]).sum())


def frobenius_norms(tensors: list[Tensor], reduce: Reduce | None = None) -> Tensor:
    """Per-tensor Frobenius norms, stacked (no host sync): per-row squared norms summed in row order,
    so that under FSDP2 (``reduce`` gathers the rows of every shard) the result is bit-identical to
    the unsharded one."""
    if not tensors:
        return torch.zeros(0)
    rows = [torch.linalg.vector_norm(_rows(t), dim=1, dtype=_accumulation(t)).square() for t in tensors]
    if reduce is not None:
        rows = reduce(rows)
    return torch.stack([r.sum() for r in rows]).sqrt()


#: values per block of row products: on a CPU the temporary stays in cache (measured 2.4× faster than one
#: full-size product on a 151,936 × 1,024 embedding); on a GPU each block costs two kernel launches, and
#: cache-sized blocks made F-AdaRMSuon's step launch-bound (measured on an H200 at the Qwen3-0.6B shapes:
#: 11.5 ms against AdaRMSuon's 5.5–6.6 ms, ~260 extra launches), so there blocks only bound the temporary
#: (64 MB in fp32; ten blocks for that embedding).
_DOT_BLOCK_CPU = 1 << 18
_DOT_BLOCK_ACCELERATOR = 1 << 24


def _row_dots(x: Tensor, y: Tensor) -> Tensor:
    """``(x·y).sum(1)`` per row, a block of rows at a time (same per-row arithmetic, bounded temporary)."""
    block_values = _DOT_BLOCK_CPU if x.device.type == "cpu" else _DOT_BLOCK_ACCELERATOR
    if x.numel() <= block_values:
        return (x * y).sum(1)
    step = max(1, block_values // max(1, x.shape[1]))
    out = torch.empty(x.shape[0], dtype=x.dtype, device=x.device)
    block = torch.empty(step, x.shape[1], dtype=x.dtype, device=x.device)
    for i in range(0, x.shape[0], step):
        j = min(i + step, x.shape[0])
        torch.mul(x[i:j], y[i:j], out=block[:j - i])
        torch.sum(block[:j - i], dim=1, out=out[i:j])
    return out


def dots(a: list[Tensor], b: list[Tensor], reduce: Reduce | None = None) -> Tensor:
    """Per-pair ``⟨a_i, b_i⟩``, stacked: per-row dot products summed in row order (``reduce``: as in
    :func:`frobenius_norms`)."""
    if not a:
        return torch.zeros(0)
    rows = [_row_dots(_rows(x).to(_accumulation(x, y)), _rows(y).to(_accumulation(x, y))) for x, y in zip(a, b)]
    if reduce is not None:
        rows = reduce(rows)
    return torch.stack([r.sum() for r in rows])


def global_norm(tensors: list[Tensor], reduce: Reduce | None = None) -> Tensor:
    """``√Σ‖t‖²`` over all tensors, on the device."""
    if not tensors:
        return torch.zeros(())
    return torch.linalg.vector_norm(frobenius_norms(tensors, reduce))


# --------------------------------------------------------------------------------------------------
# Update rules: one function per step kind; each returns the direction U (p ← p − lr·U)
# --------------------------------------------------------------------------------------------------


def energy_scales(directions: list[Tensor], energies: Tensor | list[Tensor], normalize: bool,
                  direction_norms: Tensor | None = None) -> Tensor:
    """Per-tensor factors of the energy re-injection: ``E`` (``U = E·O``) or, with ``normalize``,
    ``E/(‖O‖+1e-10)`` (``U = E·O/‖O‖``) — stacked, so the math is a few whole-vector kernels.
    ``direction_norms``: ``‖O‖`` when already known (computed where the whole matrix is)."""
    energies = energies if isinstance(energies, Tensor) else torch.stack(list(energies))
    if normalize:
        norms = direction_norms if direction_norms is not None else frobenius_norms(directions)
        return energies / (norms + ENERGY_EPS)
    return energies


def scale_each(tensors: list[Tensor], scales: Tensor) -> list[Tensor]:
    """``[s_i · t_i]`` (new tensors)."""
    if not tensors:
        return []
    return list(torch._foreach_mul(tensors, list(scales.to(tensors[0].dtype).unbind())))


def scale_by_energy(directions: list[Tensor], energies: Tensor | list[Tensor], normalize: bool) -> list[Tensor]:
    """Energy re-injection: ``U = E·O`` or, with ``normalize``, ``U = E·O/(‖O‖+1e-10)``."""
    if not directions:
        return []
    return scale_each(directions, energy_scales(directions, energies, normalize))


def projected_natural_decay(
    params: list[Tensor], denoms: list[Tensor], directions: list[Tensor], weight_decay: float,
    direction_norms: Tensor | None = None, reduce: Reduce | None = None,
) -> Tensor:
    """F-AdaRMSuon's projected natural weight decay ``wd·(⟨D,O⟩/‖O‖²)·O`` with ``D = p/(√v̂+ε)`` —
    the Fisher-preconditioned decay kept only along the update direction ``O``. Being a multiple of
    ``O``, it is returned as the per-tensor coefficients ``wd·⟨D,O⟩/‖O‖²``."""
    fisher_decay = list(torch._foreach_div(params, denoms))
    norms = direction_norms if direction_norms is not None else frobenius_norms(directions, reduce)
    return weight_decay * dots(fisher_decay, directions, reduce) / (norms.square() + SHEAR_EPS)


def elementwise_natural_decay(params: list[Tensor], denoms: list[Tensor], weight_decay: float) -> list[Tensor]:
    """F-AdaRMSuon's first (element-wise) form ``wd·p/(√v̂+ε)``; kept for the ablation."""
    if not params:
        return []
    out = torch._foreach_div(params, denoms)
    torch._foreach_mul_(out, weight_decay)
    return list(out)


def decay_and_apply_(params: list[Tensor], updates: list[Tensor], lrs: list[float],
                     decay_factors: list[float], keep: Tensor | None = None) -> None:
    """``p ← p·d − lr·U`` per tensor (``d = 1 − lr·wd`` for decoupled decay, 1 without). On a step the
    gate ``keep`` skips, ``d`` is 1 and the caller has made ``U`` zero, so ``p`` is left bit-exact.

    Full-precision parameters are updated in place with a few fused multi-tensor kernels (one per
    distinct ``(lr, d)``). bf16/fp16 parameters are computed in float32 and written back once, so a
    small update or decay is not lost to rounding each intermediate result."""
    low = [i for i, p in enumerate(params) if p.dtype in (torch.float16, torch.bfloat16)]
    decays = {d: gated(keep, d, 1.0) for d in {decay_factors[i] for i in low} if d != 1.0}  # one per factor
    for i in low:
        p = params[i]
        exact = p.float()
        if decay_factors[i] != 1.0:
            exact.mul_(decays[decay_factors[i]])
        p.copy_(exact.sub_(updates[i].float(), alpha=lrs[i]))
    low_set = set(low)
    by_rate: dict[tuple[float, float], list[int]] = defaultdict(list)
    for i in range(len(params)):
        if i not in low_set:
            by_rate[(lrs[i], decay_factors[i])].append(i)
    for (lr, factor), idx in by_rate.items():
        ps = [params[i] for i in idx]
        if factor != 1.0:
            torch._foreach_mul_(ps, gated(keep, factor, 1.0))
        torch._foreach_add_(ps, [updates[i].to(params[i].dtype) for i in idx], alpha=-lr)


# --------------------------------------------------------------------------------------------------
# Sharpness-aware pieces (ARS / ARS2-Neo)
# --------------------------------------------------------------------------------------------------


def sam_directions_(grads: list[Tensor], denoms: list[Tensor | None], params: list[Tensor],
                    adaptive: bool) -> list[Tensor]:
    """``Ñ_i = g/denom_i`` (``g`` where ``None``), ``⊙|p|`` when ``adaptive`` — **in place** in ``grads``
    (returned), the spent denominators reused as scratch for ``|p|`` (embeddings are most of an LLM's
    parameters; a fresh full-size temporary costs more than an in-place pass)."""
    divided = [i for i, d in enumerate(denoms) if d is not None]
    if divided:
        torch._foreach_div_([grads[i] for i in divided], [denoms[i] for i in divided])
    if adaptive:
        for n, p, d in zip(grads, params, denoms):
            if d is None or d.shape != p.shape:
                n.mul_(p.abs())
            else:  # |p| into the spent denominator (converting bf16/fp16 weights to the state dtype)
                n.mul_(torch.abs(p, out=d) if d.dtype == p.dtype else d.copy_(p).abs_())
    return grads


def perturbation_scales(norms: Tensor, rhos: list[float] | Tensor, perturb_norm: str,
                        denom_factors: Tensor | None = None) -> Tensor:
    """The per-tensor ``c_i`` of ``e_i = c_i·Ñ_i``: ``ρ_i·f_i/(‖N‖+1e-12)`` with ``‖N_i‖ = f_i·‖Ñ_i‖``
    (``norms``: ``‖Ñ_i‖``; ``f_i`` = ``denom_factors``, 1 where ``None``), ``‖N‖`` global or per tensor."""
    if perturb_norm not in ("global", "per_tensor"):
        raise ValueError(f"perturb_norm must be 'global' or 'per_tensor', got {perturb_norm!r}")
    rho = rhos.to(norms.device, torch.float32) if isinstance(rhos, Tensor) else constant_vector(
        tuple(rhos), norms.device, torch.float32)
    if denom_factors is not None:
        norms = norms * denom_factors  # ‖N_i‖
        rho = rho * denom_factors
    if perturb_norm == "global":
        return rho / (torch.linalg.vector_norm(norms) + SHEAR_EPS)
    return rho / (norms + SHEAR_EPS)


def apply_perturbation_(params: list[Tensor], directions: list[Tensor], scales: Tensor) -> None:
    """In place: ``w ← w + c·N`` per tensor (one pass; bf16/fp16 weights computed in float32 and written
    back once)."""
    for p, n, c in zip(params, directions, scales.unbind()):
        if p.dtype in (torch.float16, torch.bfloat16):
            p.copy_(p.float().addcmul_(n.float(), c.float()))
        else:
            p.addcmul_(n.to(p.dtype), c.to(p.dtype))


def _perturbation_direction(g: Tensor, v: Tensor | None, p: Tensor, eps: Tensor, adaptive: bool) -> Tensor:
    """``Ñ = g/(√v+ε)`` (``g`` without ``v``), ``⊙|p|`` when ``adaptive``, in float32."""
    n = g.float()
    if v is not None:
        n = n / (v.float().sqrt() + eps)
    return n * p.float().abs() if adaptive else n


def _direction_row_square_norms(g: Tensor, v: Tensor | None, p: Tensor, eps: Tensor, adaptive: bool) -> Tensor:
    n = _perturbation_direction(g, v, p, eps, adaptive)
    return (n * n).sum(dim=1)


def _perturb_rows_(p: Tensor, g: Tensor, v: Tensor | None, eps: Tensor, scale: Tensor, adaptive: bool) -> None:
    p.copy_((p.float() + scale * _perturbation_direction(g, v, p, eps, adaptive)).to(p.dtype))


# Where ``compile=True`` routes a tensor's SAM perturbation through the fused passes
# (:func:`fused_direction_norms`, :func:`fused_perturb_`): the smallest size per device kind (absent kinds:
# never), of the whole tensor — under FSDP2 every rank must choose alike. Measured (benchmarks/scale.py's
# sam_bookkeeping part, Qwen3-0.6B shapes): on a CPU the fused passes take 0.65–0.68× the in-place chain's
# time at every size; on a GPU the fused passes over the 151,936×1,024 embedding took 0.45× the chain's
# time (H200), but each compiled call covers one tensor and costs the host ~90 µs, so 308 layer tensors
# took 2.7× the chain's (host-bound both ways) — the break-even is near 10 M values.
FUSED_SAM_MIN_NUMEL: dict[str, int] = {"cpu": 0, "cuda": 1 << 24}


def fuses_sam_passes(t: Tensor) -> bool:
    """Whether ``compile=True`` perturbs ``t`` in the fused passes (:data:`FUSED_SAM_MIN_NUMEL`); ``t``: the
    parameter itself (a DTensor's ``numel`` is the whole tensor's, the same on every rank)."""
    least = FUSED_SAM_MIN_NUMEL.get(t.device.type)
    return least is not None and t.numel() >= least


@functools.cache
def _compiled_perturbation_kernels() -> tuple[Callable[..., Tensor], Callable[..., None]]:
    # dynamic shapes: one kernel per pass serves every tensor (as rows × columns)
    return (torch.compile(_direction_row_square_norms, dynamic=True), torch.compile(_perturb_rows_, dynamic=True))


def fused_direction_norms(params: list[Tensor], grads: list[Tensor], exp_avg_sqs: list[Tensor | None],
                          eps: Tensor, adaptive: bool, reduce: Reduce | None = None) -> Tensor:
    """``‖Ñ_i‖`` per tensor (stacked), one ``torch.compile``-d pass each by rows (reads ``g``, ``v``, ``p``;
    ``Ñ`` is never stored). ``Ñ_i = g/(√v_i+ε_i)`` (⊙|p|; ``g`` for a ``None`` second moment); ``eps``: the
    ``ε_i``, one per tensor on the device; every tensor local (FSDP2 shards: rows summed via ``reduce``)."""
    row_square_norms, _ = _compiled_perturbation_kernels()
    rows = [row_square_norms(_rows(g), None if v is None else _rows(v), _rows(p), e, adaptive)
            for p, g, v, e in zip(params, grads, exp_avg_sqs, eps.unbind())]
    if reduce is not None:
        rows = reduce(rows)
    return torch.stack([r.sum() for r in rows]).sqrt()


def fused_perturb_(params: list[Tensor], grads: list[Tensor], exp_avg_sqs: list[Tensor | None], eps: Tensor,
                   scales: Tensor, adaptive: bool) -> None:
    """``w ← w + c_i·Ñ_i`` recomputing ``Ñ_i`` (as :func:`fused_direction_norms`), one ``torch.compile``-d
    pass per tensor: reads ``g``, ``v``, ``p``, writes ``p`` once — with :func:`fused_direction_norms` about
    half the in-place chain's memory traffic (:func:`sam_directions_` + :func:`apply_perturbation_`);
    ``c_i`` from :func:`perturbation_scales` (``√v̂+ε = (√v_i+ε_i)/f_i``). ``grads`` stay unchanged."""
    _, perturb_rows_ = _compiled_perturbation_kernels()
    for p, g, v, e, c in zip(params, grads, exp_avg_sqs, eps.unbind(), scales.unbind()):
        target = _rows(p)  # a view of p where p is contiguous, else of a copy (written back below)
        perturb_rows_(target, _rows(g), None if v is None else _rows(v), e, c, adaptive)
        if not p.is_contiguous():
            p.copy_(target.view(p.shape))


def shear_force(adv_grads: list[Tensor], base_grads: list[Tensor], reduce: Reduce | None = None,
                out: list[Tensor | None] | None = None) -> tuple[list[Tensor], Tensor]:
    """Per tensor, the part of ``g_adv`` orthogonal to ``g``: ``s = g_adv − c·g`` with
    ``c = ⟨g_adv,g⟩/(‖g‖²+1e-12)``, one pass each (into ``out`` where given, else new tensors); returns
    ``(s, c)`` (``c`` stacked, finite iff the inputs are)."""
    if not adv_grads:
        return [], torch.zeros(0)
    coeffs = dots(adv_grads, base_grads, reduce) / (frobenius_norms(base_grads, reduce).square() + SHEAR_EPS)
    outs = out if out is not None else [None] * len(adv_grads)
    return [torch.addcmul(ga, g, c.neg().to(ga.dtype), out=o)
            for ga, g, c, o in zip(adv_grads, base_grads, coeffs.unbind(), outs)], coeffs


def inject_shear(grads: list[Tensor], shears: list[Tensor], alpha: float | Tensor,
                 reduce: Reduce | None = None, shear_norms: Tensor | None = None,
                 out: list[Tensor] | None = None, grad_norms: Tensor | None = None) -> list[Tensor]:
    """Lazy step: ``g + α·(‖g‖/(‖s‖+1e-12))·s`` per tensor, one pass each (into ``out`` where given,
    else new tensors). ``shear_norms``/``grad_norms``: ``‖s‖``/``‖g‖`` when already known."""
    if not grads:
        return []
    if shear_norms is None:
        shear_norms = frobenius_norms(shears, reduce)
    if grad_norms is None:
        grad_norms = frobenius_norms(grads, reduce)
    factors = alpha * grad_norms / (shear_norms + SHEAR_EPS)
    outs = out if out is not None else [None] * len(grads)
    return [torch.addcmul(g, s, f.to(g.dtype), out=o) for g, s, f, o in zip(grads, shears, factors.unbind(), outs)]


def alignment(grads: list[Tensor], shears: list[Tensor], reduce: Reduce | None = None) -> Tensor:
    """Signed global alignment ``Σ⟨g,s⟩ / (√Σ‖g‖²·√Σ‖s‖² + 1e-12)`` (a 0-d tensor on the device).
    AGA's φ_t is its absolute value under ``aga_rule="abs"``."""
    dot = dots(grads, shears, reduce).sum()
    return dot / (global_norm(grads, reduce) * global_norm(shears, reduce) + SHEAR_EPS)


def aga_phi(signed_alignment: Tensor, rule: str) -> Tensor:
    """φ_t under ``rule``: ``|cos|`` ("abs", the design) or the signed value ("signed", reference code)."""
    if rule == "abs":
        return signed_alignment.abs()
    if rule == "signed":
        return signed_alignment
    raise ValueError(f"aga_rule must be 'abs' or 'signed', got {rule!r}")


def aga_threshold(nu: Tensor | float, aga_lambda: float) -> Tensor | float:
    """AGA's staleness threshold magnitude ``λ·√ν``."""
    return aga_lambda * (nu.sqrt() if isinstance(nu, Tensor) else math.sqrt(nu))


def aga_triggers_sync(phi: Tensor, threshold: Tensor | float, rule: str) -> Tensor:
    """Staleness test: ``φ > λ·√ν`` ("abs") or ``φ < −λ·√ν`` ("signed"). Returns a bool tensor."""
    return phi > threshold if rule == "abs" else phi < -threshold


def aga_alpha(phi: Tensor, alpha: float, aga_gamma: float, rule: str) -> Tensor:
    """Injection strength: ``α·(1−φ)^γ`` ("abs") or ``α·(1+max(0,φ))^γ`` ("signed")."""
    if rule == "abs":
        return alpha * (1.0 - phi).clamp(min=0.0) ** aga_gamma
    return alpha * (1.0 + phi.clamp(min=0.0)) ** aga_gamma


def asi_rho(
    rho: float | Tensor,
    rho0: float,
    gap: float | Tensor,
    ema_gap: float | Tensor,
    loss_delta: float | Tensor,
    alpha: float,
    aga_gamma: float,
) -> float | Tensor:
    """ASI ρ-update from the surrogate gap ``h``: ``μ = γ if |h| > ema_gap else 1``, ``η = 0.01·α``;
    grow ρ by ``(1+η·μ)`` while the loss EMA falls (``Δ < 0``), shrink by ``(1−η·μ)`` otherwise;
    clip to ``[0.1·ρ0, 10·ρ0]``. ``ema_gap`` is the EMA *after* this step's update. Numbers in,
    a number out; tensors in, a tensor out (the same arithmetic, decided on the device)."""
    eta = 0.01 * alpha
    if isinstance(rho, Tensor):
        mu = torch.where(torch.as_tensor(gap).abs() > ema_gap, aga_gamma, 1.0).to(rho.dtype)
        rho = rho * torch.where(torch.as_tensor(loss_delta) < 0, 1.0 + eta * mu, 1.0 - eta * mu)
        return rho.clamp(0.1 * rho0, 10.0 * rho0)
    mu = aga_gamma if abs(gap) > ema_gap else 1.0
    rho = rho * (1.0 + eta * mu) if loss_delta < 0 else rho * (1.0 - eta * mu)
    return min(max(rho, 0.1 * rho0), 10.0 * rho0)


# --------------------------------------------------------------------------------------------------
# The AdamW track on torch's fused AdamW kernel
# --------------------------------------------------------------------------------------------------

_FUSED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_PLAIN_TYPES = (Tensor, torch.nn.Parameter)


def fused_adamw_applicable(params: Sequence[Tensor], grads: Sequence[Tensor], exp_avgs: Sequence[Tensor],
                           exp_avg_sqs: Sequence[Tensor], betas: tuple[float, float]) -> bool:
    """Whether :func:`fused_adamw_` can run on these tensors: plain dense tensors (no DTensor or other
    subclass) on one device whose type has the kernel, each parameter's gradient and moments in the
    parameter's own dtype (the kernel has no separate state dtype: fp32 moments of bf16 parameters take
    the foreach path), contiguous, and ``β`` that stay below 1 in float32."""
    if not params or not hasattr(torch, "_fused_adamw_"):
        return False
    if any(b >= 1.0 - 2.0**-24 for b in betas):  # β rounding to 1 in the kernel's float math
        return False
    device = params[0].device
    from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

    if device.type not in _get_fused_kernels_supported_devices():
        return False
    for group in zip(params, grads, exp_avgs, exp_avg_sqs):
        p = group[0]
        if p.dtype not in _FUSED_DTYPES:
            return False
        for t in group:
            if (type(t) not in _PLAIN_TYPES or t.is_sparse or t.device != device or t.dtype != p.dtype
                    or t.shape != p.shape or not t.is_contiguous()):
                return False
    return True


def fused_adamw_(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor],
                 steps: list[Tensor], lr: float, betas: tuple[float, float], eps: float,
                 weight_decays: Sequence[float], keep: Tensor | None = None) -> None:
    """One AdamW step (bias correction, decoupled decay ``p ← p·(1−lr·wd)``) in place with
    ``torch._fused_adamw_``: ``steps`` are the per-tensor float32 step-count tensors on the device,
    advanced here; on a step the gate ``keep`` skips the kernel is told ``found_inf`` (it then changes
    nothing, non-finite gradients included) and the counts stay. One kernel call per distinct
    ``(dtype, wd)``. Call only where :func:`fused_adamw_applicable` holds."""
    beta1, beta2 = betas
    advance_steps_(steps, keep)
    found_inf = None if keep is None else torch.logical_not(keep).to(torch.float32)
    buckets: dict[tuple, list[int]] = defaultdict(list)
    for i, (p, wd) in enumerate(zip(params, weight_decays)):
        buckets[(p.dtype, float(wd))].append(i)
    for (_, wd), idx in buckets.items():
        torch._fused_adamw_(
            [params[i] for i in idx], [grads[i] for i in idx], [exp_avgs[i] for i in idx],
            [exp_avg_sqs[i] for i in idx], [], [steps[i] for i in idx],
            lr=lr, beta1=beta1, beta2=beta2, weight_decay=wd, eps=eps,
            amsgrad=False, maximize=False, grad_scale=None, found_inf=found_inf)
