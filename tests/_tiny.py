"""Tiny models, data and TrainingArguments for test_integration_sam.py and test_integration_peft.py.

A 2-layer Qwen3 with 32 hidden units and a 64-token vocabulary, random token data whose loss masks
are ragged (so a token mean over a batch differs from a mean of per-sample means), and
TrainingArguments that keep the Trainer quiet, on the CPU and free of side effects.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import Dataset
from transformers import Qwen3Config, Qwen3ForCausalLM, TrainingArguments

VOCAB = 64
SEQ = 8


def qwen3_config(**overrides: Any) -> Qwen3Config:
    kw: dict[str, Any] = dict(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=8, intermediate_size=64, max_position_embeddings=64, tie_word_embeddings=False,
        attention_dropout=0.0,
    )
    kw.update(overrides)
    return Qwen3Config(**kw)


def tiny_qwen3(seed: int = 0, **overrides: Any) -> Qwen3ForCausalLM:
    torch.manual_seed(seed)
    return Qwen3ForCausalLM(qwen3_config(**overrides)).float()


class TokenData(Dataset):
    """``n`` random sequences; labels are the inputs with the last ``i % 4`` positions of sample ``i``
    ignored (-100), so samples carry different numbers of loss tokens."""

    def __init__(self, n: int, seq: int = SEQ, seed: int = 0, vocab: int = VOCAB) -> None:
        g = torch.Generator().manual_seed(seed)
        self.input_ids = torch.randint(0, vocab, (n, seq), generator=g)
        self.labels = self.input_ids.clone()
        for i in range(n):
            if i % 4:
                self.labels[i, -(i % 4):] = -100

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.input_ids[i], "labels": self.labels[i]}

    def full_batch(self) -> dict[str, torch.Tensor]:
        return {"input_ids": self.input_ids, "labels": self.labels}


def training_args(output_dir: Any, **overrides: Any) -> TrainingArguments:
    kw: dict[str, Any] = dict(
        output_dir=str(output_dir), per_device_train_batch_size=2, max_steps=2, learning_rate=1e-3,
        lr_scheduler_type="constant", weight_decay=0.0, report_to="none", save_strategy="no",
        logging_steps=1, use_cpu=True, disable_tqdm=True, dataloader_num_workers=0, seed=0,
    )
    kw.update(overrides)
    return TrainingArguments(**kw)
