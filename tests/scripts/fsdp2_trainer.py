"""Train a tiny Qwen3 with ars2_neo on 2 CPU ranks, sharded at load time by transformers' FSDP2
(`DistributedConfig(fsdp_size=2)`) or replicated (DDP), and write the loss curve and the forward
count per optimizer step as JSON. Run with `torchrun --nproc_per_node 2 fsdp2_trainer.py MODE OUT`,
MODE in {fsdp2, fsdp2_install, ddp}."""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from _tiny import TokenData, qwen3_config  # noqa: E402
from transformers import Qwen3ForCausalLM, Trainer, TrainingArguments  # noqa: E402

import hf_rmsuon  # noqa: E402


def main(mode: str, out: str, checkpoint: str) -> None:
    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    if not dist.is_initialized():
        dist.init_process_group("gloo")
    if rank == 0 and not os.path.isdir(checkpoint):
        torch.manual_seed(0)
        Qwen3ForCausalLM(qwen3_config()).save_pretrained(checkpoint)
    dist.barrier()
    if mode.startswith("fsdp2"):
        from transformers.distributed import DistributedConfig

        model = Qwen3ForCausalLM.from_pretrained(checkpoint, distributed_config=DistributedConfig(fsdp_size=2),
                                                 dtype=torch.float32)
        assert type(next(model.parameters())).__name__ == "DTensor"
    else:
        model = Qwen3ForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    args = TrainingArguments(
        output_dir=os.path.join(os.path.dirname(out), f"run-{mode}"), per_device_train_batch_size=2, max_steps=6,
        learning_rate=3e-3, lr_scheduler_type="constant", weight_decay=0.01, report_to="none", save_strategy="no",
        use_cpu=True, logging_steps=1, optim="ars2_neo", optim_args="k=2,rho=0.05", gradient_accumulation_steps=2,
        disable_tqdm=True, seed=0, data_seed=0, dataloader_drop_last=True)
    forwards: list[int] = []
    model.register_forward_pre_hook(lambda *a: forwards.append(torch.is_grad_enabled()))
    if mode == "fsdp2_install":
        hf_rmsuon.install()
        trainer = Trainer(model=model, args=args, train_dataset=TokenData(8))
    else:
        trainer = hf_rmsuon.RMSuonTrainer(model=model, args=args, train_dataset=TokenData(8))
    per_step: list[int] = []

    from transformers import TrainerCallback

    class Count(TrainerCallback):
        def on_step_end(self, *a, **k):
            per_step.append(sum(forwards))
            forwards.clear()

    trainer.add_callback(Count())
    trainer.train()
    optimizer = hf_rmsuon.integration.unwrap_optimizer(trainer.optimizer)
    if rank == 0:
        with open(out, "w") as f:
            json.dump({"loss": [h["loss"] for h in trainer.state.log_history if "loss" in h],
                       "forwards": per_step, "sharded": optimizer.sharding is not None,
                       "split": optimizer.data_parallel_group is not None}, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3])
