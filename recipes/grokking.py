#!/usr/bin/env python
"""Grokking on modular addition (SPEC §7): how many epochs until the test set is solved?

Task ``(a + b) mod 113``: the 113² = 12 769 pairs, 30% for training, the rest for test; the input
is the three tokens ``a b =``, the answer is read at ``=``. Model: one transformer block (d_model
128, 4 heads, d_mlp 512, ReLU, no LayerNorm). Batch 512, lr 1e-3, betas (0.9, 0.98), weight
decay 1.0. Every family optimizer (``--optim ars2_neo``, via ``hf_rmsuon.create_optimizer``) and
the ``--optim adamw`` baseline (``torch.optim.AdamW``), in a plain PyTorch loop: sharpness-aware
members get the closure they need. Reports, per seed, the first epoch with test accuracy ≥ 10%
(the onset of grokking), 50%, 90% and 99%, and writes every curve to
``<output_dir>/grokking-<optim>.json``.

``--protocol reference`` is the family's research code's setting: a per-head model
(:class:`PerHeadTransformer`: 3-D Q/K/V weights of shape (heads, d_model, d_head), orthogonalized
per head), the research code's routing — its shape rule, which puts the token embedding, the
unembedding and the positional matrix on the *matrix* track — and an AdamW track with its own
betas (0.9, 0.999) and weight decay 0.01 (``adamw_betas``/``adamw_weight_decay``); the matrix track
keeps the lr, betas and weight decay given here. The AdamW baseline trains the same model.

    python recipes/grokking.py --optim ars2_neo --seeds 0 1 2 --epochs 500
    python recipes/grokking.py --optim adamw --seeds 0 1 2 --epochs 500
    python recipes/grokking.py --protocol reference --optim ada_rmsuon --seeds 0 1

Importable: ``from recipes.grokking import run_grokking`` (no dependency on the other recipes).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

import hf_rmsuon

#: test-accuracy thresholds reported; 0.1 is the onset of grokking (chance is 1/113)
THRESHOLDS = (0.1, 0.5, 0.9, 0.99)
BASELINE = "adamw"
PROTOCOLS = ("default", "reference")
#: ``--protocol reference``: the research code's routing and AdamW-track settings, as family options.
#: Its shape rule (matrix track iff ndim >= 2 and every dim < 10000) puts W_E, W_pos and W_U on the
#: matrix track; the per-head Q/K/V stacks are orthogonalized per head.
REFERENCE_OPTIONS: dict[str, Any] = {
    "matrix_patterns": [r"^W_(E|pos|U|Q|K|V)$"],
    "stack_patterns": [r"^W_(Q|K|V)$"],
    "adamw_betas": (0.9, 0.999),
    "adamw_weight_decay": 0.01,
}


class OneBlockTransformer(nn.Module):
    """Token + learned position embeddings, one attention layer and one ReLU MLP, both residual,
    no LayerNorm; the logits are read at the last position (the ``=`` token)."""

    def __init__(self, vocab: int, n_classes: int, d_model: int = 128, n_heads: int = 4, d_mlp: int = 512,
                 n_ctx: int = 3):
        super().__init__()
        if d_model % n_heads:
            raise ValueError("d_model must be divisible by n_heads")
        self.n_heads = n_heads
        self.embed = nn.Embedding(vocab, d_model)
        self.pos_embed = nn.Embedding(n_ctx, d_model)
        self.q_proj = nn.Linear(d_model, d_model, bias=False)
        self.k_proj = nn.Linear(d_model, d_model, bias=False)
        self.v_proj = nn.Linear(d_model, d_model, bias=False)
        self.o_proj = nn.Linear(d_model, d_model, bias=False)
        self.mlp_in = nn.Linear(d_model, d_mlp)
        self.mlp_out = nn.Linear(d_mlp, d_model)
        self.unembed = nn.Linear(d_model, n_classes, bias=False)

    # routing hints for hf_rmsuon: embeddings and the head go to the AdamW track
    def get_input_embeddings(self) -> nn.Module:
        return self.embed

    def get_output_embeddings(self) -> nn.Module:
        return self.unembed

    def forward(self, tokens: Tensor) -> Tensor:
        """Logits at the last position. One block means nothing else reads the other positions'
        outputs, so the query, attention output, MLP and unembedding run at the last position only
        (the same function as running the block everywhere, at about half the cost)."""
        batch, n_ctx = tokens.shape
        x = self.embed(tokens) + self.pos_embed(torch.arange(n_ctx, device=tokens.device))

        def heads(t: Tensor) -> Tensor:
            return t.view(batch, t.shape[1], self.n_heads, -1).transpose(1, 2)

        last = x[:, -1]
        # the last query attends to every position: the causal mask does not restrict it
        attn = F.scaled_dot_product_attention(heads(self.q_proj(x[:, -1:])), heads(self.k_proj(x)),
                                              heads(self.v_proj(x)))
        h = last + self.o_proj(attn.reshape(batch, -1))
        h = h + self.mlp_out(F.relu(self.mlp_in(h)))
        return self.unembed(h)


class PerHeadTransformer(nn.Module):
    """The research code's model: the same function class as :class:`OneBlockTransformer` (one
    attention layer and one ReLU MLP, both residual, no LayerNorm, logits at the ``=`` position) with
    the research code's parameter layout — bare matrices ``W_E`` (vocab, d_model), ``W_pos``
    (n_ctx, d_model), ``W_U`` (d_model, classes) and per-head 3-D ``W_Q``, ``W_K``, ``W_V`` of shape
    (heads, d_model, d_head) — so that routing by shape treats them as the research code does."""

    def __init__(self, vocab: int, n_classes: int, d_model: int = 128, n_heads: int = 4, d_mlp: int = 512,
                 n_ctx: int = 3):
        super().__init__()
        if d_model % n_heads:
            raise ValueError("d_model must be divisible by n_heads")
        self.n_heads, self.d_head = n_heads, d_model // n_heads
        scale = d_model ** -0.5
        self.W_E = nn.Parameter(torch.randn(vocab, d_model) * scale)
        self.W_pos = nn.Parameter(torch.randn(n_ctx, d_model) * scale)
        self.W_Q = nn.Parameter(torch.randn(n_heads, d_model, self.d_head) * scale)
        self.W_K = nn.Parameter(torch.randn(n_heads, d_model, self.d_head) * scale)
        self.W_V = nn.Parameter(torch.randn(n_heads, d_model, self.d_head) * scale)
        self.o_proj = nn.Linear(d_model, d_model, bias=False)
        self.mlp_in = nn.Linear(d_model, d_mlp)
        self.mlp_out = nn.Linear(d_mlp, d_model)
        self.W_U = nn.Parameter(torch.randn(d_model, n_classes) * scale)

    def forward(self, tokens: Tensor) -> Tensor:
        """Logits at the last position (only the last query is needed: one block, read at ``=``)."""
        x = self.W_E[tokens] + self.W_pos[: tokens.shape[1]]  # (batch, ctx, d_model)
        last = x[:, -1]
        q = torch.einsum("bd,hde->bhe", last, self.W_Q)
        k = torch.einsum("btd,hde->bhte", x, self.W_K)
        v = torch.einsum("btd,hde->bhte", x, self.W_V)
        weights = torch.softmax(torch.einsum("bhe,bhte->bht", q, k) / math.sqrt(self.d_head), dim=-1)
        z = torch.einsum("bht,bhte->bhe", weights, v).reshape(len(tokens), -1)
        h = last + self.o_proj(z)
        h = h + self.mlp_out(F.relu(self.mlp_in(h)))
        return h @ self.W_U


def build_model(protocol: str, modulus: int, d_model: int, n_heads: int, d_mlp: int) -> nn.Module:
    """The default protocol's :class:`OneBlockTransformer` or the reference protocol's :class:`PerHeadTransformer`."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, not {protocol!r}")
    cls = PerHeadTransformer if protocol == "reference" else OneBlockTransformer
    return cls(modulus + 1, modulus, d_model, n_heads, d_mlp)


def protocol_optim_args(protocol: str, optim_args: dict[str, Any] | None) -> dict[str, Any]:
    """``optim_args`` with the protocol's options added (given ones win)."""
    return {**(REFERENCE_OPTIONS if protocol == "reference" else {}), **(optim_args or {})}


def modular_addition_data(modulus: int, train_fraction: float, seed: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(train_x, train_y, test_x, test_y)``: all pairs ``a, b < modulus`` as ``[a, b, =]`` with
    label ``(a + b) % modulus``, split at random (``seed``) into train/test."""
    a, b = torch.meshgrid(torch.arange(modulus), torch.arange(modulus), indexing="ij")
    a, b = a.flatten(), b.flatten()
    x = torch.stack([a, b, torch.full_like(a, modulus)], dim=1)  # token `modulus` is "="
    y = (a + b) % modulus
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_train = int(round(train_fraction * len(y)))
    train, test = order[:n_train], order[n_train:]
    return x[train], y[train], x[test], y[test]


def build_optimizer(optim: str, model: nn.Module, lr: float, betas: tuple[float, float], weight_decay: float,
                    optim_args: dict[str, Any] | None = None) -> torch.optim.Optimizer:
    """``torch.optim.AdamW`` for ``"adamw"``, else the family member ``optim`` with model-aware routing.

    Every parameter is decayed in both cases (``no_decay_1d=False`` for the family, as AdamW does over
    ``model.parameters()``), unless ``optim_args`` says otherwise.
    """
    extra = dict(optim_args or {})
    if optim == BASELINE:
        if extra:
            raise ValueError(f"--optim_args are for family optimizers, not {BASELINE}: {extra}")
        return torch.optim.AdamW(model.parameters(), lr=lr, betas=betas, weight_decay=weight_decay)
    extra.setdefault("no_decay_1d", False)
    return hf_rmsuon.create_optimizer(optim, model, lr=lr, betas=betas, weight_decay=weight_decay, **extra)


@torch.no_grad()
def evaluate(model: nn.Module, x: Tensor, y: Tensor, batch_size: int = 4096) -> tuple[float, float]:
    """(mean loss, accuracy) of ``model`` on ``x, y``."""
    model.eval()
    loss_sum, correct = 0.0, 0
    for start in range(0, len(y), batch_size):
        logits = model(x[start:start + batch_size])
        target = y[start:start + batch_size]
        loss_sum += F.cross_entropy(logits.float(), target, reduction="sum").item()
        correct += (logits.argmax(dim=-1) == target).sum().item()
    model.train()
    return loss_sum / len(y), correct / len(y)


def first_epoch_reaching(accuracies: Sequence[float], threshold: float) -> int | None:
    """1-based epoch of the first accuracy ≥ ``threshold`` (``None`` if never)."""
    return next((i + 1 for i, acc in enumerate(accuracies) if acc >= threshold), None)


def run_grokking(
    optim: str = "ars2_neo",
    lr: float = 1e-3,
    seed: int = 0,
    epochs: int = 500,
    *,
    batch_size: int = 512,
    weight_decay: float = 1.0,
    betas: tuple[float, float] = (0.9, 0.98),
    optim_args: dict[str, Any] | None = None,
    modulus: int = 113,
    train_fraction: float = 0.3,
    d_model: int = 128,
    n_heads: int = 4,
    d_mlp: int = 512,
    stop_at: float | None = None,
    device: str | torch.device | None = None,
    progress: bool = True,
    print_routing: bool = False,
    protocol: str = "default",
) -> dict[str, Any]:
    """Train one seed; return its curves and the first epochs reaching each threshold.

    ``batch_size=0``: full batch. ``stop_at``: stop once test accuracy reaches it (e.g. 0.99).
    ``protocol="reference"``: the research code's model, routing and AdamW track (module doc).
    Returns ``{"optim", "seed", "lr", "epochs_run", "epochs_to": {"0.1": e, "0.5": e, "0.9": e, "0.99": e},
    "final": {...}, "curves": {"train_loss", "train_acc", "test_loss", "test_acc"}, "seconds", "config"}``.
    """
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(seed)
    train_x, train_y, test_x, test_y = (t.to(device) for t in modular_addition_data(modulus, train_fraction, seed))
    model = build_model(protocol, modulus, d_model, n_heads, d_mlp).to(device)
    if optim != BASELINE:
        optim_args = protocol_optim_args(protocol, optim_args)
    optimizer = build_optimizer(optim, model, lr, tuple(betas), weight_decay, optim_args)
    if print_routing and getattr(optimizer, "routing_report", None) is not None:
        print(f"[grokking] {optim} routing report:\n{optimizer.routing_report}", flush=True)
    batch = len(train_y) if batch_size <= 0 else batch_size
    shuffle = torch.Generator(device="cpu").manual_seed(seed + 1)
    curves: dict[str, list[float]] = {"train_loss": [], "train_acc": [], "test_loss": [], "test_acc": []}
    start_time = time.perf_counter()
    bar = tqdm(range(epochs), desc=f"{optim} seed {seed}", disable=not progress, dynamic_ncols=True)
    for _ in bar:
        order = torch.randperm(len(train_y), generator=shuffle).to(device)
        for start in range(0, len(order), batch):
            idx = order[start:start + batch]
            xb, yb = train_x[idx], train_y[idx]

            def closure(xb: Tensor = xb, yb: Tensor = yb) -> Tensor:
                optimizer.zero_grad(set_to_none=True)
                loss = F.cross_entropy(model(xb), yb)
                loss.backward()
                return loss

            loss = optimizer.step(closure)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"{optim} seed {seed}: training loss became {loss.item()}")
        train_loss, train_acc = evaluate(model, train_x, train_y)
        test_loss, test_acc = evaluate(model, test_x, test_y)
        for key, value in zip(curves, (train_loss, train_acc, test_loss, test_acc)):
            curves[key].append(value)
        bar.set_postfix(train_acc=f"{train_acc:.3f}", test_acc=f"{test_acc:.3f}", test_loss=f"{test_loss:.3g}")
        if stop_at is not None and test_acc >= stop_at:
            break
    bar.close()
    return {
        "optim": optim, "seed": seed, "lr": lr, "epochs_run": len(curves["test_acc"]),
        "epochs_to": {str(t): first_epoch_reaching(curves["test_acc"], t) for t in THRESHOLDS},
        "final": {key: values[-1] for key, values in curves.items()},
        "curves": curves, "seconds": time.perf_counter() - start_time,
        "config": {"protocol": protocol, "model": type(model).__name__, "modulus": modulus, "train_fraction": train_fraction, "n_train": len(train_y),
                   "n_test": len(test_y), "batch_size": batch, "weight_decay": weight_decay, "betas": list(betas),
                   "optim_args": dict(optim_args or {}), "d_model": d_model, "n_heads": n_heads, "d_mlp": d_mlp,
                   "epochs": epochs, "stop_at": stop_at, "device": str(device)},
    }


def format_table(results: list[dict[str, Any]]) -> str:
    """Per seed: epochs to 10% (onset)/50/90/99% test accuracy and final accuracies; then the median over seeds."""
    head = (f"{'optim':<14} {'seed':>4} {'ep@10%':>7} {'ep@50%':>7} {'ep@90%':>7} {'ep@99%':>7} {'train acc':>9} "
            f"{'test acc':>8} {'time':>8}")
    lines = [head, "-" * len(head)]

    def cell(value: float | int | None) -> str:
        return "—" if value is None else (f"{value:.0f}" if isinstance(value, float) else str(value))

    for r in results:
        e = r["epochs_to"]
        lines.append(f"{r['optim']:<14} {r['seed']:>4} {cell(e.get('0.1')):>7} {cell(e['0.5']):>7} {cell(e['0.9']):>7} "
                     f"{cell(e['0.99']):>7} "
                     f"{r['final']['train_acc']:>9.3f} {r['final']['test_acc']:>8.3f} {r['seconds']:>7.1f}s")
    if len(results) > 1:
        medians = []
        for t in THRESHOLDS:
            reached = [r["epochs_to"].get(str(t)) for r in results]
            # a seed that never reached the threshold counts as +inf: the median is then "—" if half never did
            med = statistics.median([math.inf if v is None else v for v in reached])
            medians.append(None if math.isinf(med) else med)
        lines.append(f"{'median':<14} {'':>4} " + " ".join(f"{cell(m):>7}" for m in medians))
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    names = [BASELINE, *hf_rmsuon.available_optimizers()]
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--optim", default="ars2_neo", choices=names, help="family member, or adamw (torch.optim.AdamW)")
    p.add_argument("--optim_args", default="", help='family hyperparameters, e.g. "rho=0.05,k=2"')
    p.add_argument("--protocol", default="default", choices=PROTOCOLS,
                   help="reference: the research code's per-head model, routing (embeddings, unembedding and "
                        "positional matrix on the matrix track) and AdamW track (betas 0.9:0.999, wd 0.01)")
    p.add_argument("--lr", "--learning_rate", dest="lr", type=float, default=1e-3)
    p.add_argument("--weight_decay", type=float, default=1.0)
    p.add_argument("--betas", type=float, nargs=2, default=(0.9, 0.98))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=500)
    p.add_argument("--batch_size", type=int, default=512, help="0 = full batch")
    p.add_argument("--modulus", type=int, default=113)
    p.add_argument("--train_fraction", type=float, default=0.3)
    p.add_argument("--stop_at", type=float, default=None, help="stop a seed once test accuracy reaches this")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--output_dir", default="runs/grokking")
    p.add_argument("--no_progress", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    optim_args = hf_rmsuon.parse_optim_args(args.optim, args.optim_args) if args.optim != BASELINE else {}
    if args.optim == BASELINE and args.optim_args:
        raise SystemExit(f"error: --optim_args are for family optimizers, not {BASELINE}")
    results = []
    for i, seed in enumerate(args.seeds):
        results.append(run_grokking(
            args.optim, args.lr, seed, args.epochs, batch_size=args.batch_size, weight_decay=args.weight_decay,
            betas=tuple(args.betas), optim_args=optim_args, modulus=args.modulus, train_fraction=args.train_fraction,
            stop_at=args.stop_at, device=args.device, progress=not args.no_progress, print_routing=i == 0,
            protocol=args.protocol,
        ))
    out = Path(args.output_dir) / (f"grokking-{args.optim}.json" if args.protocol == "default"
                                   else f"grokking-{args.protocol}-{args.optim}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {"optim": args.optim, "optim_args": args.optim_args, "protocol": args.protocol, "lr": args.lr,
               "seeds": args.seeds,
               "thresholds": list(THRESHOLDS), "runs": results}
    out.write_text(json.dumps(payload, indent=1) + "\n", encoding="utf-8")
    print(f"\n[grokking] protocol {args.protocol}: (a + b) mod {args.modulus}, {args.train_fraction:.0%} train, "
          f"{args.optim} lr {args.lr:g}, "
          f"wd {args.weight_decay:g}, betas {tuple(args.betas)}, batch {args.batch_size or 'full'}, "
          f"{args.epochs} epochs\n{format_table(results)}\n[grokking] curves written to {out}", flush=True)
    return payload


if __name__ == "__main__":
    main()
