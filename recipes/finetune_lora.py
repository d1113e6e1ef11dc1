#!/usr/bin/env python
"""LoRA fine-tuning of a causal language model with any optimizer of the family (PEFT).

    # a Hub model
    python recipes/finetune_lora.py --model_name_or_path Qwen/Qwen3-0.6B --optim ars2_neo \\
        --lora_r 16 --lora_alpha 32 --target_modules q_proj,v_proj --output_dir runs/lora
    # a checkpoint saved by the WikiText-2 recipe (model + tokenizer in its --output_dir)
    python recipes/finetune_lora.py --model_name_or_path runs/demo --optim rmsuon --lora_policy B \\
        --train_file my.train.txt --validation_file my.valid.txt --output_dir runs/lora-demo

``--lora_policy`` (both | B | none) says which LoRA factors the family orthogonalizes (the others
get AdamW); it is the routing option ``lora_policy`` of ``--optim_args``, spelled as a flag.
The data options are the WikiText-2 recipe's (Hub ``wikitext-2-raw-v1`` by default, local files,
or the shipped excerpt as an announced smoke run). Prints the trainable parameters, the routing
report, and the validation perplexity before and after; saves the adapter to ``--output_dir``.
"""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import _common as common
from peft import LoraConfig, TaskType, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, HfArgumentParser, TrainingArguments, set_seed

import hf_rmsuon
from hf_rmsuon.routing import LORA_POLICIES

TAG = "finetune_lora"
DEFAULT_OPTIM = "ars2_neo"
MAX_DEFAULT_CONTEXT = 512


@dataclass
class LoraArguments:
    """The base model and the adapter."""

    model_name_or_path: str = field(
        metadata={"help": "Hub model id or local checkpoint directory (e.g. the output_dir of recipes/wikitext2.py)."}
    )
    tokenizer_name: str | None = field(default=None, metadata={"help": "Default: the model's own tokenizer."})
    lora_r: int = field(default=8, metadata={"help": "LoRA rank."})
    lora_alpha: float = field(default=16, metadata={"help": "LoRA scaling numerator (scale = alpha / r)."})
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the LoRA input."})
    target_modules: str = field(
        default="all-linear",
        metadata={"help": "Comma-separated module names to adapt (e.g. q_proj,v_proj), or all-linear."},
    )
    lora_policy: str | None = field(
        default=None,
        metadata={"help": "Which LoRA factors go on the matrix (orthogonalized) track: both, B or none "
                          "(family optimizers only; default: the optimizer's default).",
                  "choices": list(LORA_POLICIES)},
    )


def training_defaults(optim: str) -> dict[str, Any]:
    return {
        **common.common_training_defaults(optim),
        "output_dir": f"runs/{TAG}-{optim}",
        "per_device_train_batch_size": 8,
        "per_device_eval_batch_size": 8,
        "num_train_epochs": 1,
        "eval_strategy": "no",
        "logging_steps": 10,
    }


def parse_args(argv: list[str] | None) -> tuple[LoraArguments, common.DataArguments, TrainingArguments]:
    hf_rmsuon.install()  # before TrainingArguments: makes --optim accept the family names
    optim = common.peek_option(argv, "--optim", DEFAULT_OPTIM)
    parser = HfArgumentParser((LoraArguments, common.DataArguments, TrainingArguments))
    parser.set_defaults(**training_defaults(optim))
    lora_args, data_args, training_args = parser.parse_args_into_dataclasses(args=argv)
    apply_lora_policy(lora_args, training_args)
    return lora_args, data_args, training_args


def apply_lora_policy(lora_args: LoraArguments, training_args: TrainingArguments) -> None:
    """Pass ``--lora_policy`` to the optimizer as the routing option ``lora_policy=...``."""
    if lora_args.lora_policy is None:
        return
    optim = common.optim_name(training_args)
    if optim not in hf_rmsuon.available_optimizers():
        raise common.RecipeError(f"--lora_policy routes LoRA factors of family optimizers; --optim {optim} "
                                 "is not one (see: python -m hf_rmsuon list)")
    existing = training_args.optim_args or ""
    if "lora_policy" in hf_rmsuon.parse_optim_args(optim, existing):
        raise common.RecipeError("lora_policy was given twice (--lora_policy and --optim_args); keep one")
    training_args.optim_args = ",".join(filter(None, [existing, f"lora_policy={lora_args.lora_policy}"]))


def load_base(lora_args: LoraArguments):
    """``(model, tokenizer)`` from the Hub or a local directory; a clear error if neither works."""
    source = lora_args.model_name_or_path
    try:
        tokenizer = AutoTokenizer.from_pretrained(lora_args.tokenizer_name or source)
        model = AutoModelForCausalLM.from_pretrained(source)
    except (OSError, ValueError) as err:
        raise common.RecipeError(
            f"could not load model/tokenizer {source!r}: {str(err).splitlines()[0]}\n"
            "Pass a local checkpoint directory (e.g. the --output_dir of recipes/wikitext2.py, which holds "
            "the model and its tokenizer) or make the Hugging Face Hub reachable."
        ) from None
    common.ensure_pad_token(tokenizer)
    model.config.use_cache = False
    return model, tokenizer


def lora_config(lora_args: LoraArguments) -> LoraConfig:
    targets = lora_args.target_modules.strip()
    target_modules: str | list[str] = (
        targets if targets == "all-linear" else [t.strip() for t in targets.split(",") if t.strip()]
    )
    return LoraConfig(task_type=TaskType.CAUSAL_LM, r=lora_args.lora_r, lora_alpha=lora_args.lora_alpha,
                      lora_dropout=lora_args.lora_dropout, target_modules=target_modules)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the recipe; returns the summary (also written to ``<output_dir>/summary.json``)."""
    lora_args, data_args, training_args = parse_args(argv)
    main_proc = common.is_main_process(training_args)
    set_seed(training_args.seed)
    model, tokenizer = load_base(lora_args)
    max_positions = getattr(model.config, "max_position_embeddings", None) or MAX_DEFAULT_CONTEXT
    context = data_args.context_length or min(MAX_DEFAULT_CONTEXT, max_positions)
    if context > max_positions:
        raise common.RecipeError(f"--context_length {context} exceeds the model's {max_positions} positions")

    with training_args.main_process_first(desc="data"):
        splits = common.load_text_splits(data_args, announce=main_proc)
        data = common.build_lm_data(tokenizer, splits, data_args.data_mode, context)

    model = get_peft_model(model, lora_config(lora_args))
    trainable, total = common.count_parameters(model)
    if main_proc:
        print(f"[{TAG}] data: {splits.source}; {data.mode} mode, context {context}: {len(data.train)} training "
              f"sequences, {len(data.validation)} validation sequences", flush=True)
        print(f"[{TAG}] trainable params: {trainable:,} of {total:,} ({100 * trainable / total:.3f}%) — LoRA r "
              f"{lora_args.lora_r}, alpha {lora_args.lora_alpha:g}, targets {lora_args.target_modules}", flush=True)
        print(f"[{TAG}] optimizer {common.optim_name(training_args)} lr {training_args.learning_rate:g}"
              f"{' optim_args ' + training_args.optim_args if training_args.optim_args else ''}", flush=True)

    trainer = hf_rmsuon.RMSuonTrainer(
        model=model, args=training_args, train_dataset=data.train, eval_dataset=data.validation,
        data_collator=data.collator, processing_class=tokenizer, compute_metrics=common.perplexity_metrics,
        preprocess_logits_for_metrics=common.token_nll_stats, callbacks=[common.RoutingReportCallback()],
    )
    before = trainer.evaluate(metric_key_prefix="before")
    accuracy_before = common.evaluate_tokens(trainer)["token_accuracy"]
    clock = common.Stopwatch()
    train_result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    train_seconds = clock.seconds()
    after = common.final_eval_metrics(trainer)
    tokens = common.evaluate_tokens(trainer)  # next-token accuracy (evaluate's metric when it loads)
    trainer.save_model()  # the adapter (adapter_config.json + adapter_model.safetensors) and the tokenizer

    summary = {
        "recipe": TAG, "optim": common.optim_name(training_args), "optim_args": training_args.optim_args or "",
        "learning_rate": training_args.learning_rate, "model": lora_args.model_name_or_path,
        "data_mode": data.mode, "context_length": context, "data_source": splits.source, "smoke_run": splits.smoke_run,
        "trainable_parameters": trainable, "total_parameters": total, "steps": trainer.state.global_step,
        "train_loss": train_result.training_loss, "eval_perplexity_before": before["before_perplexity"],
        "eval_loss": after["eval_token_loss"], "eval_perplexity": after["eval_perplexity"],
        "token_accuracy_before": accuracy_before, "token_accuracy": tokens["token_accuracy"],
        "accuracy_source": tokens["accuracy_source"],
        "train_seconds": train_seconds, "lora_arguments": asdict(lora_args),
    }
    if main_proc:
        common.write_json(Path(training_args.output_dir) / "summary.json", summary)
        print(common.format_summary(TAG, {
            "optim": summary["optim"], "lora_r": lora_args.lora_r, "lora_policy": lora_args.lora_policy or "default",
            "trainable": trainable, "steps": summary["steps"], "train_loss": summary["train_loss"],
            "eval_ppl_before": summary["eval_perplexity_before"], "eval_ppl": summary["eval_perplexity"],
            "token_acc_before": accuracy_before, "token_acc": tokens["token_accuracy"],
            "adapter": training_args.output_dir,
        }), flush=True)
    return summary


if __name__ == "__main__":
    common.run_main(main, sys.argv[1:])
