#!/usr/bin/env python
"""Supervised fine-tuning (TRL ``SFTTrainer``) of a causal LM with a PEFT LoRA adapter and any
optimizer of the family (``pip install -e ".[trl]"``).

    # the Hub: a model and a chat dataset ("messages" column; TRL applies the chat template)
    python recipes/sft_lora.py --model_name_or_path Qwen/Qwen3-0.6B --dataset_name trl-lib/Capybara \\
        --optim ars2_neo --optim_args "k=5" --output_dir runs/sft
    # local files: a model directory and JSON Lines with "messages", "text" or "prompt"/"completion"
    python recipes/sft_lora.py --model_name_or_path runs/demo --train_file train.jsonl \\
        --validation_file valid.jsonl --optim ada_rmsuon --output_dir runs/sft-local
    # two processes on a CPU-only machine (DDP): --use_cpu is needed, or accelerate starts two
    # independent runs; on GPUs drop --use_cpu
    accelerate launch --multi_gpu --num_processes 2 recipes/sft_lora.py ... --use_cpu

The learning rate defaults to the optimizer's recommended rate (``python -m hf_rmsuon list``).
Reports the validation loss and next-token accuracy on the completion tokens before and after
training; the accuracy is computed with ``evaluate``'s ``accuracy`` metric when it can be loaded
(it needs the Hub once, then its cache) and with the same formula (correct / counted) otherwise.
"""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import _common as common
from peft import LoraConfig, TaskType
from transformers import AutoModelForCausalLM, AutoTokenizer, HfArgumentParser, set_seed

import hf_rmsuon

try:
    from trl import SFTConfig, SFTTrainer
except ImportError:  # pragma: no cover - the error below says how to install it
    SFTConfig = SFTTrainer = None

TAG = "sft_lora"
DEFAULT_OPTIM = "ars2_neo"
DEFAULT_MODEL = "Qwen/Qwen3-0.6B"
DEFAULT_DATASET = "trl-lib/Capybara"


@dataclass
class SFTRecipeArguments:
    """The base model, the data and the adapter."""

    model_name_or_path: str = field(default=DEFAULT_MODEL, metadata={"help": "Hub model id or local directory."})
    dataset_name: str = field(default=DEFAULT_DATASET, metadata={
        "help": "Hub dataset in a TRL format (messages, text, or prompt/completion)."})
    dataset_config_name: str | None = field(default=None, metadata={"help": "Hub dataset configuration."})
    train_file: str | None = field(default=None, metadata={
        "help": "Local JSON Lines training file (skips the Hub): one object per line with 'messages', "
                "'text' or 'prompt'/'completion'."})
    validation_file: str | None = field(default=None, metadata={
        "help": "Local validation file (default: the last --validation_split_percentage of training rows)."})
    validation_split_percentage: int = field(default=5, metadata={"help": "Rows held out without a validation split."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Use only the first N training rows."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Use only the first N validation rows."})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: float = field(default=32, metadata={"help": "LoRA scaling numerator (scale = alpha / r)."})
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the LoRA input."})
    target_modules: str = field(default="all-linear", metadata={"help": "Comma-separated module names, or all-linear."})


# --------------------------------------------------------------------------------------------------
# model and data
# --------------------------------------------------------------------------------------------------


def load_model(args: SFTRecipeArguments):
    """``(model, tokenizer)`` from the Hub or a local directory; a clear error if neither works."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(args.model_name_or_path)
        model = AutoModelForCausalLM.from_pretrained(args.model_name_or_path)
    except (OSError, ValueError) as err:
        raise common.RecipeError(
            f"could not load model/tokenizer {args.model_name_or_path!r}: {str(err).splitlines()[0]}\n"
            "Pass a local model directory (with its tokenizer) or make the Hugging Face Hub reachable."
        ) from None
    common.ensure_pad_token(tokenizer)
    return model, tokenizer


def load_data(args: SFTRecipeArguments):
    """``(train, validation, source)`` datasets in a TRL format, from local files or the Hub."""
    import datasets

    try:
        if args.train_file:
            files = {"train": args.train_file}
            if args.validation_file:
                files["validation"] = args.validation_file
            data = datasets.load_dataset("json", data_files=files)
            source = f"local {args.train_file}"
        elif args.validation_file:
            raise common.RecipeError("--validation_file needs --train_file")
        else:
            data = datasets.load_dataset(args.dataset_name, args.dataset_config_name)
            source = f"hub {args.dataset_name}"
    except common.RecipeError:
        raise
    except Exception as err:  # datasets raises many types for "missing / unreachable / malformed"
        raise common.RecipeError(
            f"could not load the data ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}).\n"
            "Make the Hub reachable, or pass local JSON Lines files: --train_file PATH [--validation_file PATH] "
            "(one object per line with 'messages', 'text' or 'prompt'/'completion')."
        ) from None
    train = data["train"]
    validation = data.get("validation") or data.get("test")
    if validation is None:
        split = train.train_test_split(test_size=args.validation_split_percentage / 100, shuffle=False)
        train, validation = split["train"], split["test"]
        source += f" (last {args.validation_split_percentage}% held out)"
    if args.max_train_samples is not None:
        train = train.select(range(min(args.max_train_samples, len(train))))
    if args.max_eval_samples is not None:
        validation = validation.select(range(min(args.max_eval_samples, len(validation))))
    return train, validation, source


def lora_config(args: SFTRecipeArguments) -> LoraConfig:
    targets = args.target_modules.strip()
    modules: str | list[str] = targets if targets == "all-linear" else [t.strip() for t in targets.split(",") if t]
    return LoraConfig(task_type=TaskType.CAUSAL_LM, r=args.lora_r, lora_alpha=args.lora_alpha,
                      lora_dropout=args.lora_dropout, target_modules=modules)


def parse_args(argv: list[str] | None) -> tuple[SFTRecipeArguments, Any]:
    if SFTConfig is None:
        raise common.RecipeError('this recipe needs TRL: pip install -e ".[trl]"  (or pip install trl evaluate)')
    optim = common.peek_option(argv, "--optim", DEFAULT_OPTIM)
    parser = HfArgumentParser((SFTRecipeArguments, SFTConfig))
    parser.set_defaults(**{
        **common.common_training_defaults(optim),
        "output_dir": f"runs/{TAG}-{optim}", "per_device_train_batch_size": 4, "per_device_eval_batch_size": 4,
        "num_train_epochs": 1, "eval_strategy": "no", "logging_steps": 10, "max_length": 1024,
        "label_names": ["labels"],
    })
    recipe_args, sft_args = parser.parse_args_into_dataclasses(args=argv)
    return recipe_args, sft_args


class RMSuonSFTTrainer(hf_rmsuon.RMSuonTrainer, SFTTrainer or object):
    """TRL's SFTTrainer with the family's optimizers, SAM second pass and diagnostics."""


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the recipe; returns the summary (also written to ``<output_dir>/summary.json``)."""
    hf_rmsuon.install()  # --optim accepts the family; "did you mean" for typos
    recipe_args, sft_args = parse_args(argv)
    main_proc = common.is_main_process(sft_args)
    set_seed(sft_args.seed)
    model, tokenizer = load_model(recipe_args)
    with sft_args.main_process_first(desc="data"):
        train, validation, source = load_data(recipe_args)
    trainer = RMSuonSFTTrainer(model=model, args=sft_args, train_dataset=train, eval_dataset=validation,
                               processing_class=tokenizer, peft_config=lora_config(recipe_args),
                               callbacks=[common.RoutingReportCallback()])
    trainable, total = common.count_parameters(trainer.model)
    if main_proc:
        print(f"[{TAG}] data: {source}; {len(train)} training rows, {len(validation)} validation rows", flush=True)
        print(f"[{TAG}] trainable params: {trainable:,} of {total:,} ({100 * trainable / total:.3f}%) — LoRA r "
              f"{recipe_args.lora_r}; optimizer {common.optim_name(sft_args)} lr {sft_args.learning_rate:g}"
              f"{' optim_args ' + sft_args.optim_args if sft_args.optim_args else ''}", flush=True)
    before = common.evaluate_tokens(trainer)
    clock = common.Stopwatch()
    result = trainer.train(resume_from_checkpoint=sft_args.resume_from_checkpoint)
    seconds = clock.seconds()
    after = common.evaluate_tokens(trainer)
    trainer.save_model()
    summary = {
        "recipe": TAG, "optim": common.optim_name(sft_args), "optim_args": sft_args.optim_args or "",
        "learning_rate": sft_args.learning_rate, "model": recipe_args.model_name_or_path, "data_source": source,
        "trainable_parameters": trainable, "total_parameters": total, "steps": trainer.state.global_step,
        "train_loss": result.training_loss, "eval_loss_before": before["loss"], "eval_loss": after["loss"],
        "token_accuracy_before": before["token_accuracy"], "token_accuracy": after["token_accuracy"],
        "accuracy_source": after["accuracy_source"], "eval_tokens": after["tokens"], "train_seconds": seconds,
        "recipe_arguments": asdict(recipe_args),
    }
    if main_proc:
        common.write_json(Path(sft_args.output_dir) / "summary.json", summary)
        print(common.format_summary(TAG, {
            "optim": summary["optim"], "steps": summary["steps"], "train_loss": summary["train_loss"],
            "eval_loss_before": before["loss"], "eval_loss": after["loss"],
            "token_acc_before": before["token_accuracy"], "token_acc": after["token_accuracy"],
            "accuracy_via": after["accuracy_source"], "adapter": sft_args.output_dir,
        }), flush=True)
    return summary


if __name__ == "__main__":
    common.run_main(main, sys.argv[1:])
