"""Shared fixtures and *independent* float64 reference implementations of SPEC §3–§5.

Nothing here imports ``hf_rmsuon``'s math: every formula is written out again, plainly, from
SPEC.md, so a test that compares the package against these can fail when either is wrong.
Tests reach the references through the ``ref`` fixture (which returns this module), so they work
under any pytest import mode.
"""

from __future__ import annotations

import math
import os
import sys

import pytest
import torch
from torch import nn

NS_A, NS_B, NS_C = 3.4445, -4.7750, 2.0315

# The test tensors are tiny: intra-op threads only add contention (measured 50× slower per step on
# this 2-core machine when another process is busy). `make test` exports OMP_NUM_THREADS=1 already.
if "OMP_NUM_THREADS" not in os.environ:
    torch.set_num_threads(1)

# --------------------------------------------------------------------------------------------------
# Newton–Schulz and the matrix view (SPEC §3)
# --------------------------------------------------------------------------------------------------


def ns(g: torch.Tensor, steps: int = 5, coefficients=(NS_A, NS_B, NS_C), view: str | None = None) -> torch.Tensor:
    """Float64 quintic Newton–Schulz of one tensor through its matrix view: "flatten" = (out, -1),
    "stack" = per slice of the last two dims. Default (the shape rule for bare tensors): 2-D as it is,
    3-D per slice, ≥4-D as (out, -1)."""
    x = g.detach().to(torch.float64)
    view = view or ("matrix" if x.ndim == 2 else "stack" if x.ndim == 3 else "flatten")
    if view == "flatten" and x.ndim > 2:
        return ns(x.reshape(x.shape[0], -1), steps, coefficients).reshape(x.shape)
    if view == "stack" and x.ndim > 2:
        return torch.stack([ns(s, steps, coefficients, "stack") for s in x])
    assert x.ndim == 2
    a, b, c = coefficients
    tall = x.shape[0] > x.shape[1]
    if tall:
        x = x.T
    x = x / (math.sqrt(float((x * x).sum())) + 1e-7)
    for _ in range(steps):
        gram = x @ x.T
        poly = b * gram + c * (gram @ gram)
        x = a * x + poly @ x
    return x.T.contiguous() if tall else x


def ns_scalar_map(sigma: torch.Tensor, steps: int = 5, coefficients=(NS_A, NS_B, NS_C)) -> torch.Tensor:
    """The odd quintic acting on singular values: NS(U S Vᵀ) = U p⁽ˢᵗᵉᵖˢ⁾(S/‖X‖) Vᵀ exactly."""
    a, b, c = coefficients
    x = sigma.to(torch.float64)
    for _ in range(steps):
        x = a * x + b * x**3 + c * x**5
    return x


def matrix_dims(shape, view: str | None = None) -> tuple[int, int]:
    """(rows, cols) of a parameter's matrix view ("flatten": (out, ∏rest); "stack": the last two
    dims). Default (shape rule): ≥4-D flattened, 3-D a stack."""
    view = view or ("flatten" if len(shape) >= 4 else "stack")
    if view == "flatten":
        return shape[0], math.prod(shape[1:])
    return shape[-2], shape[-1]


def shape_rule_view(shape) -> str:
    return "matrix" if len(shape) == 2 else "stack" if len(shape) == 3 else "flatten"


def muon_scale(shape, adjust_lr: str, view: str | None = None) -> float:
    rows, cols = matrix_dims(shape, view)
    if adjust_lr == "original":
        return math.sqrt(max(1.0, rows / cols))
    return 0.2 * math.sqrt(max(rows, cols))


def fro(t: torch.Tensor) -> float:
    return math.sqrt(float((t.double() ** 2).sum()))


def dot(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() * b.double()).sum())


def well_conditioned(rows: int, cols: int, kappa: float, generator: torch.Generator | None = None,
                     batch: tuple[int, ...] = ()) -> torch.Tensor:
    """Random float64 matrices with singular values log-spaced in [1/kappa, 1] (random bases)."""
    k = min(rows, cols)
    u, _ = torch.linalg.qr(torch.randn(*batch, rows, k, dtype=torch.float64, generator=generator))
    v, _ = torch.linalg.qr(torch.randn(*batch, cols, k, dtype=torch.float64, generator=generator))
    s = torch.logspace(0.0, -math.log10(kappa), k, dtype=torch.float64)
    return (u * s) @ v.mT


# --------------------------------------------------------------------------------------------------
# A float64 reference optimizer for every family member (SPEC §4, matrix and AdamW tracks)
# --------------------------------------------------------------------------------------------------

DEFAULTS = {
    "muon": dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1, momentum=0.95, nesterov=True,
                 adjust_lr="original"),
    "pure_ns_muon": dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1, adjust_lr="original"),
    "adamuon": dict(lr=1e-3, betas=(0.95, 0.95), eps=1e-8, weight_decay=0.01),
    "rmsuon": dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01),
    "ada_rmsuon": dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01, energy_scale="reference"),
    "f_ada_rmsuon": dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01, energy_scale="reference",
                         natural_wd="projected"),
}
DEFAULTS["ars"] = dict(DEFAULTS["ada_rmsuon"])
DEFAULTS["ars2_neo"] = dict(DEFAULTS["ada_rmsuon"])


class RefOptimizer:
    """Plain float64 re-implementation of one family member's update, driven by given gradients.

    ``tracks[i]`` is "matrix" or "adamw". ``step(grads)`` applies one update to ``self.params`` and
    returns the matrix-track directions U (before the learning rate), for energy checks. A ``None``
    gradient skips that parameter (its own step count then lags the others').
    For ``ars``/``ars2_neo`` the caller passes the gradient the step should use (g_adv on sync steps,
    the shear-injected gradient on lazy steps): the matrix rule is AdaRMSuon's.
    """

    def __init__(self, name: str, params, tracks, **hp):
        self.name = name
        self.hp = {**DEFAULTS[name], **hp}
        self.params = [p.detach().to(torch.float64).clone() for p in params]
        self.tracks = list(tracks)
        self.state: list[dict] = [{} for _ in self.params]

    def step(self, grads) -> list[torch.Tensor | None]:
        directions = []
        for i, (p, g) in enumerate(zip(self.params, grads)):
            if g is None:  # no gradient: the parameter and its state are left alone
                directions.append(None)
                continue
            g = g.detach().to(torch.float64)
            if self.tracks[i] == "adamw":
                self.params[i] = self._adamw(p, g, self.state[i])
                directions.append(None)
            else:
                new_p, u = self._matrix(p, g, self.state[i])
                self.params[i] = new_p
                directions.append(u)
        return directions

    # -- the shared AdamW track ---------------------------------------------------------------------
    def _moments(self, g, st):
        b1, b2 = self.hp["betas"]
        st.setdefault("m", torch.zeros_like(g))
        st.setdefault("v", torch.zeros_like(g))
        st["t"] = st.get("t", 0) + 1
        st["m"] = b1 * st["m"] + (1 - b1) * g
        st["v"] = b2 * st["v"] + (1 - b2) * g * g
        m_hat = st["m"] / (1 - b1 ** st["t"])
        v_hat = st["v"] / (1 - b2 ** st["t"])
        return m_hat, v_hat

    def _adamw(self, p, g, st):
        lr, wd, eps = self.hp["lr"], self.hp["weight_decay"], self.hp["eps"]
        m_hat, v_hat = self._moments(g, st)
        p = p * (1 - lr * wd)
        return p - lr * m_hat / (v_hat.sqrt() + eps)

    # -- matrix-track rules ---------------------------------------------------------------------------
    def _matrix(self, p, g, st):
        h = self.hp
        lr, wd, eps = h["lr"], h["weight_decay"], h["eps"]
        name = self.name
        decay = True
        if name in ("muon", "pure_ns_muon"):
            beta = h.get("momentum", 0.0) if name == "muon" else 0.0
            if name == "muon":
                st.setdefault("M", torch.zeros_like(g))
                st["M"] = beta * st["M"] + (1 - beta) * g
                u = (1 - beta) * g + beta * st["M"] if h["nesterov"] else st["M"]
            else:
                u = g
            update = ns(u)
            p = p * (1 - lr * wd)
            return p - lr * muon_scale(p.shape, h["adjust_lr"]) * update, muon_scale(p.shape, h["adjust_lr"]) * update
        if name == "adamuon":
            b1, b2 = h["betas"]
            st.setdefault("M", torch.zeros_like(g))
            st.setdefault("V", torch.zeros_like(g))
            st["M"] = b1 * st["M"] + g
            u = g + b1 * st["M"]
            o = ns(torch.sign(u))
            st["V"] = b2 * st["V"] + (1 - b2) * o * o
            u_hat = o / (st["V"].sqrt() + eps)
            # 0.2·√(rows·cols)/‖Û‖ gives the update an RMS of 0.2; for a 3-D stack (SPEC is silent)
            # the whole stack counts, i.e. √numel — whole-tensor RMS 0.2, as the package does.
            update = u_hat * 0.2 * math.sqrt(p.numel()) / (fro(u_hat) + eps)
        elif name == "rmsuon":
            m_hat, v_hat = self._moments(g, st)
            energy = fro(m_hat / (v_hat.sqrt() + eps))
            o = ns(m_hat)
            update = energy * o / (fro(o) + 1e-10)
        else:  # ada_rmsuon, f_ada_rmsuon, ars, ars2_neo
            m_hat, v_hat = self._moments(g, st)
            white = m_hat / (v_hat.sqrt() + eps)
            energy = fro(white)
            o = ns(white)
            update = energy * o if h["energy_scale"] == "reference" else energy * o / fro(o)
            if name == "f_ada_rmsuon":
                decay = False
                fisher = p / (v_hat.sqrt() + eps)
                if h["natural_wd"] == "projected":
                    update = update + wd * (dot(fisher, o) / fro(o) ** 2) * o
                else:
                    update = update + wd * fisher
        if decay:
            p = p * (1 - lr * wd)
        return p - lr * update, update

    def v_hat(self, i: int) -> torch.Tensor | None:
        """v̂ of parameter ``i`` after the last step (None before the first)."""
        st = self.state[i]
        if "v" not in st:
            return None
        return st["v"] / (1 - self.hp["betas"][1] ** st["t"])


# --------------------------------------------------------------------------------------------------
# Sharpness-aware pieces (SPEC §5)
# --------------------------------------------------------------------------------------------------


def perturbation(grads, v_hats, params, rho, eps, adaptive, perturb_norm):
    """e = ρ·N/‖N‖, N = g/(√v̂_prev+ε) (or g without v̂), ⊙|p| when adaptive; global or per-tensor ‖N‖."""
    directions = []
    for g, v, p in zip(grads, v_hats, params):
        n = g.double() if v is None else g.double() / (v.double().sqrt() + eps)
        if adaptive:
            n = n * p.double().abs()
        directions.append(n)
    if perturb_norm == "global":
        total = math.sqrt(sum(fro(n) ** 2 for n in directions))
        return [rho * n / (total + 1e-12) for n in directions]
    return [rho * n / (fro(n) + 1e-12) for n in directions]


def shear(g_adv, g):
    g_adv, g = g_adv.double(), g.double()
    return g_adv - (dot(g_adv, g) / (fro(g) ** 2 + 1e-12)) * g


def inject(g, s, alpha):
    g, s = g.double(), s.double()
    return g + alpha * (fro(g) / (fro(s) + 1e-12)) * s


def signed_alignment(grads, shears) -> float:
    num = sum(dot(g, s) for g, s in zip(grads, shears))
    gn = math.sqrt(sum(fro(g) ** 2 for g in grads))
    sn = math.sqrt(sum(fro(s) ** 2 for s in shears))
    return num / (gn * sn + 1e-12)


# --------------------------------------------------------------------------------------------------
# Small models
# --------------------------------------------------------------------------------------------------


class Regression(nn.Module):
    """A two-layer MLP with biases and a norm: both tracks are populated."""

    def __init__(self, d_in: int = 8, hidden: int = 16, d_out: int = 2):
        super().__init__()
        self.fc1 = nn.Linear(d_in, hidden)
        self.norm = nn.LayerNorm(hidden)
        self.fc2 = nn.Linear(hidden, d_out)

    def forward(self, x):
        return self.fc2(torch.tanh(self.norm(self.fc1(x))))


def regression_problem(seed: int = 0, n: int = 64, d_in: int = 8, d_out: int = 2):
    """(model, x, y) with a learnable smooth target; deterministic."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d_in, generator=gen)
    w = torch.randn(d_in, d_out, generator=gen)
    y = torch.sin(x @ w)
    torch.manual_seed(seed)
    return Regression(d_in, 16, d_out), x, y


def tiny_causal_lm(kind: str = "qwen3", tied: bool = False, seed: int = 0):
    """A randomly initialised ~20k-parameter Qwen3 or Llama causal LM (no hub access)."""
    import transformers

    common = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
                  tie_word_embeddings=tied, attention_dropout=0.0)
    torch.manual_seed(seed)
    if kind == "qwen3":
        model = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**common))
    else:
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**common))
    model.train()
    return model


def token_batch(seed: int = 0, batch: int = 4, length: int = 16, vocab: int = 64) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


# lr per member that makes a few dozen steps clearly useful (the reference energy scale E·O steps
# up to √rank× farther than AdamW, so ada_rmsuon-based members get smaller rates: SPEC §4 notes).
TRAIN_LR = {
    "muon": 0.02, "pure_ns_muon": 0.02, "adamuon": 0.01, "rmsuon": 0.01, "ada_rmsuon": 0.003,
    "f_ada_rmsuon": 0.003, "ars": 0.003, "ars2_neo": 0.003,
}


@pytest.fixture
def ref():
    """The reference implementations above (this module)."""
    return sys.modules[__name__]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)
    yield
