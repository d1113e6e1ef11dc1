"""Which LoRA factors should be orthogonalized? (`lora_policy`: both | B | none)

Pre-train a small byte-level Qwen3 on WT2-offline text (English), then LoRA-fine-tune it on a
different domain — Python source files of the installed `torch` package — and compare held-out
loss after a fixed budget for each policy, optimizer, learning rate and seed. Everything is offline.

    python -m benchmarks.lora_policy [--quick] [--out benchmarks/results/lora_policy.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import time
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from tqdm import tqdm
from transformers import Qwen3Config, Qwen3ForCausalLM

import hf_rmsuon

ROOT = Path(__file__).resolve().parent.parent
WT2 = ROOT.parent / "shared" / "data" / "wikitext-2" / "wiki.valid.tokens"
EXCERPT = ROOT / "recipes" / "data" / "wikitext2-excerpt.train.txt"


def byte_stream(text: str) -> torch.Tensor:
    return torch.tensor(list(text.encode("utf-8", "replace")), dtype=torch.long)


def code_corpus(max_bytes: int) -> str:
    """Python sources of the installed torch package (a fixed, sorted file list)."""
    files = sorted(Path(torch.__file__).parent.glob("optim/*.py")) + sorted(Path(torch.__file__).parent.glob("nn/modules/*.py"))
    text, total = [], 0
    for f in files:
        chunk = f.read_text(errors="replace")
        text.append(chunk)
        total += len(chunk)
        if total >= max_bytes:
            break
    return "\n".join(text)[:max_bytes]


def batches(stream: torch.Tensor, context: int, batch: int, generator: torch.Generator):
    while True:
        starts = torch.randint(0, len(stream) - context - 1, (batch,), generator=generator)
        yield torch.stack([stream[s:s + context] for s in starts])


def lm_loss(model, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, labels=ids).loss


@torch.no_grad()
def evaluate(model, stream: torch.Tensor, context: int) -> float:
    model.eval()
    n = (len(stream) - 1) // context
    ids = stream[: n * context].reshape(n, context)
    losses = [lm_loss(model, ids[i:i + 16]).item() for i in range(0, n, 16)]
    model.train()
    return statistics.fmean(losses)


def pretrain(steps: int, context: int, seed: int = 0) -> Qwen3ForCausalLM:
    torch.manual_seed(seed)
    config = Qwen3Config(vocab_size=256, hidden_size=128, intermediate_size=384, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, head_dim=32,
                         max_position_embeddings=context, tie_word_embeddings=True)
    model = Qwen3ForCausalLM(config)
    text = (WT2 if WT2.exists() else EXCERPT).read_text()
    stream = byte_stream(text[:600_000])
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.01)
    gen = torch.Generator().manual_seed(seed)
    for _, ids in zip(tqdm(range(steps), desc="pre-train (English)"), batches(stream, context, 16, gen)):
        opt.zero_grad()
        lm_loss(model, ids).backward()
        opt.step()
    return model


def finetune(base, optim: str, policy: str, lr: float, seed: int, steps: int, train, valid, context: int) -> dict:
    torch.manual_seed(seed)
    model = get_peft_model(copy.deepcopy(base), LoraConfig(
        r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        task_type="CAUSAL_LM"))
    extra = {"energy_scale": "rms"} if optim == "ada_rmsuon" else {}
    opt = hf_rmsuon.create_optimizer(optim, model, lr=lr, weight_decay=0.0, lora_policy=policy, **extra)
    gen = torch.Generator().manual_seed(1000 + seed)
    for _, ids in zip(range(steps), batches(train, context, 16, gen)):
        opt.zero_grad()
        lm_loss(model, ids).backward()
        opt.step()
    return {"optim": optim, "policy": policy, "lr": lr, "seed": seed, "eval_loss": evaluate(model, valid, context)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="~4 minutes instead of ~15")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "lora_policy.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    context = 128
    pre_steps, ft_steps = (150, 60) if args.quick else (600, 120)
    lrs = [1e-3, 3e-3] if args.quick else [3e-3, 1e-2]
    optims = {"ada_rmsuon": lrs, "rmsuon": lrs}
    seeds = [0] if args.quick else [0, 1]
    start = time.time()
    base = pretrain(pre_steps, context)
    code = byte_stream(code_corpus(400_000))
    split = int(0.9 * len(code))
    train, valid = code[:split], code[split:]
    base_loss = evaluate(base, valid, context)
    runs = []
    grid = [(o, p, lr, s) for o, lrs in optims.items() for lr in lrs for p in ("both", "B", "none") for s in seeds]
    for optim, policy, lr, seed in tqdm(grid, desc="LoRA fine-tunes"):
        runs.append(finetune(base, optim, policy, lr, seed, ft_steps, train, valid, context))
    result = {
        "setting": "quick" if args.quick else "full",
        "pretrain_steps": pre_steps, "finetune_steps": ft_steps, "context": context, "lora_r": 8,
        "base_eval_loss": base_loss, "runs": runs, "seconds": time.time() - start,
        "note": "byte-level Qwen3 (hidden 128, 2 layers) pre-trained on WT2-offline English text, LoRA on "
                "torch's Python sources (90% train / 10% held out); weight_decay 0; ada_rmsuon uses energy_scale=rms",
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(summary(result))


def summary(result: dict) -> str:
    """Best-lr mean held-out loss per (optimizer, policy)."""
    lines = [f"base (no fine-tuning) held-out loss {result['base_eval_loss']:.3f} nats/byte",
             f"{'optimizer':<12} {'policy':<6} {'best lr':>8} {'eval loss':>10} {'ppl/byte':>9}"]
    cells: dict[tuple, dict[float, list[float]]] = {}
    for r in result["runs"]:
        cells.setdefault((r["optim"], r["policy"]), {}).setdefault(r["lr"], []).append(r["eval_loss"])
    for (optim, policy), by_lr in cells.items():
        lr, losses = min(by_lr.items(), key=lambda kv: statistics.fmean(kv[1]))
        mean = statistics.fmean(losses)
        lines.append(f"{optim:<12} {policy:<6} {lr:>8.0e} {mean:>10.4f} {math.exp(mean):>9.3f}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
