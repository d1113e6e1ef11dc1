"""Cost benchmark: optimizer-step time, Newton–Schulz dtype, training-step wall-clock and
optimizer-state memory on the parameter set of the CPU Qwen3 preset (recipes/wikitext2.py).

Everything is measured in ONE process, single-threaded, with the repetitions interleaved
round-robin across the contenders (A, B, C, A, B, C, …; the starting contender rotates each round)
after a warm-up, so slow drifts of a shared machine hit every contender alike. Medians are
reported; the ratios are to ``torch.optim.AdamW`` (foreach), to ``torch.optim.Muon`` + AdamW, and
(training step) to ``ada_rmsuon``.

* optimizer step: fixed random gradients, ``optimizer.step()`` timed alone. Sharpness-aware members
  (ars, ars2_neo) get a *recorded* second pass (``begin_sam_pass``/adversarial gradients/
  ``end_sam_pass``, untimed) on their sync steps, so the row is the update itself; lazy steps are
  timed as they are (their planning — AGA's φ — runs inside ``step``).
* training step: forward + backward + ``step(closure)`` on real WT2-offline batches (chunk mode,
  batch 8 × context 128); a sync step of ars/ars2_neo includes its second forward/backward.
* memory: bytes of the tensors in ``optimizer.state`` per model parameter, after the steps above.
"""

from __future__ import annotations

import argparse
import copy
import gc
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor, nn

from . import common

NAME = "cost"


@dataclass(frozen=True)
class CostSetting:
    opt_rounds: int  # timed optimizer steps per contender
    opt_warmup: int
    ns_rounds: int
    train_steps: int  # timed training steps per contender (a multiple of 5: whole k=5 cycles)
    train_warmup: int  # untimed first steps (5: the first k=5 cycle)
    ns_reference_shapes: bool  # also time NS on the reference (512-hidden) preset's shapes


SETTINGS = {
    "quick": CostSetting(opt_rounds=20, opt_warmup=3, ns_rounds=10, train_steps=10, train_warmup=5,
                         ns_reference_shapes=False),
    "full": CostSetting(opt_rounds=100, opt_warmup=10, ns_rounds=40, train_steps=100, train_warmup=5,
                        ns_reference_shapes=True),
}

FALLBACK_PRESET = {"hidden_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 4,
                   "head_dim": 32, "intermediate_size": 512, "context_length": 128, "vocab_size": 4096,
                   "batch_size": 8}


# --------------------------------------------------------------------------------------------------
# model and data
# --------------------------------------------------------------------------------------------------


def preset_fields(name: str = "cpu") -> tuple[dict[str, Any], str]:
    """The preset's model size from recipes/wikitext2.py (fallback: the documented CPU preset)."""
    try:
        preset = common.load_recipe("wikitext2").PRESETS[name]
        return asdict(preset), f"recipes/wikitext2.py PRESETS[{name!r}]"
    except Exception as err:  # the recipe is optional for the cost benchmark
        if name != "cpu":
            raise
        return dict(FALLBACK_PRESET), f"built-in fallback (recipes/wikitext2.py not importable: {err})"


def build_model(preset: dict[str, Any], seed: int = 0) -> nn.Module:
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(
        vocab_size=preset["vocab_size"], hidden_size=preset["hidden_size"],
        num_hidden_layers=preset["num_hidden_layers"], num_attention_heads=preset["num_attention_heads"],
        num_key_value_heads=preset["num_key_value_heads"], head_dim=preset["head_dim"],
        intermediate_size=preset["intermediate_size"], max_position_embeddings=preset["context_length"],
        tie_word_embeddings=True, use_cache=False,
    )
    torch.manual_seed(seed)
    return Qwen3ForCausalLM(config)


def training_batches(preset: dict[str, Any], n_batches: int, data_dir: str | None) -> tuple[list[Tensor], str]:
    """``n_batches`` chunk-mode batches of WT2-offline training text (the recipe's tokenizer and
    chunking); random tokens if the data is not there."""
    batch, context = preset["batch_size"], preset["context_length"]
    path = common.resolve_data_dir(data_dir) / "wiki.valid.tokens"
    if path.is_file():
        rc = common.load_recipe("_common")
        lines = rc.read_text_file(path)
        train_lines, _ = rc.hold_out(lines, 5)
        tokenizer, _, _ = rc.get_bpe_tokenizer(train_lines, preset["vocab_size"])
        seqs = rc.chunk_tokens(rc.tokenize_lines(tokenizer, train_lines), context, tokenizer.eos_token_id)
        ids = torch.tensor(seqs, dtype=torch.long)
        source = f"WT2-offline {path.name} (first 95% of lines), chunk mode, {len(seqs)} sequences"
    else:
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(0, preset["vocab_size"], (n_batches * batch, context), generator=g)
        source = f"random tokens ({path} not found)"
    out = [ids[(i * batch) % len(ids):(i * batch) % len(ids) + batch] for i in range(n_batches)]
    return [b if len(b) == batch else ids[:batch] for b in out], source


def split_tracks(model: nn.Module) -> tuple[list[Tensor], list[Tensor]]:
    """(matrix-track, AdamW-track) parameters with the family's model-aware routing."""
    import hf_rmsuon

    report = hf_rmsuon.route_model(model)
    params = dict(model.named_parameters())
    matrix = [params[e.name] for e in report.entries if e.track == "matrix"]
    rest = [params[e.name] for e in report.entries if e.track != "matrix"]
    return matrix, rest


# --------------------------------------------------------------------------------------------------
# contenders
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Spec:
    label: str
    optim: str  # "torch_adamw", "torch_adamw_fused", "torch_muon" or a registry name
    hp: dict[str, Any]
    lr: float = 1e-3


OPT_SPECS = [
    Spec("torch AdamW (foreach)", "torch_adamw", {}),
    Spec("torch AdamW (fused)", "torch_adamw_fused", {}),
    Spec("torch Muon + AdamW", "torch_muon", {}),
    Spec("muon (ns bf16)", "muon", {"ns_dtype": "bfloat16"}),
    Spec("muon (ns fp32)", "muon", {"ns_dtype": "float32"}),
    Spec("muon (ns auto)", "muon", {}),
    Spec("pure_ns_muon", "pure_ns_muon", {}),
    Spec("adamuon", "adamuon", {}),
    Spec("rmsuon", "rmsuon", {}),
    Spec("ada_rmsuon", "ada_rmsuon", {}),
    Spec("ada_rmsuon (ns fp32)", "ada_rmsuon", {"ns_dtype": "float32"}),
    Spec("ada_rmsuon (energy_scale=rms)", "ada_rmsuon", {"energy_scale": "rms"}),
    Spec("f_ada_rmsuon (projected)", "f_ada_rmsuon", {}),
    Spec("f_ada_rmsuon (elementwise)", "f_ada_rmsuon", {"natural_wd": "elementwise"}),
    Spec("ars (k=1)", "ars", {}),
    Spec("ars2_neo (k=5)", "ars2_neo", {"k": 5}),
    Spec("ars2_neo (k=5, AGA)", "ars2_neo", {"k": 5, "adaptive_sync": True}),
]

TRAIN_SPECS = [
    Spec("torch AdamW (foreach)", "torch_adamw", {}, 1e-3),
    Spec("ada_rmsuon", "ada_rmsuon", {}, 5e-4),
    Spec("ars2_neo (k=5, Lazy)", "ars2_neo", {"k": 5}, 5e-4),
    Spec("ars2_neo (k=5, Lazy+AGA)", "ars2_neo", {"k": 5, "adaptive_sync": True}, 5e-4),
    Spec("ars2_neo (k=1)", "ars2_neo", {"k": 1}, 5e-4),
    Spec("ars (k=1)", "ars", {}, 5e-4),
]


class Stepper:
    """One contender: a model copy, its optimizer(s) and how one step is taken."""

    def __init__(self, spec: Spec, model: nn.Module):
        import hf_rmsuon

        self.spec = spec
        self.model = model
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizers: list[torch.optim.Optimizer] = []
        if spec.optim in ("torch_adamw", "torch_adamw_fused"):
            fused = spec.optim.endswith("fused")
            self.optimizers.append(torch.optim.AdamW(self.params, lr=spec.lr, weight_decay=0.01,
                                                     foreach=not fused, fused=fused or None))
        elif spec.optim == "torch_muon":
            matrix, rest = split_tracks(model)
            self.optimizers.append(torch.optim.Muon(matrix, lr=spec.lr, weight_decay=0.1))
            self.optimizers.append(torch.optim.AdamW(rest, lr=spec.lr, weight_decay=0.01, foreach=True))
        else:
            self.optimizers.append(hf_rmsuon.create_optimizer(spec.optim, model, lr=spec.lr, **spec.hp))
        self.sam = getattr(self.optimizers[0], "sharpness_aware", False)

    @property
    def opt(self) -> torch.optim.Optimizer:
        return self.optimizers[0]

    def syncs(self) -> int:
        return int(self.opt.sam["syncs"]) if self.sam else 0

    # -- optimizer-step benchmark -----------------------------------------------------------------------
    def prepare(self, grads: list[Tensor], adv_grads: list[Tensor]) -> tuple[str, float]:
        """Load the gradients (untimed). SAM sync steps get a recorded second pass here; returns the
        step kind and the seconds that bookkeeping (perturb + restore) took."""
        for p, g in zip(self.params, grads):
            if p.grad is None:
                p.grad = g.clone()
            else:
                p.grad.copy_(g)
        if not self.sam:
            return "update", 0.0
        opt = self.opt
        if not opt.sam_pass_due():
            return "lazy", 0.0
        start = time.perf_counter()
        opt.begin_sam_pass()
        for p, g in zip(self.params, adv_grads):
            p.grad.copy_(g)
        opt.end_sam_pass()
        return "sync", time.perf_counter() - start

    def optimizer_step(self) -> None:
        for opt in self.optimizers:
            opt.step()

    # -- training-step benchmark ------------------------------------------------------------------------
    def train_step(self, batch: Tensor) -> Tensor:
        model, opt = self.model, self.opt

        def closure() -> Tensor:
            opt.zero_grad(set_to_none=True)
            loss = model(input_ids=batch, labels=batch).loss
            loss.backward()
            return loss

        return opt.step(closure)


def state_memory(stepper: Stepper) -> dict[str, Any]:
    """Bytes of the tensors in ``optimizer.state`` (storages counted once), per key and per parameter."""
    seen: set[int] = set()
    by_key: dict[str, int] = {}
    matrix_bytes = 0
    matrix_ids = set()
    for opt in stepper.optimizers:
        for group in opt.param_groups:
            for p in group["params"]:
                if isinstance(opt, torch.optim.Muon) or (hasattr(opt, "spec_of") and opt.spec_of(p).track == "matrix"):
                    matrix_ids.add(id(p))
    for opt in stepper.optimizers:
        for p, st in opt.state.items():
            for key, value in st.items():
                if not isinstance(value, Tensor):
                    continue
                ptr = value.untyped_storage().data_ptr()
                if ptr in seen:
                    continue
                seen.add(ptr)
                nbytes = value.numel() * value.element_size()
                by_key[key] = by_key.get(key, 0) + nbytes
                if id(p) in matrix_ids:
                    matrix_bytes += nbytes
    total = sum(by_key.values())
    n_params = sum(p.numel() for p in stepper.params)
    n_matrix = sum(p.numel() for p in stepper.params if id(p) in matrix_ids)
    pass_held = getattr(stepper.opt, "_pass", None)
    buffers = getattr(stepper.opt, "_buffers", {})  # SAM's reused sync-step buffers (keep_buffers)
    return {
        "bytes": total, "params": n_params, "bytes_per_param": total / n_params,
        "matrix_bytes_per_matrix_param": matrix_bytes / n_matrix if n_matrix else None,
        "by_key": by_key, "sam_pass_held_after_step": pass_held is not None,
        "sam_buffer_bytes_per_param": sum(b.numel() * b.element_size() for b in buffers.values()) / n_params,
    }


# --------------------------------------------------------------------------------------------------
# measurement loops
# --------------------------------------------------------------------------------------------------


def _interleaved(names: list[str], rounds: int, warmup: int, body: Callable[[str], dict[str, Any]],
                 desc: str) -> dict[str, list[dict[str, Any]]]:
    """Run ``body(name)`` for every name, ``warmup + rounds`` rounds, round-robin with the start
    rotating each round; returns the timed samples (after warm-up) per name."""
    from tqdm.auto import tqdm

    samples: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
    gc.collect()
    gc.disable()
    try:
        for r in tqdm(range(warmup + rounds), desc=desc, dynamic_ncols=True, mininterval=5.0):
            shift = r % len(names)
            for name in names[shift:] + names[:shift]:
                sample = body(name)
                if r >= warmup:
                    samples[name].append({**sample, "round": r - warmup})
    finally:
        gc.enable()
    return samples


def _timed(fn: Callable[[], Any]) -> tuple[float, float]:
    c0, w0 = time.thread_time(), time.perf_counter()
    fn()
    return time.perf_counter() - w0, time.thread_time() - c0


def _stats(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    qs = statistics.quantiles(values, n=4) if len(values) >= 2 else [values[0]] * 3
    return {"median_ms": 1e3 * statistics.median(values), "mean_ms": 1e3 * statistics.fmean(values),
            "q1_ms": 1e3 * qs[0], "q3_ms": 1e3 * qs[2], "min_ms": 1e3 * min(values), "n": len(values)}


def bench_optimizer_step(setting: CostSetting, preset: dict[str, Any]) -> dict[str, Any]:
    base = build_model(preset)
    g = torch.Generator().manual_seed(1)
    params = list(base.parameters())
    grads = [torch.randn(p.shape, generator=g) * 1e-2 for p in params]
    adv_grads = [gr + 0.5e-2 * torch.randn(gr.shape, generator=g) for gr in grads]
    steppers = {s.label: Stepper(s, copy.deepcopy(base)) for s in OPT_SPECS}

    def body(name: str) -> dict[str, Any]:
        st = steppers[name]
        kind, bookkeeping = st.prepare(grads, adv_grads)
        wall, cpu = _timed(st.optimizer_step)
        return {"kind": kind, "wall": wall, "cpu": cpu, "sam_pass_s": bookkeeping}

    samples = _interleaved(list(steppers), setting.opt_rounds, setting.opt_warmup, body, "optimizer step")
    rows = {}
    for name, st in steppers.items():
        ss = samples[name]
        kinds = sorted({s["kind"] for s in ss})
        row = {"optim": st.spec.optim, "hp": st.spec.hp, "kinds": kinds,
               "wall": _stats([s["wall"] for s in ss]), "cpu": _stats([s["cpu"] for s in ss]),
               "samples": [{k: (round(v, 7) if isinstance(v, float) else v) for k, v in s.items()} for s in ss],
               "memory": state_memory(st)}
        for kind in kinds:
            row[f"wall_{kind}"] = _stats([s["wall"] for s in ss if s["kind"] == kind])
            row[f"cpu_{kind}"] = _stats([s["cpu"] for s in ss if s["kind"] == kind])
        passes = [s["sam_pass_s"] for s in ss if s["kind"] == "sync"]
        if passes:
            row["sam_pass_bookkeeping"] = _stats(passes)
        rows[name] = row
    return {"rows": rows, "n_params": sum(p.numel() for p in params),
            "matrix_params": sum(p.numel() for p in split_tracks(base)[0])}


def bench_ns_dtype(setting: CostSetting, preset: dict[str, Any]) -> dict[str, Any]:
    """F.orthogonalize on the preset's matrix-track shapes (same-shape batches), bf16 vs fp32."""
    from hf_rmsuon import functional as F

    out: dict[str, Any] = {"default_cpu_dtype": str(F.default_ns_dtype("cpu")).replace("torch.", "")}
    shape_sets = {"cpu preset": preset}
    if setting.ns_reference_shapes:
        shape_sets["reference preset"] = preset_fields("reference")[0]
    g = torch.Generator().manual_seed(2)
    for label, pr in shape_sets.items():
        model = build_model(pr) if label == "cpu preset" else None
        if model is not None:
            shapes = [tuple(p.shape) for p in split_tracks(model)[0]]
        else:
            h, q = pr["hidden_size"], pr["num_attention_heads"] * pr["head_dim"]
            kv, m = pr["num_key_value_heads"] * pr["head_dim"], pr["intermediate_size"]
            shapes = [(q, h), (kv, h), (kv, h), (h, q), (m, h), (m, h), (h, m)] * pr["num_hidden_layers"]
        mats = [torch.randn(s, generator=g) for s in shapes]
        views = ["matrix"] * len(mats)  # the preset's matrix track: Linear weights
        rounds = setting.ns_rounds if label == "cpu preset" else max(5, setting.ns_rounds // 4)

        def body(name: str, mats=mats, views=views) -> dict[str, Any]:
            dtype = torch.bfloat16 if name == "bfloat16" else torch.float32
            wall, cpu = _timed(lambda: F.orthogonalize(mats, views, dtype=dtype))
            return {"wall": wall, "cpu": cpu}

        samples = _interleaved(["bfloat16", "float32"], rounds, 3, body, f"NS dtype ({label})")
        ref = F.orthogonalize([m.double() for m in mats], views, dtype=torch.float64)
        errs = {}
        for name in ("bfloat16", "float32"):
            res = F.orthogonalize(mats, views, dtype=getattr(torch, name))
            errs[name] = max(float((r.double() - x).norm() / x.norm()) for r, x in zip(res, ref))
        entry = {name: {"wall": _stats([s["wall"] for s in ss]), "cpu": _stats([s["cpu"] for s in ss])}
                 for name, ss in samples.items()}
        entry["shapes"] = sorted({str(s) for s in shapes})
        entry["n_matrices"] = len(shapes)
        entry["fp32_over_bf16"] = entry["float32"]["wall"]["median_ms"] / entry["bfloat16"]["wall"]["median_ms"]
        entry["max_rel_error_vs_fp64"] = errs
        out[label] = entry
    return out


def bench_training_step(setting: CostSetting, preset: dict[str, Any], data_dir: str | None) -> dict[str, Any]:
    n = setting.train_warmup + setting.train_steps
    batches, source = training_batches(preset, n, data_dir)
    base = build_model(preset)
    steppers = {s.label: Stepper(s, copy.deepcopy(base)) for s in TRAIN_SPECS}
    counters = dict.fromkeys(steppers, 0)

    def body(name: str) -> dict[str, Any]:
        st = steppers[name]
        before = st.syncs()
        batch = batches[counters[name] % len(batches)]
        counters[name] += 1
        wall, cpu = _timed(lambda: st.train_step(batch))
        kind = ("sync" if st.syncs() > before else "lazy") if st.sam else "plain"
        return {"kind": kind, "wall": wall, "cpu": cpu}

    samples = _interleaved(list(steppers), setting.train_steps, setting.train_warmup, body, "training step")
    rows = {}
    for name, st in steppers.items():
        ss = samples[name]
        row = {"optim": st.spec.optim, "hp": st.spec.hp, "lr": st.spec.lr,
               "wall": _stats([s["wall"] for s in ss]), "cpu": _stats([s["cpu"] for s in ss]),
               "sync_fraction": sum(s["kind"] == "sync" for s in ss) / len(ss),
               "samples": [{k: (round(v, 6) if isinstance(v, float) else v) for k, v in s.items()} for s in ss],
               "memory": state_memory(st)}
        for kind in sorted({s["kind"] for s in ss}):
            row[f"wall_{kind}"] = _stats([s["wall"] for s in ss if s["kind"] == kind])
            row[f"cpu_{kind}"] = _stats([s["cpu"] for s in ss if s["kind"] == kind])
        rows[name] = row
    return {"rows": rows, "batches": source, "batch_size": preset["batch_size"],
            "context_length": preset["context_length"]}


# --------------------------------------------------------------------------------------------------
# ratios and issue-6 targets
# --------------------------------------------------------------------------------------------------


def _med(row: dict[str, Any], kind: str | None = None, clock: str = "wall", stat: str = "median_ms") -> float:
    key = f"{clock}_{kind}" if kind else clock
    return row[key][stat]


def paired(a: dict[str, Any], b: dict[str, Any], kind: str | None = None, clock: str = "wall") -> float | None:
    """Median over rounds of ``a``'s time / ``b``'s time in the same round (the two ran back to back,
    so a slow patch of a shared machine cancels); ``kind`` restricts ``a`` to one kind of step."""
    tb = {s["round"]: s[clock] for s in b["samples"]}
    ratios = [s[clock] / tb[s["round"]] for s in a["samples"]
              if s["round"] in tb and (kind is None or s["kind"] == kind) and tb[s["round"]] > 0]
    return statistics.median(ratios) if ratios else None


def summarize(result: dict[str, Any]) -> dict[str, Any]:
    """Ratios and the issue-6 targets from the recorded samples (``benchmarks.report`` recomputes
    them from the JSON, so the tables always match the raw data)."""
    opt = result["optimizer_step"]["rows"]
    adamw, tmuon = _med(opt["torch AdamW (foreach)"]), _med(opt["torch Muon + AdamW"])
    ratios = {}
    for name, row in opt.items():
        entry = {"vs_adamw": _med(row) / adamw, "vs_torch_muon": _med(row) / tmuon,
                 "cpu_vs_adamw": _med(row, clock="cpu") / _med(opt["torch AdamW (foreach)"], clock="cpu")}
        for kind in ("lazy", "sync"):
            if f"wall_{kind}" in row:
                entry[f"{kind}_vs_adamw"] = _med(row, kind) / adamw
                entry[f"{kind}_vs_torch_muon"] = _med(row, kind) / tmuon
        ratios[name] = entry
    muon_bf16 = _med(opt["muon (ns bf16)"])
    muon_auto = _med(opt["muon (ns auto)"])
    targets = {
        "muon_vs_torch_muon_same_dtype": {
            "value": muon_bf16 / tmuon, "target": 1.0, "op": "<=",
            "cpu": _med(opt["muon (ns bf16)"], clock="cpu") / _med(opt["torch Muon + AdamW"], clock="cpu"),
            "paired": paired(opt["muon (ns bf16)"], opt["torch Muon + AdamW"])},
        "ada_rmsuon_vs_muon": {
            "value": _med(opt["ada_rmsuon"]) / muon_auto, "target": 1.3, "op": "<=",
            "cpu": _med(opt["ada_rmsuon"], clock="cpu") / _med(opt["muon (ns auto)"], clock="cpu"),
            "paired": paired(opt["ada_rmsuon"], opt["muon (ns auto)"])},
    }
    train = result["training_step"]["rows"]
    ada = train["ada_rmsuon"]
    k5, k1 = train["ars2_neo (k=5, Lazy)"], train["ars2_neo (k=1)"]
    t_ratios = {}
    for name, row in train.items():
        t_ratios[name] = {
            "mean_vs_ada_rmsuon": row["wall"]["mean_ms"] / ada["wall"]["mean_ms"],
            "median_vs_ada_rmsuon": row["wall"]["median_ms"] / ada["wall"]["median_ms"],
            "mean_vs_adamw": row["wall"]["mean_ms"] / train["torch AdamW (foreach)"]["wall"]["mean_ms"],
            "cpu_mean_vs_ada_rmsuon": row["cpu"]["mean_ms"] / ada["cpu"]["mean_ms"],
        }
        if "wall_lazy" in row:
            t_ratios[name]["lazy_median_vs_ada_rmsuon"] = row["wall_lazy"]["median_ms"] / ada["wall"]["median_ms"]
            t_ratios[name]["cpu_lazy_median_vs_ada_rmsuon"] = row["cpu_lazy"]["median_ms"] / ada["cpu"]["median_ms"]
        if "wall_sync" in row:
            t_ratios[name]["sync_median_vs_ada_rmsuon"] = row["wall_sync"]["median_ms"] / ada["wall"]["median_ms"]
    # k=5 mean from the medians of its two kinds of step (robust to the odd slow step on a shared machine)
    robust_k5 = (4 * k5["wall_lazy"]["median_ms"] + k5["wall_sync"]["median_ms"]) / 5 / ada["wall"]["median_ms"]
    t_ratios["ars2_neo (k=5, Lazy)"]["robust_mean_vs_ada_rmsuon"] = robust_k5
    k5r = t_ratios["ars2_neo (k=5, Lazy)"]
    targets.update({
        "lazy_step_vs_ada_rmsuon": {"value": k5r["lazy_median_vs_ada_rmsuon"], "target": 1.05, "op": "<=",
                                    "cpu": k5r["cpu_lazy_median_vs_ada_rmsuon"], "paired": paired(k5, ada, "lazy")},
        "k5_mean_step_vs_ada_rmsuon": {"value": k5r["mean_vs_ada_rmsuon"], "target": 1.25, "op": "<=",
                                       "cpu": k5r["cpu_mean_vs_ada_rmsuon"],
                                       "paired": k5r["robust_mean_vs_ada_rmsuon"]},
        "k1_mean_step_vs_ada_rmsuon": {"value": k1["wall"]["mean_ms"] / ada["wall"]["mean_ms"], "target": 2.1,
                                       "op": "<=", "cpu": k1["cpu"]["mean_ms"] / ada["cpu"]["mean_ms"],
                                       "paired": paired(k1, ada)},
    })
    for t in targets.values():
        t["met"] = bool(t["value"] <= t["target"])
    return {"optimizer_step_ratios": ratios, "training_step_ratios": t_ratios, "issue6_targets": targets}


def run(setting: str, paths: common.Paths, data_dir: str | None = None) -> dict[str, Any]:
    cfg = SETTINGS[setting]
    torch.set_num_threads(1)
    preset, preset_source = preset_fields("cpu")
    start = time.perf_counter()
    common.log(f"cost ({setting}): preset from {preset_source}; torch threads {torch.get_num_threads()}")
    result: dict[str, Any] = {"benchmark": NAME, "setting": setting, "config": asdict(cfg), "preset": preset,
                              "preset_source": preset_source, "environment": common.environment()}
    result["optimizer_step"] = bench_optimizer_step(cfg, preset)
    result["ns_dtype"] = bench_ns_dtype(cfg, preset)
    result["training_step"] = bench_training_step(cfg, preset, data_dir)
    result["summary"] = summarize(result)
    result["seconds"] = time.perf_counter() - start
    result["environment_end"] = {"load_average": common.environment()["load_average"]}
    common.write_json(paths.result(NAME), result)
    for name, t in result["summary"]["issue6_targets"].items():
        common.log(f"cost: {name} = {t['value']:.3f} (target {t['op']} {t['target']}: "
                   f"{'met' if t['met'] else 'MISSED'})")
    common.log(f"cost: done in {result['seconds']:.0f}s → {paths.result(NAME)}")
    return result


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="cost benchmark only (see benchmarks.run)")
    p.add_argument("--setting", choices=list(SETTINGS), default="quick")
    p.add_argument("--out", default=None)
    p.add_argument("--data_dir", default=None)
    args = p.parse_args(argv)
    run(args.setting, common.Paths.for_setting(args.setting, args.out), args.data_dir)


if __name__ == "__main__":
    common.run_main_guard(main)
