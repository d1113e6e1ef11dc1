#!/usr/bin/env python
"""WikiText-2 language modelling with a randomly initialised Qwen3 (RoPE) model (SPEC §7).

    python recipes/wikitext2.py --optim ars2_neo --output_dir runs/wt2              # reference model
    python recipes/wikitext2.py --preset cpu --optim ars2_neo --output_dir runs/demo  # = make demo
    accelerate launch recipes/wikitext2.py --optim rmsuon --optim_args "ns_steps=6" --bf16
    python recipes/wikitext2.py --train_file wiki.train.raw --validation_file wiki.valid.raw
    python recipes/wikitext2.py --protocol reference --optim ars --optim_args "rho=0.1" --learning_rate 1e-4

``--protocol reference`` runs the family's research code's WikiText-2 protocol instead of this
recipe's (see :data:`PROTOCOLS`): the reference model size, *sentence* data mode (the text split on
'.', sentences sorted longest first, those over 256 tokens dropped, padded; batches of similar-length
sentences drawn in random order), constant learning rate, no warm-up, no gradient clipping, and
``perturb_norm=per_tensor`` for the sharpness-aware members. The research code also counts the padding in the loss; that is a separate,
off-by-default switch (``--pad_in_loss``) here, and in padded modes the summary reports perplexity
both over real tokens and with the padding targets counted.

Every ``TrainingArguments`` flag works (``--optim``, ``--optim_args``, ``--learning_rate``,
``--report_to``, ``--bf16``, ``--gradient_accumulation_steps``, ``--max_steps`` …); ``--optim``
takes every family member (``python -m hf_rmsuon list``) as well as transformers' own optimizers.
Data: the Hub's ``wikitext-2-raw-v1`` by default, local text files with ``--train_file`` /
``--validation_file``, and — when the Hub is unreachable and no files were given — the shipped
excerpt, announced as a smoke run. Perplexity = exp(mean next-token loss over real, non-pad tokens).
"""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import _common as common
from transformers import (
    AutoTokenizer,
    HfArgumentParser,
    Qwen3Config,
    Qwen3ForCausalLM,
    TrainingArguments,
    set_seed,
)

import hf_rmsuon

TAG = "wikitext2"


@dataclass(frozen=True)
class Preset:
    """Model size and the training defaults that go with it."""

    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    context_length: int
    vocab_size: int
    batch_size: int
    epochs: float
    logging_steps: int


PRESETS: dict[str, Preset] = {
    # SPEC §7's reference model: hidden 512, 3 layers, 4 heads (no GQA), head_dim 128, MLP 2048,
    # context 255, batch 8, 5 epochs (the seeds' "5 epoch" table).
    "reference": Preset(512, 3, 4, 4, 128, 2048, 255, 16384, 8, 5, 50),
    # Sized for a laptop CPU: `make demo` (3 epochs of the shipped excerpt, ~90 steps) takes about a
    # minute on 2 cores; on the excerpt, validation perplexity stops improving after ~3 epochs.
    "cpu": Preset(128, 2, 4, 4, 32, 512, 128, 4096, 8, 3, 10),
    # For tests: seconds.
    "tiny": Preset(32, 1, 2, 2, 16, 64, 32, 384, 4, 1, 5),
}

DEFAULT_OPTIM = "ars2_neo"

#: ``--protocol``: TrainingArguments / data defaults (each can still be overridden on the command line).
#: ``default``: this recipe's protocol (line mode, cosine schedule with 5% warm-up, the Trainer's
#: gradient clipping at 1.0). ``reference``: the family's research code's WikiText-2 protocol.
PROTOCOLS: dict[str, dict[str, Any]] = {
    "default": {},
    "reference": {
        "data_mode": "sentence",
        "lr_scheduler_type": "constant",
        "warmup_steps": 0,
        "max_grad_norm": 0.0,  # no clipping
        # Length-grouped shuffling (transformers' LengthGroupedSampler: random mega-batches of 50
        # batches, sorted by length inside): batches of similar-length sentences as in the sorted
        # list, in random order. Where the research code shuffles is not known; the literal sorted
        # order (``--train_sampling_strategy sequential``) ends every epoch on 2-token fragments
        # ("S.") and wrecked the model on WT2-offline (AdamW dev perplexity 1.6 M after one epoch),
        # and fully shuffled batches (``random``) pad ~48% of the targets (recorded: ≈7%).
        "train_sampling_strategy": "group_by_length",
    },
}
#: ``--protocol reference``: added to ``--optim_args`` of the members that have the option (unless given)
REFERENCE_OPTIM_ARGS = {"perturb_norm": "per_tensor"}


@dataclass
class ModelArguments:
    """Model size and tokenizer."""

    protocol: str = field(
        default="default",
        metadata={"help": "default: this recipe's protocol; reference: the family's research code's WikiText-2 "
                          "protocol (reference model, sentence mode, constant lr, no clipping, per-tensor "
                          "perturbation norm). Explicit flags still win.",
                  "choices": list(PROTOCOLS)},
    )
    preset: str = field(
        default="reference",
        metadata={"help": "Model size and training defaults: reference (SPEC §7), cpu (make demo), tiny (tests).",
                  "choices": list(PRESETS)},
    )
    tokenizer_name: str | None = field(
        default=None, metadata={"help": "Pretrained tokenizer (Hub name or path) instead of training a BPE one."}
    )
    vocab_size: int | None = field(default=None, metadata={"help": "BPE vocabulary size (default: preset)."})
    tokenizer_cache_dir: str | None = field(
        default=None, metadata={"help": "Where trained tokenizers are cached (default: ~/.cache/hf_rmsuon/tokenizers)."}
    )
    hidden_size: int | None = field(default=None, metadata={"help": "Override the preset."})
    num_hidden_layers: int | None = field(default=None, metadata={"help": "Override the preset."})
    num_attention_heads: int | None = field(default=None, metadata={"help": "Override the preset."})
    num_key_value_heads: int | None = field(default=None, metadata={"help": "Override the preset (GQA if smaller)."})
    head_dim: int | None = field(default=None, metadata={"help": "Override the preset."})
    intermediate_size: int | None = field(default=None, metadata={"help": "Override the preset (MLP width)."})
    tie_word_embeddings: bool = field(default=True, metadata={"help": "Tie the output head to the input embedding."})


def training_defaults(preset_name: str, optim: str) -> dict[str, Any]:
    """TrainingArguments defaults of this recipe (every one can be overridden on the command line)."""
    preset = PRESETS[preset_name]
    return {
        **common.common_training_defaults(optim),
        "output_dir": f"runs/{TAG}-{preset_name}-{optim}",
        "per_device_train_batch_size": preset.batch_size,
        "per_device_eval_batch_size": preset.batch_size,
        "num_train_epochs": preset.epochs,
        "eval_strategy": "epoch",
        "logging_steps": preset.logging_steps,
    }


def reference_optim_args(optim: str, optim_args: str | None) -> str:
    """``optim_args`` with :data:`REFERENCE_OPTIM_ARGS` added for a member that has the option and
    where it was not given."""
    if optim not in hf_rmsuon.available_optimizers():
        return optim_args or ""
    from hf_rmsuon.optim.hparams import parse_optim_args_string

    given = parse_optim_args_string(optim_args)
    schema = hf_rmsuon.get_optimizer_class(optim).schema
    extra = [f"{k}={v}" for k, v in REFERENCE_OPTIM_ARGS.items() if k in schema and k not in given]
    return ",".join([a for a in [optim_args or ""] if a] + extra)


def parse_args(argv: list[str] | None) -> tuple[ModelArguments, common.DataArguments, TrainingArguments]:
    hf_rmsuon.install()  # before TrainingArguments: makes --optim accept the family names
    protocol = common.peek_option(argv, "--protocol", "default", list(PROTOCOLS))
    preset = common.peek_option(argv, "--preset", "reference", list(PRESETS))
    optim = common.peek_option(argv, "--optim", DEFAULT_OPTIM)
    parser = HfArgumentParser((ModelArguments, common.DataArguments, TrainingArguments))
    parser.set_defaults(**{**training_defaults(preset, optim), **PROTOCOLS[protocol]})
    if protocol == "reference":  # before the parse: TrainingArguments checks optim_args in __post_init__
        argv = list(argv) if argv is not None else sys.argv[1:]
        given = common.peek_option(argv, "--optim_args", "")
        merged = reference_optim_args(optim, given)
        if merged != given:
            argv = [a for i, a in enumerate(argv) if not _is_option(argv, i, "--optim_args")] + ["--optim_args", merged]
    model_args, data_args, training_args = parser.parse_args_into_dataclasses(args=argv)
    if data_args.pad_in_loss and data_args.data_mode == "chunk":
        raise common.RecipeError("--pad_in_loss: chunk mode has no padding (use --data_mode sentence or line)")
    return model_args, data_args, training_args


def sampled_order(sequences: list[list[int]], strategy: str, batch_size: int, seed: int) -> list[list[int]]:
    """``sequences`` in the order a first epoch of the Trainer's sampler draws them (an emulation,
    for the padding share printed at the start): ``sequential`` as given; ``group_by_length`` random
    mega-batches of 50 batches, each sorted longest first; anything else a random permutation."""
    if strategy == "sequential":
        return sequences
    import torch

    order = torch.randperm(len(sequences), generator=torch.Generator().manual_seed(seed)).tolist()
    if strategy == "group_by_length":
        mega = 50 * batch_size
        order = [i for k in range(0, len(order), mega)
                 for i in sorted(order[k:k + mega], key=lambda i: len(sequences[i]), reverse=True)]
    return [sequences[i] for i in order]


def _is_option(argv: list[str], i: int, option: str) -> bool:
    """Whether ``argv[i]`` is ``option``, its ``option=value`` form, or the value following ``option``."""
    a = argv[i]
    return a == option or a.startswith(option + "=") or (i > 0 and argv[i - 1] == option)


def get_tokenizer(model_args: ModelArguments, splits: common.TextSplits, main: bool = True, rank: int = 0):
    """A pretrained tokenizer (``--tokenizer_name``) or a BPE tokenizer trained on the training split.

    ``main``: print the tokenizer line; ``rank`` > 0: print a short line saying whether this rank
    trained or loaded the tokenizer (it should load what the main process cached)."""
    if model_args.tokenizer_name:
        tokenizer = AutoTokenizer.from_pretrained(model_args.tokenizer_name)
        common.ensure_pad_token(tokenizer)
        return tokenizer
    vocab_size = model_args.vocab_size or PRESETS[model_args.preset].vocab_size
    tokenizer, path, trained = common.get_bpe_tokenizer(splits.train, vocab_size, model_args.tokenizer_cache_dir)
    how = "trained and cached at" if trained else "reused from cache"
    if main:
        print(f"[{TAG}] tokenizer: byte-level BPE, {len(tokenizer)} tokens, {how} {path}", flush=True)
    elif rank > 0:
        print(f"[{TAG}] rank {rank}: tokenizer {how} {path}", flush=True)
    return tokenizer


def build_model(model_args: ModelArguments, vocab_size: int, context: int, tokenizer) -> Qwen3ForCausalLM:
    """A randomly initialised Qwen3 causal LM of the preset's size (overrides applied)."""
    preset = PRESETS[model_args.preset]
    size = {
        key: getattr(model_args, key) if getattr(model_args, key) is not None else getattr(preset, key)
        for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
                    "intermediate_size")
    }
    config = Qwen3Config(
        vocab_size=vocab_size, max_position_embeddings=context, tie_word_embeddings=model_args.tie_word_embeddings,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id,
        use_cache=False, **size,
    )
    return Qwen3ForCausalLM(config)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the recipe; returns the summary (also written to ``<output_dir>/summary.json``)."""
    model_args, data_args, training_args = parse_args(argv)
    main_proc = common.is_main_process(training_args)
    if data_args.data_mode == "sentence":
        if data_args.context_length is not None:
            raise common.RecipeError("sentence mode: the longest sentence is --sentence_max_tokens, not --context_length")
        context = data_args.sentence_max_tokens
    else:
        context = data_args.context_length or PRESETS[model_args.preset].context_length
    set_seed(training_args.seed)

    # The main process loads the data and trains/caches the tokenizer first; the others then load
    # both from the caches it wrote.
    with training_args.main_process_first(desc="data and tokenizer"):
        splits = common.load_text_splits(data_args, announce=main_proc)
        tokenizer = get_tokenizer(model_args, splits, main_proc, training_args.process_index)
        data = common.build_lm_data(tokenizer, splits, data_args.data_mode, context, data_args.pad_in_loss)

    model = build_model(model_args, len(tokenizer), context, tokenizer)
    _, n_params = common.count_parameters(model)
    if main_proc:
        print(f"[{TAG}] data: {splits.source}; {data.mode} mode, context {context}: "
              f"{len(data.train)} training sequences ({data.train.num_tokens():,} tokens), "
              f"{len(data.validation)} validation sequences ({data.validation.num_tokens():,} tokens)", flush=True)
        for split, stats in data.sentence_stats.items():
            print(f"[{TAG}] sentence mode ({split}): {stats.describe()}", flush=True)
        if data.mode != "chunk":
            strategy = training_args.train_sampling_strategy
            pad = common.padding_fraction(
                sampled_order(data.train.sequences, strategy, training_args.train_batch_size, training_args.seed),
                training_args.train_batch_size)
            print(f"[{TAG}] padding: {pad:.1%} of the training target positions (train_sampling_strategy "
                  f"{strategy}, first epoch); padding "
                  + ("IS COUNTED IN THE LOSS (--pad_in_loss; perplexities with padding are not comparable with "
                     "real-token ones)" if data_args.pad_in_loss else "is excluded from the loss"), flush=True)
        if model_args.protocol != "default":
            schedule = getattr(training_args.lr_scheduler_type, "value", training_args.lr_scheduler_type)
            print(f"[{TAG}] protocol {model_args.protocol}: {data.mode} mode, {schedule} lr, "
                  f"warm-up {training_args.warmup_steps:g}, max_grad_norm {training_args.max_grad_norm:g}, "
                  f"sampling {training_args.train_sampling_strategy}, optim_args {training_args.optim_args!r}",
                  flush=True)
        print(f"[{TAG}] model: Qwen3, {n_params:,} parameters ({model.config.hidden_size} hidden, "
              f"{model.config.num_hidden_layers} layers, {model.config.num_attention_heads} heads); "
              f"optimizer {common.optim_name(training_args)} lr {training_args.learning_rate:g}", flush=True)

    padded_metrics = data.mode == "sentence" or data_args.pad_in_loss
    trainer = hf_rmsuon.RMSuonTrainer(
        model=model, args=training_args, train_dataset=data.train, eval_dataset=data.validation,
        data_collator=data.collator, processing_class=tokenizer,
        compute_metrics=common.padded_perplexity_metrics if padded_metrics else common.perplexity_metrics,
        preprocess_logits_for_metrics=(common.padded_token_nll_stats(tokenizer.pad_token_id) if padded_metrics
                                       else common.token_nll_stats),
        callbacks=[common.RoutingReportCallback()],
    )
    clock = common.Stopwatch()
    train_result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    train_seconds = clock.seconds()
    metrics = common.final_eval_metrics(trainer)
    trainer.save_model()  # model + tokenizer: a checkpoint recipes/finetune_lora.py can start from

    summary = {
        "recipe": TAG, "optim": common.optim_name(training_args), "optim_args": training_args.optim_args or "",
        "learning_rate": training_args.learning_rate, "preset": model_args.preset, "data_mode": data.mode,
        "context_length": context, "data_source": splits.source, "smoke_run": splits.smoke_run,
        "parameters": n_params, "steps": trainer.state.global_step, "epochs": trainer.state.epoch,
        "train_loss": train_result.training_loss, "eval_loss": metrics["eval_token_loss"],
        "eval_perplexity": metrics["eval_perplexity"], "eval_tokens": int(metrics["eval_tokens"]),
        "train_seconds": train_seconds, "world_size": training_args.world_size,
        "model_arguments": asdict(model_args), "protocol": model_args.protocol, "pad_in_loss": data_args.pad_in_loss,
        "lr_scheduler_type": str(getattr(training_args.lr_scheduler_type, "value", training_args.lr_scheduler_type)),
        "max_grad_norm": training_args.max_grad_norm,
    }
    if padded_metrics:
        summary["eval_perplexity_with_padding"] = metrics["eval_perplexity_with_padding"]
        summary["eval_padding_fraction"] = metrics["eval_padding_fraction"]
    if data.sentence_stats:
        summary["sentence_stats"] = {k: asdict(v) for k, v in data.sentence_stats.items()}
    if main_proc:
        common.write_json(Path(training_args.output_dir) / "summary.json", summary)
        print(common.format_summary(TAG, {
            "optim": summary["optim"], "preset": model_args.preset, "mode": data.mode,
            "data": splits.kind, "steps": summary["steps"],
            "train_loss": summary["train_loss"], "eval_loss": summary["eval_loss"],
            "eval_ppl": summary["eval_perplexity"],
            **({"eval_ppl_with_padding": summary["eval_perplexity_with_padding"],
                "pad_in_loss": data_args.pad_in_loss} if padded_metrics else {}),
            "protocol": model_args.protocol, "train_time_s": round(train_seconds, 1),
            "output_dir": training_args.output_dir,
        }), flush=True)
    return summary


if __name__ == "__main__":
    common.run_main(main, sys.argv[1:])
