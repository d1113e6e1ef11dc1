"""A plain transformers training script that knows nothing about hf_rmsuon (the launcher test's
"unmodified script"): HfArgumentParser + TrainingArguments + a plain Trainer on a tiny Qwen3.

It records how many times the model's forward ran in each optimizer step, into
``<output_dir>/forward_calls.json``, plus the Trainer's log history.
"""

import json
import os
from dataclasses import dataclass

import torch
from transformers import (
    HfArgumentParser,
    Qwen3Config,
    Qwen3ForCausalLM,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)


@dataclass
class ScriptArguments:
    num_samples: int = 16
    seq_len: int = 16


class CountForwards(TrainerCallback):
    def __init__(self, counter):
        self.counter = counter
        self.per_step = []

    def on_step_end(self, args, state, control, **kwargs):
        self.per_step.append(self.counter[0])
        self.counter[0] = 0


def main():
    script_args, training_args = HfArgumentParser((ScriptArguments, TrainingArguments)).parse_args_into_dataclasses()
    torch.manual_seed(training_args.seed)
    config = Qwen3Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64)
    model = Qwen3ForCausalLM(config)
    generator = torch.Generator().manual_seed(1234)
    data = []
    for _ in range(script_args.num_samples):
        ids = torch.randint(0, 64, (script_args.seq_len,), generator=generator)
        data.append({"input_ids": ids, "labels": ids.clone()})
    counter = [0]
    model.register_forward_pre_hook(lambda module, args: counter.__setitem__(0, counter[0] + 1))
    counting = CountForwards(counter)
    trainer = Trainer(model=model, args=training_args, train_dataset=data, callbacks=[counting])
    trainer.train()
    if trainer.is_world_process_zero():
        with open(os.path.join(training_args.output_dir, "forward_calls.json"), "w") as f:
            json.dump({"per_step": counting.per_step, "log_history": trainer.state.log_history,
                       "world_size": training_args.world_size}, f)


if __name__ == "__main__":
    main()
