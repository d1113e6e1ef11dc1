"""Shared plumbing of the language-model recipes (``wikitext2.py``, ``finetune_lora.py``).

* text data: the Hub (``datasets.load_dataset``), local text files, or — when the Hub cannot be
  reached and nothing local was given — the WikiText-2 excerpt shipped in ``recipes/data`` with a
  loud smoke-run notice;
* a byte-level BPE tokenizer trained with ``tokenizers`` and cached on disk by a hash of its data;
* the data modes: *line* (lines packed greedily into sequences ≤ context, padded, padding
  excluded from the loss), *chunk* (one token stream cut into exact context-length blocks) and
  *sentence* (the family's research code's WikiText-2 mode: the text split on '.', sentences sorted
  longest first, those over 256 tokens dropped, padded — see :func:`sentence_sequences`);
* the research code's *padding in the loss* as an explicit, off-by-default switch (``--pad_in_loss``);
* perplexity over real tokens, computed inside the Trainer's evaluation loop (exact under
  multi-process evaluation), and — for padded data — also with the padding targets counted;
* Trainer callbacks and the end-of-run summary.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
import torch.nn.functional as F
from huggingface_hub import constants as hub_constants
from huggingface_hub import get_session, is_offline_mode
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast, TrainerCallback, TrainingArguments

RECIPES_DIR = Path(__file__).resolve().parent
EXCERPT_TRAIN = RECIPES_DIR / "data" / "wikitext2-excerpt.train.txt"
EXCERPT_VALIDATION = RECIPES_DIR / "data" / "wikitext2-excerpt.validation.txt"
DEFAULT_DATASET = ("wikitext", "wikitext-2-raw-v1")
DATA_MODES = ("line", "chunk", "sentence")
#: sentence mode: longest sentence kept, in tokens (the research code's cut)
SENTENCE_MAX_TOKENS = 256
IGNORE_INDEX = -100
EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
#: Bump when the tokenizer recipe changes, so old cache entries are not reused.
TOKENIZER_FORMAT = "bytelevel-bpe-v1"
#: How many tokenizers this process has trained (tests read it to check the cache is used).
TOKENIZER_TRAININGS = 0


class RecipeError(Exception):
    """A user-facing error: printed as one message, without a stack trace."""


# --------------------------------------------------------------------------------------------------
# arguments shared by the language-model recipes
# --------------------------------------------------------------------------------------------------


@dataclass
class DataArguments:
    """Where the text comes from and how it becomes training sequences."""

    dataset_name: str = field(
        default=DEFAULT_DATASET[0], metadata={"help": "Hub dataset with a 'text' column (default: wikitext)."}
    )
    dataset_config_name: str | None = field(
        default=DEFAULT_DATASET[1], metadata={"help": "Hub dataset configuration (default: wikitext-2-raw-v1)."}
    )
    train_file: str | None = field(
        default=None, metadata={"help": "Local plain-text training file, one sample per line (skips the Hub)."}
    )
    validation_file: str | None = field(
        default=None,
        metadata={"help": "Local plain-text validation file (default with --train_file: the last "
                          "--validation_split_percentage of the training lines)."},
    )
    validation_split_percentage: int = field(
        default=5, metadata={"help": "Share of training lines held out when there is no validation split."}
    )
    use_excerpt: bool = field(
        default=False,
        metadata={"help": "Skip the Hub and train on the WikiText-2 excerpt shipped in recipes/data "
                          "(a smoke run, like the automatic offline fallback)."},
    )
    data_mode: str = field(
        default="line",
        metadata={"help": "line: lines packed greedily into sequences <= context, padded, padding "
                          "excluded from the loss; chunk: one token stream cut into exact context blocks; "
                          "sentence: the family's research code's mode (text split on '.', sentences sorted "
                          "longest first, those over --sentence_max_tokens dropped, one padded sentence per "
                          "sequence).",
                  "choices": list(DATA_MODES)},
    )
    sentence_max_tokens: int = field(
        default=SENTENCE_MAX_TOKENS,
        metadata={"help": "Sentence mode: drop sentences longer than this many tokens (research code: 256)."},
    )
    pad_in_loss: bool = field(
        default=False,
        metadata={"help": "COUNT PADDING IN THE LOSS (off by default). The research code's sentence mode "
                          "trains and evaluates on the padding targets too (~7%% of its target positions), "
                          "which lowers its perplexities: they are then not comparable with real-token ones. "
                          "The summary reports perplexity both with and without padding either way."},
    )
    context_length: int | None = field(default=None, metadata={"help": "Tokens per sequence (default: preset)."})
    max_train_lines: int | None = field(default=None, metadata={"help": "Use only the first N training lines."})
    max_eval_lines: int | None = field(default=None, metadata={"help": "Use only the first N validation lines."})


# --------------------------------------------------------------------------------------------------
# console output
# --------------------------------------------------------------------------------------------------


def is_main_process(args: TrainingArguments | None = None) -> bool:
    """Rank 0 (also true outside distributed runs)."""
    if args is not None:
        return args.process_index == 0
    return int(os.environ.get("RANK", "0")) == 0


def banner(title: str, lines: Sequence[str], width: int = 88) -> str:
    """A loud, boxed notice."""
    bar = "!" * width
    body = [f"!!  {title}", "!!"] + [f"!!  {line}" for line in lines]
    return "\n".join(["", bar, *body, bar, ""])


def smoke_run_notice(reason: str) -> str:
    return banner(
        "SMOKE RUN — training on the small WikiText-2 excerpt shipped in recipes/data",
        [
            f"why: {reason}",
            "The excerpt (~18k words, CC BY-SA 3.0, Merity et al. 2016) only shows that the pipeline",
            "works end to end. Its perplexities are NOT WikiText-2 results.",
            "For a real run: let the recipe reach the Hugging Face Hub (dataset wikitext-2-raw-v1),",
            "or pass local text files (one sample per line):",
            "    --train_file PATH/wiki.train.raw --validation_file PATH/wiki.valid.raw",
        ],
    )


def peek_option(argv: Sequence[str] | None, option: str, default: str, choices: Sequence[str] | None = None) -> str:
    """The value of ``--option`` in ``argv`` ahead of the full parse (it chooses other defaults)."""
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)  # "--optim" must not match "--optim_args"
    pre.add_argument(option, default=default, choices=choices)
    known, _ = pre.parse_known_args(list(argv) if argv is not None else sys.argv[1:])
    return getattr(known, option.lstrip("-"))


def run_main(main: Callable[[list[str] | None], Any], argv: list[str] | None = None) -> Any:
    """Run a recipe's ``main``; a :class:`RecipeError` becomes one ``error:`` line and exit status 2."""
    try:
        return main(argv)
    except RecipeError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None


# --------------------------------------------------------------------------------------------------
# text data
# --------------------------------------------------------------------------------------------------


@dataclass
class TextSplits:
    """Training and validation lines (stripped, non-empty) and where they came from."""

    train: list[str]
    validation: list[str]
    source: str
    smoke_run: bool = False

    @property
    def kind(self) -> str:
        """``hub``, ``local`` or ``excerpt(smoke)`` — for the summary line."""
        if self.smoke_run:
            return "excerpt(smoke)"
        return "local" if self.source.startswith("local") else "hub"


def clean_lines(lines: Iterable[str]) -> list[str]:
    """Strip each line and drop empty ones."""
    return [s for s in (line.strip() for line in lines) if s]


def read_text_file(path: str | Path) -> list[str]:
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"text file not found: {path}")
    with path.open(encoding="utf-8") as fh:
        return clean_lines(fh)


def hold_out(lines: list[str], percentage: int) -> tuple[list[str], list[str]]:
    """Split off the last ``percentage`` % of ``lines`` (at least one line) as validation."""
    if len(lines) < 2:
        raise RecipeError("need at least two lines of text to hold out a validation split")
    n_val = max(1, len(lines) * percentage // 100)
    return lines[:-n_val], lines[-n_val:]


class HubUnavailable(Exception):
    """The Hub could not be reached, or the dataset could not be loaded from it."""


def probe_hub(timeout: float = 5.0) -> str | None:
    """``None`` if the Hub endpoint answers, else the reason. Fast, no retries (``load_dataset``
    retries for ~25 s before it gives up on an unreachable Hub)."""
    try:
        get_session().head(hub_constants.ENDPOINT, timeout=timeout)
    except Exception as err:  # any transport failure means "unreachable"
        return f"{hub_constants.ENDPOINT} is unreachable ({type(err).__name__}: {err})"
    return None


def load_hub_lines(name: str, config: str | None) -> dict[str, list[str]]:
    """``{split: lines}`` of a Hub dataset with a ``text`` column; raises :class:`HubUnavailable`."""
    offline = is_offline_mode() or bool(datasets.config.HF_DATASETS_OFFLINE)
    if not offline:
        reason = probe_hub()
        if reason is not None:
            raise HubUnavailable(reason)
    try:
        dataset = datasets.load_dataset(name, config)
    except Exception as err:  # datasets raises many types for "not reachable / not cached"
        mode = " in offline mode (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE)" if offline else ""
        raise HubUnavailable(f"load_dataset({name!r}, {config!r}) failed{mode}: {type(err).__name__}: "
                             f"{str(err).splitlines()[0] if str(err) else ''}") from err
    splits = {}
    for split, data in dataset.items():
        if "text" not in data.column_names:
            raise RecipeError(f"dataset {name!r} split {split!r} has no 'text' column (columns: {data.column_names})")
        splits[split] = clean_lines(data["text"])
    return splits


def load_text_splits(data: DataArguments, announce: bool = True) -> TextSplits:
    """Training and validation lines from local files, the Hub, or the shipped excerpt (see module doc).

    ``announce``: print the smoke-run notice (pass ``False`` on non-main processes).
    """
    if data.train_file:
        train = read_text_file(data.train_file)
        if data.validation_file:
            splits = TextSplits(train, read_text_file(data.validation_file), f"local files {data.train_file}")
        else:
            train, validation = hold_out(train, data.validation_split_percentage)
            splits = TextSplits(train, validation, f"local file {data.train_file} "
                                                   f"(last {data.validation_split_percentage}% held out)")
    elif data.validation_file:
        raise RecipeError("--validation_file needs --train_file")
    elif data.use_excerpt:
        splits = excerpt_splits("--use_excerpt was given", announce)
    else:
        try:
            hub = load_hub_lines(data.dataset_name, data.dataset_config_name)
        except HubUnavailable as err:
            if (data.dataset_name, data.dataset_config_name) not in (DEFAULT_DATASET, ("wikitext", "wikitext-2-v1")):
                raise RecipeError(
                    f"{err}\nThe shipped excerpt stands in only for WikiText-2. Pass local text files instead: "
                    "--train_file PATH --validation_file PATH (plain text, one sample per line)."
                ) from None
            splits = excerpt_splits(str(err), announce)
        else:
            if "train" not in hub:
                raise RecipeError(f"dataset {data.dataset_name!r} has no 'train' split (splits: {list(hub)})")
            train = hub["train"]
            validation = hub.get("validation")
            source = f"hub {data.dataset_name}/{data.dataset_config_name}"
            if validation is None:
                train, validation = hold_out(train, data.validation_split_percentage)
                source += f" (last {data.validation_split_percentage}% of train held out)"
            splits = TextSplits(train, validation, source)
    if data.max_train_lines is not None:
        splits.train = splits.train[: data.max_train_lines]
    if data.max_eval_lines is not None:
        splits.validation = splits.validation[: data.max_eval_lines]
    if not splits.train or not splits.validation:
        raise RecipeError(f"no text left in {'training' if not splits.train else 'validation'} data ({splits.source})")
    return splits


def excerpt_splits(reason: str, announce: bool = True) -> TextSplits:
    """The shipped WikiText-2 excerpt, announced loudly as a smoke run."""
    if announce:
        print(smoke_run_notice(reason), flush=True)
    return TextSplits(read_text_file(EXCERPT_TRAIN), read_text_file(EXCERPT_VALIDATION),
                      "shipped WikiText-2 excerpt (smoke run)", smoke_run=True)


# --------------------------------------------------------------------------------------------------
# tokenizer
# --------------------------------------------------------------------------------------------------


def default_cache_dir() -> Path:
    """``$HF_RMSUON_CACHE`` or ``~/.cache/hf_rmsuon``."""
    return Path(os.environ.get("HF_RMSUON_CACHE", Path.home() / ".cache" / "hf_rmsuon"))


def tokenizer_cache_key(lines: Sequence[str], vocab_size: int, min_frequency: int) -> str:
    """Hash of everything the trained tokenizer depends on."""
    digest = hashlib.sha256(f"{TOKENIZER_FORMAT}|{vocab_size}|{min_frequency}\n".encode())
    for line in lines:
        digest.update(line.encode("utf-8"))
        digest.update(b"\n")
    return digest.hexdigest()[:20]


def train_bpe_tokenizer(lines: Sequence[str], vocab_size: int, min_frequency: int = 2) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer (GPT-2 style: no unknown tokens) on ``lines``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    global TOKENIZER_TRAININGS
    TOKENIZER_TRAININGS += 1
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=[EOS_TOKEN, PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(lines, trainer=trainer, length=len(lines))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS_TOKEN, bos_token=EOS_TOKEN,
                                   pad_token=PAD_TOKEN, model_max_length=1_000_000)


def get_bpe_tokenizer(
    lines: Sequence[str], vocab_size: int, cache_dir: str | Path | None = None, min_frequency: int = 2
) -> tuple[PreTrainedTokenizerFast, Path, bool]:
    """The BPE tokenizer for ``lines``: loaded from the cache, or trained and cached.

    Returns ``(tokenizer, cache_path, trained)``. The cache entry is written atomically (a temporary
    directory renamed into place), so concurrent processes never read a half-written tokenizer; in
    multi-process runs call this on the main process first (``TrainingArguments.main_process_first``).
    """
    cache_root = Path(cache_dir) if cache_dir else default_cache_dir() / "tokenizers"
    path = cache_root / f"bpe-v{vocab_size}-{tokenizer_cache_key(lines, vocab_size, min_frequency)}"
    if (path / "tokenizer.json").is_file():
        return PreTrainedTokenizerFast.from_pretrained(str(path)), path, False
    tokenizer = train_bpe_tokenizer(lines, vocab_size, min_frequency)
    cache_root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}-", dir=cache_root))
    tokenizer.save_pretrained(str(tmp))
    try:
        os.rename(tmp, path)
    except OSError:  # another process cached the same tokenizer first: keep theirs
        shutil.rmtree(tmp, ignore_errors=True)
    return tokenizer, path, True


def ensure_pad_token(tokenizer: PreTrainedTokenizerBase) -> None:
    """Give a pretrained tokenizer without a pad token one (its EOS); padding never reaches the loss."""
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token is None:
            raise RecipeError("the tokenizer has neither a pad nor an EOS token")
        tokenizer.pad_token = tokenizer.eos_token


def tokenize_lines(tokenizer: PreTrainedTokenizerBase, lines: Sequence[str]) -> list[list[int]]:
    """Token ids of each line, without special tokens."""
    if not lines:
        return []
    return tokenizer(list(lines), add_special_tokens=False)["input_ids"]


# --------------------------------------------------------------------------------------------------
# data modes
# --------------------------------------------------------------------------------------------------


def pack_lines(token_lines: Iterable[Sequence[int]], context: int, eos_id: int) -> list[list[int]]:
    """*Line* mode: each line plus an EOS, packed greedily, in order, into sequences of at most
    ``context`` tokens. A line longer than ``context`` is cut into ``context``-sized pieces.
    Deterministic: the same lines give the same sequences."""
    if context < 1:
        raise ValueError("context must be >= 1")
    sequences: list[list[int]] = []
    current: list[int] = []
    for ids in token_lines:
        item = [*ids, eos_id]
        for start in range(0, len(item), context):
            piece = item[start:start + context]
            if len(current) + len(piece) > context:
                sequences.append(current)
                current = []
            current.extend(piece)
    if current:
        sequences.append(current)
    return sequences


def chunk_tokens(token_lines: Iterable[Sequence[int]], context: int, eos_id: int) -> list[list[int]]:
    """*Chunk* mode: all lines (each followed by an EOS) as one stream, cut into blocks of exactly
    ``context`` tokens; the incomplete tail is dropped."""
    stream = [tok for ids in token_lines for tok in (*ids, eos_id)]
    return [stream[i:i + context] for i in range(0, len(stream) - context + 1, context)]


def split_sentences(lines: Iterable[str]) -> list[str]:
    """*Sentence* mode, step 1: the whole text (lines joined by a space) split on '.'; each piece
    keeps its period, is stripped, and empty pieces are dropped. (Lines without a period — WikiText
    headings — run into the next sentence, as they do when the text is split on '.'.)"""
    text = " ".join(line.strip() for line in lines)
    pieces = text.split(".")
    sentences = [piece + "." for piece in pieces[:-1]] + [pieces[-1]] if pieces else []
    return [s for s in (p.strip() for p in sentences) if s and s != "."]


@dataclass
class SentenceStats:
    """What sentence mode kept and dropped (for the run's log and summary)."""

    sentences: int
    kept: int
    dropped_too_long: int
    max_tokens: int

    def describe(self) -> str:
        return (f"{self.sentences} sentences, {self.dropped_too_long} longer than {self.max_tokens} tokens dropped, "
                f"{self.kept} kept (sorted longest first)")


def sentence_sequences(token_sentences: Sequence[Sequence[int]], max_tokens: int = SENTENCE_MAX_TOKENS
                       ) -> tuple[list[list[int]], SentenceStats]:
    """*Sentence* mode, step 2 — the family's research code's WikiText-2 mode: one sentence per
    sequence (its tokens only, no EOS added), sentences longer than ``max_tokens`` dropped, empty
    ones dropped, the rest sorted by token length, longest first (ties keep text order). Batches are
    then padded to their longest sentence by the collator. Deterministic."""
    if max_tokens < 2:
        raise RecipeError("--sentence_max_tokens must be >= 2")
    kept = [list(ids) for ids in token_sentences if 0 < len(ids) <= max_tokens]
    too_long = sum(1 for ids in token_sentences if len(ids) > max_tokens)
    kept.sort(key=len, reverse=True)  # stable: equal lengths keep their order in the text
    return kept, SentenceStats(len(token_sentences), len(kept), too_long, max_tokens)


def build_sequences(token_lines: list[list[int]], mode: str, context: int, eos_id: int, split: str) -> list[list[int]]:
    if mode not in DATA_MODES:
        raise RecipeError(f"--data_mode must be one of {list(DATA_MODES)}, not {mode!r}")
    if mode == "sentence":
        seqs = sentence_sequences(token_lines, context)[0]
    else:
        seqs = (pack_lines(token_lines, context, eos_id) if mode == "line"
                else chunk_tokens(token_lines, context, eos_id))
    if not seqs:
        n = sum(len(t) + 1 for t in token_lines)
        raise RecipeError(f"the {split} split has {n} tokens, fewer than one {context}-token chunk; "
                          "use --data_mode line, a smaller --context_length, or more data")
    return seqs


class SequenceDataset(torch.utils.data.Dataset):
    """Token-id sequences as Trainer samples (``{"input_ids": [...]}``)."""

    def __init__(self, sequences: list[list[int]]):
        self.sequences = sequences

    def __len__(self) -> int:
        return len(self.sequences)

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        return {"input_ids": self.sequences[index]}

    def num_tokens(self) -> int:
        return sum(len(s) for s in self.sequences)


@dataclass
class CausalLMCollator:
    """Right-pads a batch to its longest sequence: ``attention_mask`` 0 and ``labels`` -100 at the
    padding, so padded positions never reach the loss. (Labels are not shifted here; the model
    shifts them.) Chunk-mode batches have equal lengths and get no padding.

    ``pad_in_loss=True`` (the research code's sentence mode; off by default): the padding keeps its
    pad-token label, so the padding targets are trained on and counted in the loss."""

    pad_token_id: int
    pad_in_loss: bool = False

    def __call__(self, samples: list[dict[str, Sequence[int]]]) -> dict[str, torch.Tensor]:
        longest = max(len(s["input_ids"]) for s in samples)
        input_ids = torch.full((len(samples), longest), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(samples), longest), dtype=torch.long)
        for row, sample in enumerate(samples):
            ids = torch.as_tensor(sample["input_ids"], dtype=torch.long)
            input_ids[row, : len(ids)] = ids
            attention_mask[row, : len(ids)] = 1
        labels = input_ids.clone() if self.pad_in_loss else input_ids.masked_fill(attention_mask == 0, IGNORE_INDEX)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


@dataclass
class LMData:
    train: SequenceDataset
    validation: SequenceDataset
    collator: CausalLMCollator
    context: int
    mode: str
    #: sentence mode: {"train": SentenceStats, "validation": SentenceStats}
    sentence_stats: dict[str, SentenceStats] = field(default_factory=dict)


def build_lm_data(tokenizer: PreTrainedTokenizerBase, splits: TextSplits, mode: str, context: int,
                  pad_in_loss: bool = False) -> LMData:
    """Tokenize both splits and turn them into training sequences in ``mode``.

    Sentence mode: ``context`` is the longest sentence kept (``--sentence_max_tokens``); the splits
    are first cut into sentences (:func:`split_sentences`). ``pad_in_loss``: see :class:`CausalLMCollator`."""
    if tokenizer.eos_token_id is None:
        raise RecipeError("the tokenizer has no EOS token (needed to separate lines)")
    ensure_pad_token(tokenizer)
    eos = tokenizer.eos_token_id
    if pad_in_loss and tokenizer.pad_token_id == eos:
        raise RecipeError("--pad_in_loss needs a pad token distinct from EOS (padding would be indistinguishable "
                          "from real end-of-text targets)")
    stats: dict[str, SentenceStats] = {}
    seqs = {}
    for split, lines in (("training", splits.train), ("validation", splits.validation)):
        if mode == "sentence":
            seqs[split], stats[split] = sentence_sequences(tokenize_lines(tokenizer, split_sentences(lines)), context)
            if not seqs[split]:
                raise RecipeError(f"sentence mode: no sentence of the {split} split has 1..{context} tokens")
        else:
            seqs[split] = build_sequences(tokenize_lines(tokenizer, lines), mode, context, eos, split)
    return LMData(SequenceDataset(seqs["training"]), SequenceDataset(seqs["validation"]),
                  CausalLMCollator(tokenizer.pad_token_id, pad_in_loss), context, mode,
                  {"train": stats["training"], "validation": stats["validation"]} if stats else {})


def padding_fraction(sequences: Sequence[Sequence[int]], batch_size: int) -> float:
    """Share of next-token target positions that are padding when ``sequences`` are batched in this
    order, ``batch_size`` at a time, each batch right-padded to its longest (targets: positions 1..L-1)."""
    pad = total = 0
    for start in range(0, len(sequences), batch_size):
        lengths = [len(s) for s in sequences[start:start + batch_size]]
        longest = max(lengths)
        total += len(lengths) * (longest - 1)
        pad += sum(longest - n for n in lengths)
    return pad / max(total, 1)


# --------------------------------------------------------------------------------------------------
# perplexity over real tokens
# --------------------------------------------------------------------------------------------------


def token_nll_stats(logits: torch.Tensor | tuple, labels: torch.Tensor) -> torch.Tensor:
    """``preprocess_logits_for_metrics``: per sequence ``[summed next-token NLL, number of real
    target tokens]``, so that ``compute_metrics`` never holds the full logits."""
    if isinstance(logits, tuple):
        logits = logits[0]
    shift_logits = logits[:, :-1, :].float()
    shift_labels = labels[:, 1:]
    nll = F.cross_entropy(shift_logits.transpose(1, 2), shift_labels, ignore_index=IGNORE_INDEX, reduction="none")
    counts = (shift_labels != IGNORE_INDEX).sum(dim=1)
    return torch.stack([nll.sum(dim=1), counts.to(nll.dtype)], dim=1)


def padded_token_nll_stats(pad_token_id: int) -> Callable[[torch.Tensor | tuple, torch.Tensor], torch.Tensor]:
    """``preprocess_logits_for_metrics`` for padded data: per sequence ``[NLL of real targets, real
    targets, NLL of padding targets, padding targets]``. Padding targets are the positions labelled
    -100 or ``pad_token_id`` (so this works whether or not ``--pad_in_loss`` is on); their target is
    the pad token."""

    def stats(logits: torch.Tensor | tuple, labels: torch.Tensor) -> torch.Tensor:
        if isinstance(logits, tuple):
            logits = logits[0]
        shift_logits = logits[:, :-1, :].float()
        shift_labels = labels[:, 1:]
        pad = (shift_labels == IGNORE_INDEX) | (shift_labels == pad_token_id)
        targets = shift_labels.masked_fill(pad, pad_token_id)
        nll = F.cross_entropy(shift_logits.transpose(1, 2), targets, reduction="none")
        real = (~pad).to(nll.dtype)
        return torch.stack([(nll * real).sum(1), real.sum(1), (nll * (1 - real)).sum(1), (1 - real).sum(1)], dim=1)

    return stats


def padded_perplexity_metrics(eval_pred: Any) -> dict[str, float]:
    """``compute_metrics`` for :func:`padded_token_nll_stats`: ``perplexity`` over real tokens (as
    :func:`perplexity_metrics`), ``perplexity_with_padding`` with the padding targets counted too (the
    research code's number when it trains with padding in the loss), and ``padding_fraction``."""
    stats = np.asarray(eval_pred.predictions, dtype=np.float64).reshape(-1, 4)
    nll, tokens, pad_nll, pads = (float(stats[:, i].sum()) for i in range(4))
    loss = nll / max(tokens, 1.0)
    loss_pad = (nll + pad_nll) / max(tokens + pads, 1.0)
    return {"token_loss": loss, "perplexity": math.exp(min(loss, 700.0)), "tokens": tokens,
            "loss_with_padding": loss_pad, "perplexity_with_padding": math.exp(min(loss_pad, 700.0)),
            "padding_fraction": pads / max(tokens + pads, 1.0)}


def perplexity_metrics(eval_pred: Any) -> dict[str, float]:
    """``compute_metrics``: ``perplexity = exp(total NLL / real tokens)`` over the whole eval set."""
    stats = np.asarray(eval_pred.predictions, dtype=np.float64).reshape(-1, 2)
    nll, tokens = float(stats[:, 0].sum()), float(stats[:, 1].sum())
    loss = nll / max(tokens, 1.0)
    return {"token_loss": loss, "perplexity": math.exp(min(loss, 700.0)), "tokens": tokens}


# --------------------------------------------------------------------------------------------------
# Trainer helpers
# --------------------------------------------------------------------------------------------------


def unwrap_optimizer(optimizer: Any) -> Any:
    """The user's optimizer inside Accelerate's ``AcceleratedOptimizer`` wrapper(s)."""
    while hasattr(optimizer, "optimizer") and optimizer.optimizer is not optimizer:
        optimizer = optimizer.optimizer
    return optimizer


class RoutingReportCallback(TrainerCallback):
    """Prints the family optimizer's routing report (which tensor is on which track) once, at the
    start of training, on the main process."""

    def __init__(self) -> None:
        self.printed = False

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        if self.printed or not state.is_world_process_zero:
            return
        self.printed = True
        report = getattr(unwrap_optimizer(optimizer), "routing_report", None)
        name = type(unwrap_optimizer(optimizer)).__name__
        if report is None:
            print(f"[optimizer] {name} (no routing report: not a family optimizer)", flush=True)
        else:
            print(f"[optimizer] {name} — routing report:\n{report}", flush=True)


def optim_name(args: TrainingArguments) -> str:
    """``args.optim`` as its plain string (it may be an ``OptimizerNames`` member)."""
    return str(getattr(args.optim, "value", args.optim))


#: Learning rate the recipes use when ``--learning_rate`` is not given: each family member's
#: recommended rate from the registry (``hf_rmsuon.registry.RECOMMENDED_LR``, where the sweep behind
#: it is documented), and AdamW's best rate from the same sweep.
def _recommended_lrs() -> dict[str, float]:
    from hf_rmsuon.registry import RECOMMENDED_LR as FAMILY_LR

    return {"adamw_torch": 3e-3, "adamw_torch_fused": 3e-3, **FAMILY_LR}


RECOMMENDED_LR: dict[str, float] = _recommended_lrs()
DEFAULT_LR = 1e-3  # any other optimizer


def recommended_learning_rate(optim: str) -> float:
    return RECOMMENDED_LR.get(optim, DEFAULT_LR)


def common_training_defaults(optim: str) -> dict[str, Any]:
    """TrainingArguments defaults shared by the LM recipes (each can be overridden on the command line).

    ``use_cpu`` defaults to true on a machine without an accelerator: then
    ``accelerate launch --multi_gpu --num_processes N`` (or torchrun) gives real multi-process CPU DDP
    (gloo) instead of N independent single-process runs.
    """
    has_accelerator = torch.accelerator.is_available()
    return {
        "optim": optim,
        "learning_rate": recommended_learning_rate(optim),
        "lr_scheduler_type": "cosine",
        "warmup_steps": 0.05,
        "save_strategy": "no",
        "report_to": "none",
        "label_names": ["labels"],
        "use_cpu": not has_accelerator,
        "dataloader_pin_memory": has_accelerator,
        "ddp_find_unused_parameters": False,
        **recommended_optimizer_defaults(optim),
    }


def recommended_optimizer_defaults(optim: str) -> dict[str, Any]:
    """TrainingArguments defaults (weight decay, betas, eps) that match ``optim``'s documented
    defaults, so an unset flag means "the optimizer's default", not transformers' (e.g. wd 0)."""
    import hf_rmsuon

    if optim not in hf_rmsuon.available_optimizers():
        return {"weight_decay": 0.01}
    schema = hf_rmsuon.get_optimizer_class(optim).schema
    beta1, beta2 = schema["betas"].default
    return {"weight_decay": schema["weight_decay"].default, "adam_beta1": beta1, "adam_beta2": beta2,
            "adam_epsilon": schema["eps"].default}


# --------------------------------------------------------------------------------------------------
# token accuracy: evaluate's metric when available offline, else the same formula
# --------------------------------------------------------------------------------------------------

_ACCURACY: dict[str, Any] = {}


def accuracy_metric() -> tuple[Any, str]:
    """``(metric, source)``: ``evaluate.load("accuracy")`` if it loads (installed and cached or Hub
    reachable), else ``(None, "formula")``. Loaded once per process."""
    if "metric" not in _ACCURACY:
        _ACCURACY["metric"], _ACCURACY["source"] = None, "formula"
        try:
            import evaluate
            from huggingface_hub import is_offline_mode

            # offline, evaluate.load retries the Hub for a while before it gives up: ask it only
            # when the Hub answers (a cached metric is found either way under HF_HUB_OFFLINE=1)
            if is_offline_mode() or probe_hub(timeout=3.0) is None:
                _ACCURACY["metric"], _ACCURACY["source"] = evaluate.load("accuracy"), "evaluate"
        except Exception:  # not installed, not cached, …: the same formula
            pass
    return _ACCURACY["metric"], _ACCURACY["source"]


def token_accuracy(predictions: np.ndarray, references: np.ndarray) -> tuple[float, str]:
    """Share of counted target tokens predicted exactly (flat arrays of token ids)."""
    if len(references) == 0:
        return float("nan"), "formula"
    metric, source = accuracy_metric()
    if metric is not None:
        return float(metric.compute(predictions=predictions, references=references)["accuracy"]), source
    return float(np.mean(predictions == references)), source


@torch.no_grad()
def evaluate_tokens(trainer: Any) -> dict[str, float]:
    """Validation loss and next-token accuracy over the tokens the loss counts (label ≠ -100), over
    the whole evaluation set: under several processes every rank's tokens are gathered first."""
    model = trainer.model
    was_training = model.training
    model.eval()
    preds, refs, nll = [], [], torch.zeros((), dtype=torch.float64)
    for batch in trainer.get_eval_dataloader():
        batch = trainer._prepare_inputs(batch)
        labels = batch.pop("labels")
        batch = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "position_ids")}
        logits = model(**batch).logits[:, :-1].float()
        targets = labels[:, 1:]
        mask = targets != IGNORE_INDEX
        nll = nll + torch.nn.functional.cross_entropy(logits[mask], targets[mask], reduction="sum").double().cpu()
        preds.append(logits.argmax(-1)[mask])
        refs.append(targets[mask])
    model.train(was_training)
    device = trainer.accelerator.device
    pred, ref = torch.cat(preds).to(device), torch.cat(refs).to(device)
    if trainer.accelerator.num_processes > 1:  # ranks hold different numbers of tokens: pad, gather, unpad
        pred = trainer.accelerator.gather(trainer.accelerator.pad_across_processes(pred, pad_index=-1))
        ref = trainer.accelerator.gather(trainer.accelerator.pad_across_processes(ref, pad_index=-1))
        keep = ref != -1
        pred, ref = pred[keep], ref[keep]
        nll = trainer.accelerator.reduce(nll.to(device), reduction="sum").cpu()
    count = int(ref.numel())
    nll = float(nll)
    accuracy, source = token_accuracy(pred.cpu().numpy(), ref.cpu().numpy())
    return {"loss": nll / max(count, 1), "token_accuracy": accuracy, "tokens": count, "accuracy_source": source}



def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, total


def format_summary(tag: str, fields: dict[str, Any]) -> str:
    """One ``[tag] summary: k=v …`` line (floats to 4 significant digits)."""
    parts = []
    for key, value in fields.items():
        if isinstance(value, float):
            value = f"{value:.4g}"
        parts.append(f"{key}={value}")
    return f"[{tag}] summary: " + " ".join(parts)


def final_eval_metrics(trainer: Any) -> dict[str, float]:
    """The evaluation at the last training step: reused from the log if the Trainer just ran it
    (``--eval_strategy epoch``/``steps`` often ends on one), else run now."""
    for entry in reversed(trainer.state.log_history):
        if "eval_perplexity" in entry:
            if entry.get("step") == trainer.state.global_step:
                return entry
            break
    return trainer.evaluate()


def write_json(path: str | Path, payload: dict[str, Any]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, sort_keys=True, default=str) + "\n", encoding="utf-8")


class Stopwatch:
    def __init__(self) -> None:
        self.start = time.perf_counter()

    def seconds(self) -> float:
        return time.perf_counter() - self.start
