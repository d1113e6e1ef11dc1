"""TRL trainers (SFT, DPO, Reward) with the family: the SAM replay runs through the subclass's own
training step and leaves no trace in TRL's metrics, in both mixin orders, via ``install()`` and via
``optimizer_cls_and_kwargs``. Tiny Qwen3 models and a word-level tokenizer built here; no Hub."""

from __future__ import annotations

import importlib
import random
from typing import Any

import pytest
import torch
from _tiny import qwen3_config, tiny_qwen3
from transformers import Trainer

pytest.importorskip("trl")
from datasets import Dataset  # noqa: E402
from peft import LoraConfig  # noqa: E402
from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: E402
from transformers import PreTrainedTokenizerFast, Qwen3ForSequenceClassification  # noqa: E402
from trl import DPOConfig, DPOTrainer, RewardConfig, RewardTrainer, SFTConfig, SFTTrainer  # noqa: E402

import hf_rmsuon  # noqa: E402
from hf_rmsuon.integration import RMSuonTrainer, install, optimizer_cls_and_kwargs  # noqa: E402
from hf_rmsuon.integration import factory as factory_module  # noqa: E402
from hf_rmsuon.integration.sam_step import unwrap_optimizer  # noqa: E402

WORDS = "the a cat dog sat on mat ran to park big small red blue".split()
TRL_SFT_METRICS = ("num_tokens", "mean_token_accuracy", "entropy")


def word_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>", unk_token="<unk>")


def sentences(n: int, lo: int, hi: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi))) for _ in range(n)]


def sft_data(n: int = 32) -> Dataset:
    return Dataset.from_dict({"text": sentences(n, 3, 10, seed=0)})


def preference_data(n: int = 16, with_prompt: bool = True) -> Dataset:
    data = {"chosen": sentences(n, 3, 5, seed=1), "rejected": sentences(n, 3, 5, seed=2)}
    if with_prompt:
        data["prompt"] = sentences(n, 3, 5, seed=3)
    return Dataset.from_dict(data)


def lora(**kw: Any) -> LoraConfig:
    # random (non-zero) B: the SAM perturbation is non-trivial from the first step even at lr 0
    return LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False, **kw)


def common_args(tmp_path, optim: str, lr: float, **kw: Any) -> dict[str, Any]:
    return dict(output_dir=str(tmp_path), optim=optim, learning_rate=lr, lr_scheduler_type="constant",
                per_device_train_batch_size=4, max_steps=4, logging_steps=1, report_to="none", use_cpu=True,
                save_strategy="no", disable_tqdm=True, seed=0, weight_decay=0.0, **kw)


def count_grad_forwards(model: torch.nn.Module) -> list[int]:
    """Forwards with autograd on (the policy's; DPO's reference forward runs under no_grad)."""
    calls: list[int] = []
    model.register_forward_pre_hook(lambda m, a: calls.append(1) if torch.is_grad_enabled() else None)
    return calls


class StepForwards:
    """Forwards per optimizer step, from a callback reading the counter."""

    def __init__(self, calls: list[int]) -> None:
        from transformers import TrainerCallback

        counter = self

        class Callback(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                counter.per_step.append(len(calls) - counter.seen)
                counter.seen = len(calls)

        self.per_step: list[int] = []
        self.seen = 0
        self.callback = Callback()


def logged(trainer: Trainer, *keys: str) -> list[dict[str, float]]:
    rows = [h for h in trainer.state.log_history if "loss" in h]
    return [{k: h[k] for k in keys} for h in rows]


class RMSuonSFT(RMSuonTrainer, SFTTrainer):
    pass


class SFTRMSuon(SFTTrainer, RMSuonTrainer):
    pass


def run_sft(tmp_path, trainer_cls: type, optim: str, lr: float, optim_args: str | None = None,
            **trainer_kw: Any) -> tuple[Trainer, list[int]]:
    model = tiny_qwen3()
    calls = count_grad_forwards(model)
    steps = StepForwards(calls)
    args = SFTConfig(**common_args(tmp_path, optim, lr, optim_args=optim_args, max_length=16))
    trainer = trainer_cls(model=model, args=args, train_dataset=sft_data(), processing_class=word_tokenizer(),
                          peft_config=lora(), callbacks=[steps.callback], **trainer_kw)
    trainer.train()
    return trainer, steps.per_step


@pytest.mark.parametrize("trainer_cls", [RMSuonSFT, SFTRMSuon], ids=["RMSuonTrainer-first", "SFTTrainer-first"])
def test_sft_lora_sam_metrics_equal_the_single_pass_run(tmp_path, trainer_cls):
    """lr 0: ars2_neo (k=2) and ada_rmsuon see the same weights and batches, so TRL's metrics must be
    identical — a replay counted in them would add 50% to num_tokens and average the perturbed
    model's entropy/accuracy in. Forwards alternate 2/1; the optim/* diagnostics are logged too."""
    sam, forwards = run_sft(tmp_path / "sam", trainer_cls, "ars2_neo", 0.0, "k=2")
    plain, plain_forwards = run_sft(tmp_path / "plain", trainer_cls, "ada_rmsuon", 0.0)
    assert forwards == [2, 1, 2, 1] and plain_forwards == [1, 1, 1, 1]
    assert unwrap_optimizer(sam.optimizer).sam["syncs"] == 2
    got, want = logged(sam, *TRL_SFT_METRICS), logged(plain, *TRL_SFT_METRICS)
    assert [g["num_tokens"] for g in got] == [w["num_tokens"] for w in want]
    for g, w in zip(got, want):
        assert g == pytest.approx(w, rel=1e-6)
    assert "optim/sync_ratio" in sam.state.log_history[0]


def test_sft_lora_sam_trains(tmp_path):
    """A real run: eval loss drops, num_tokens equals the single-pass run's at every step."""
    model = tiny_qwen3()
    data = sft_data()
    args = SFTConfig(**common_args(tmp_path / "a", "ars2_neo", 1e-2, optim_args="k=2", max_length=16,
                                   eval_strategy="no"))
    trainer = RMSuonSFT(model=model, args=args, train_dataset=data, eval_dataset=data,
                        processing_class=word_tokenizer(), peft_config=lora())
    trainer.args.max_steps = 8
    before = trainer.evaluate()["eval_loss"]
    trainer.train()
    after = trainer.evaluate()["eval_loss"]
    assert after < before - 0.05
    plain, _ = run_sft(tmp_path / "b", RMSuonSFT, "ada_rmsuon", 1e-2)
    tokens = [h["num_tokens"] for h in logged(trainer, "num_tokens")][:4]
    assert tokens == [h["num_tokens"] for h in logged(plain, "num_tokens")]


def test_sft_via_install_keeps_trl_metrics(tmp_path):
    install()
    sam, forwards = run_sft(tmp_path / "sam", SFTTrainer, "ars2_neo", 0.0, "k=2")
    plain, _ = run_sft(tmp_path / "plain", SFTTrainer, "ada_rmsuon", 0.0)
    assert forwards == [2, 1, 2, 1]
    for g, w in zip(logged(sam, *TRL_SFT_METRICS), logged(plain, *TRL_SFT_METRICS), strict=True):
        assert g == pytest.approx(w, rel=1e-6)
    assert "optim/energy" in sam.state.log_history[0]


def test_sft_via_optimizer_cls_and_kwargs(tmp_path, monkeypatch):
    """optimizer_cls_and_kwargs with SFTTrainer: a non-SAM member trains in the plain SFTTrainer; a
    SAM member there is refused before the first forward; with the mixin it runs its second pass."""
    install_module = importlib.import_module("hf_rmsuon.integration.install")
    monkeypatch.setattr(install_module, "is_installed", lambda: False)  # as if install() had never run
    plain_args = SFTConfig(**common_args(tmp_path, "adamw_torch", 3e-3, max_length=16))
    trainer, forwards = run_sft(tmp_path / "plain", SFTTrainer, "adamw_torch", 3e-3,
                                optimizer_cls_and_kwargs=optimizer_cls_and_kwargs("ada_rmsuon", plain_args))
    assert isinstance(unwrap_optimizer(trainer.optimizer), hf_rmsuon.AdaRMSuon)
    assert all(k in trainer.state.log_history[0] for k in TRL_SFT_METRICS)

    args = SFTConfig(**common_args(tmp_path, "adamw_torch", 3e-3, max_length=16, optim_args="k=2"))
    sam_kwargs = optimizer_cls_and_kwargs("ars2_neo", args)  # args.optim is not a family member: k=2 applies
    assert sam_kwargs[1]["k"] == 2
    with pytest.raises(RuntimeError, match="RMSuonTrainer") as err:
        run_sft(tmp_path / "refused", SFTTrainer, "adamw_torch", 3e-3, optimizer_cls_and_kwargs=sam_kwargs)
    assert "hf_rmsuon.install()" in str(err.value)
    trainer, forwards = run_sft(tmp_path / "mixin", RMSuonSFT, "adamw_torch", 3e-3, optimizer_cls_and_kwargs=sam_kwargs)
    assert forwards == [2, 1, 2, 1]


class RewardCounts(RMSuonTrainer, DPOTrainer):
    """Records how many rewards/chosen values TRL averages into each logged step."""

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:
            self.reward_counts.append(len(self._metrics["train"].get("rewards/chosen", [])))
        super().log(logs, start_time)


def run_dpo(tmp_path, optim: str, optim_args: str | None = None) -> tuple[RewardCounts, list[int]]:
    model = tiny_qwen3()
    calls = count_grad_forwards(model)
    steps = StepForwards(calls)
    args = DPOConfig(**common_args(tmp_path, optim, 0.0, optim_args=optim_args))
    trainer = RewardCounts(model=model, args=args, train_dataset=preference_data(),
                           processing_class=word_tokenizer(), peft_config=lora(), callbacks=[steps.callback])
    trainer.reward_counts = []
    trainer.train()
    return trainer, steps.per_step


def test_dpo_lora_sam_rewards_logged_once_per_step(tmp_path):
    sam, forwards = run_dpo(tmp_path / "sam", "ars2_neo", "k=2")
    plain, _ = run_dpo(tmp_path / "plain", "ada_rmsuon")
    assert forwards == [2, 1, 2, 1]
    assert sam.reward_counts == [1, 1, 1, 1]
    keys = ("num_tokens", "mean_token_accuracy", "entropy", "rewards/chosen", "rewards/rejected",
            "rewards/margins", "logps/chosen")
    for g, w in zip(logged(sam, *keys), logged(plain, *keys), strict=True):
        assert g == pytest.approx(w, rel=1e-6, abs=1e-7)


def test_reward_trainer_sam_metrics(tmp_path):
    class RMSuonReward(RMSuonTrainer, RewardTrainer):
        pass

    def run(out, optim, optim_args=None):
        torch.manual_seed(0)
        model = Qwen3ForSequenceClassification(qwen3_config(num_labels=1, pad_token_id=0))
        calls = count_grad_forwards(model)
        steps = StepForwards(calls)
        args = RewardConfig(**common_args(out, optim, 0.0, optim_args=optim_args))
        trainer = RMSuonReward(model=model, args=args, train_dataset=preference_data(with_prompt=False),
                               processing_class=word_tokenizer(), peft_config=lora(task_type="SEQ_CLS"),
                               callbacks=[steps.callback])
        trainer.train()
        return trainer, steps.per_step

    sam, forwards = run(tmp_path / "sam", "ars2_neo", "k=2")
    plain, _ = run(tmp_path / "plain", "ada_rmsuon")
    assert forwards == [2, 1, 2, 1]
    keys = ("num_tokens", "mean_reward", "accuracy", "margin")
    for g, w in zip(logged(sam, *keys), logged(plain, *keys), strict=True):
        assert g == pytest.approx(w, rel=1e-6, abs=1e-7)


# -- a subclass's own training_step ---------------------------------------------------------------------


class Recorder:
    def __init__(self) -> None:
        self.seen: list[torch.Tensor] = []


class ShiftInputs(Trainer):
    """A subclass whose training_step changes the inputs before the base step; compute_loss records
    what the model was given."""

    def training_step(self, model, inputs, num_items_in_batch=None):
        inputs = {**inputs, "input_ids": (inputs["input_ids"] + 5) % 64}
        return super().training_step(model, inputs, num_items_in_batch)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        self.recorder.seen.append(inputs["input_ids"].clone())
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)


class RMSuonFirst(RMSuonTrainer, ShiftInputs):
    pass


class ShiftFirst(ShiftInputs, RMSuonTrainer):
    pass


@pytest.mark.parametrize("trainer_cls", [RMSuonFirst, ShiftFirst, "install"])
def test_replay_sees_the_subclass_training_step(tmp_path, trainer_cls):
    from _tiny import TokenData, training_args

    if trainer_cls == "install":
        install()
        trainer_cls = ShiftInputs
    data = TokenData(8)
    trainer = trainer_cls(model=tiny_qwen3(), args=training_args(tmp_path, optim="ars", max_steps=2),
                          train_dataset=data)
    trainer.recorder = Recorder()  # an object: the replay's bookkeeping restore leaves it alone
    trainer.train()
    seen = trainer.recorder.seen
    assert len(seen) == 4  # two steps, each a clean pass and its replay
    for step in range(2):
        clean, replay = seen[2 * step], seen[2 * step + 1]
        assert torch.equal(clean, replay)
        original = torch.stack([row for row in data.input_ids]).tolist()
        assert all(((row - 5) % 64).tolist() in original for row in clean)  # the shift was applied once


def test_metrics_restored_generically(tmp_path):
    """Any plain-data accumulator a compute_loss fills is restored after the replay."""
    from _tiny import TokenData, training_args

    class Counting(RMSuonTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            self.tokens_seen = getattr(self, "tokens_seen", 0) + int(inputs["input_ids"].numel())
            self.history = {**getattr(self, "history", {}), "calls": getattr(self, "history", {}).get("calls", 0) + 1}
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    trainer = Counting(model=tiny_qwen3(), args=training_args(tmp_path, optim="ars2_neo", optim_args="k=1",
                                                              max_steps=3), train_dataset=TokenData(12))
    trainer.train()
    assert unwrap_optimizer(trainer.optimizer).sam["syncs"] == 3
    assert trainer.tokens_seen == 3 * 2 * 8 and trainer.history == {"calls": 3}


def test_default_lr_warning_names_the_recommended_rate(tmp_path, caplog):
    factory_module._WARNED.clear()
    args = SFTConfig(output_dir=str(tmp_path), optim="muon", report_to="none", use_cpu=True)
    with caplog.at_level("WARNING", logger="transformers.hf_rmsuon"):
        optimizer_cls_and_kwargs("muon", args)
        optimizer_cls_and_kwargs("muon", args)
    warnings = [r.getMessage() for r in caplog.records if "learning_rate" in r.getMessage()]
    assert len(warnings) == 1
    assert "2e-05" in warnings[0] and "SFTConfig" in warnings[0] and "--learning_rate 0.02" in warnings[0]
