"""transformers integration: factory protocol, RMSuonTrainer, install()/launcher, resume, precision,
diagnostics and argument errors. (Exact-SAM/DDP and PEFT checks live in their own files.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from _numeric import free_port
from transformers import Qwen3Config, Qwen3ForCausalLM, Trainer, TrainingArguments

import hf_rmsuon
from hf_rmsuon import functional as F
from hf_rmsuon.integration import (
    FamilyOptimizerFactory,
    RMSuonTrainer,
    check_engine_supported,
    install,
    optimizer_cls_and_kwargs,
    unwrap_optimizer,
)
from hf_rmsuon.integration.install import original

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "tests" / "scripts" / "hf_style_train.py"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def tiny_model(seed: int = 0) -> Qwen3ForCausalLM:
    torch.manual_seed(seed)
    config = Qwen3Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64)
    return Qwen3ForCausalLM(config)


def token_data(n: int = 16, seq_len: int = 16, seed: int = 1234) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, 64, (seq_len,), generator=g)
        out.append({"input_ids": ids, "labels": ids.clone()})
    return out


def training_args(tmp_path, **kw) -> TrainingArguments:
    defaults = dict(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=4, learning_rate=1e-3,
                    report_to=[], save_strategy="no", use_cpu=True, logging_steps=1, seed=0,
                    disable_tqdm=True)
    defaults.update(kw)
    return TrainingArguments(**defaults)


def launch(tmp_path, *extra: str, launcher: tuple[str, ...] = (sys.executable, "-m", "hf_rmsuon.run")):
    cmd = [*launcher, str(SCRIPT), "--output_dir", str(tmp_path), "--max_steps", "6",
           "--per_device_train_batch_size", "4", "--report_to", "none", "--save_strategy", "no",
           "--use_cpu", "--logging_steps", "2", "--disable_tqdm", "true", *extra]
    return subprocess.run(cmd, capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=420)


# -- optimizer_cls_and_kwargs: the factory protocol -------------------------------------------------------


def test_factory_takes_hyperparameters_from_training_arguments(tmp_path):
    args = training_args(tmp_path, learning_rate=3e-4, adam_beta1=0.8, adam_beta2=0.9, adam_epsilon=1e-6,
                         weight_decay=0.05)
    factory, kwargs = optimizer_cls_and_kwargs("rmsuon", args)
    assert factory is FamilyOptimizerFactory
    assert kwargs == {"optimizer_name": "rmsuon", "lr": 3e-4, "betas": (0.8, 0.9), "eps": 1e-6,
                      "weight_decay": 0.05}
    # explicit overrides win over the arguments
    _, kwargs = optimizer_cls_and_kwargs("rmsuon", args, lr=1e-2, ns_steps=3)
    assert kwargs["lr"] == 1e-2 and kwargs["ns_steps"] == 3 and kwargs["betas"] == (0.8, 0.9)


def test_factory_applies_optim_args_only_for_its_own_name(tmp_path):
    install()
    args = training_args(tmp_path, optim="ars2_neo", optim_args="rho=0.05,k=2,betas=0.9:0.95")
    _, kwargs = optimizer_cls_and_kwargs("ars2_neo", args)
    assert kwargs["rho"] == 0.05 and kwargs["k"] == 2 and kwargs["betas"] == (0.9, 0.95)
    # optim_args written for another family member are refused, never silently dropped
    with pytest.raises(ValueError, match="args.optim is 'ars2_neo'"):
        optimizer_cls_and_kwargs("ars", args)


def test_trainer_builds_family_optimizer_through_factory_protocol(tmp_path):
    model = tiny_model()
    args = training_args(tmp_path, weight_decay=0.1, learning_rate=2e-3)
    trainer = Trainer(model=model, args=args, train_dataset=token_data(),
                      optimizer_cls_and_kwargs=optimizer_cls_and_kwargs("ada_rmsuon", args))
    opt = unwrap_optimizer(trainer.create_optimizer())
    assert isinstance(opt, hf_rmsuon.AdaRMSuon)
    report = opt.routing_report
    assert report.track_of("model.embed_tokens.weight") == "adamw"  # model-aware: the factory saw the model
    assert report.track_of("model.layers.0.self_attn.q_proj.weight") == "matrix"
    lrs = {g["lr"] for g in opt.param_groups}
    assert lrs == {2e-3}
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1]  # one group, the user's
    # 1-D tensors are not decayed, like the Trainer's own grouping (a per-tensor routing decision)
    assert {p.ndim < 2 for p in opt.param_groups[0]["params"] if not opt.spec_of(p).decay} == {True}


def test_unknown_name_lists_valid_ones():
    with pytest.raises(ValueError, match="available: .*ars2_neo"):
        optimizer_cls_and_kwargs("ars3")


@pytest.mark.parametrize("engine", ["deepspeed", "fsdp1_args", "fsdp1_env"])
def test_deepspeed_and_fsdp1_are_refused(engine, monkeypatch):
    args = types.SimpleNamespace(deepspeed=None, fsdp=None, fsdp_config=None)
    if engine == "deepspeed":
        args.deepspeed = "ds_zero2.json"
    elif engine == "fsdp1_args":
        args.fsdp, args.fsdp_config = "full_shard", {"version": 1}
    else:
        monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # Accelerate's default version is 1
    with pytest.raises(ValueError, match="DDP") as err:
        check_engine_supported(args)
    assert "FSDP2" in str(err.value) and "fsdp_size" in str(err.value)
    if engine == "deepspeed":
        assert "DeepSpeed's built-in Muon" in str(err.value)


@pytest.mark.parametrize("engine", ["fsdp2_args", "fsdp2_default", "fsdp2_env"])
def test_fsdp2_is_accepted(engine, monkeypatch):
    args = types.SimpleNamespace(deepspeed=None, fsdp=None, fsdp_config=None)
    if engine == "fsdp2_args":
        args.fsdp, args.fsdp_config = "full_shard", {"version": 2}
    elif engine == "fsdp2_default":
        args.fsdp = "full_shard"  # transformers' default FSDP version is 2
    else:
        monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
        monkeypatch.setenv("FSDP_VERSION", "2")
    check_engine_supported(args)


def test_fsdp1_wrapped_model_is_refused_by_the_factory():
    from hf_rmsuon.integration.factory import FamilyOptimizerFactory

    class FakeFSDP1(torch.nn.Linear):
        pass

    import torch.distributed.fsdp as fsdp

    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    original = fsdp.FullyShardedDataParallel
    try:  # an FSDP1 wrapper needs a process group; any module of that class is what the check looks for
        fsdp.FullyShardedDataParallel = FakeFSDP1
        model.append(FakeFSDP1(4, 4))
        with pytest.raises(ValueError, match="FSDP1"):
            FamilyOptimizerFactory()(model, optimizer_name="muon")
    finally:
        fsdp.FullyShardedDataParallel = original


# -- RMSuonTrainer ------------------------------------------------------------------------------------------


def test_rmsuon_trainer_logs_diagnostics(tmp_path):
    args = training_args(tmp_path, optim="ars2_neo", optim_args="k=2,adaptive_sync=true", max_steps=6)
    trainer = RMSuonTrainer(model=tiny_model(), args=args, train_dataset=token_data())
    trainer.train()
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logged) == 6
    for key in ("optim/energy", "optim/update_rms", "optim/rho", "optim/sync_ratio", "optim/effective_k",
                "optim/alpha", "optim/surrogate_gap", "optim/nonfinite_steps"):
        assert key in logged[-1], key
    assert "optim/phi" in logged[-1]  # AGA measured the alignment on a lazy step
    assert 0.0 < logged[-1]["optim/sync_ratio"] <= 1.0
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in logged)


def test_rmsuon_trainer_rejects_bad_optim_args_at_construction(tmp_path):
    install()
    with pytest.raises(ValueError, match="valid keys are: .*rho"):
        training_args(tmp_path, optim="ars2_neo", optim_args="rhoo=0.1")


def test_resume_continues_the_exact_trajectory(tmp_path):
    """ars2_neo with AGA + Lazy mode + ASI: checkpoint at step 4, resume → same parameters as an
    uninterrupted 8-step run (all SAM/AGA/ASI state and shear forces restored)."""
    optim_args = "k=3,adaptive_sync=true,asi=true,rho=0.05"
    common = dict(optim="ars2_neo", optim_args=optim_args, max_steps=8, save_strategy="steps", save_steps=4,
                  learning_rate=2e-3, lr_scheduler_type="linear", warmup_steps=2)

    def run(out, resume=None):
        trainer = RMSuonTrainer(model=tiny_model(), args=training_args(out, **common), train_dataset=token_data())
        trainer.train(resume_from_checkpoint=resume)
        return trainer

    full = run(tmp_path / "full")
    resumed = run(tmp_path / "resumed", resume=str(tmp_path / "full" / "checkpoint-4"))
    full_opt, resumed_opt = unwrap_optimizer(full.optimizer), unwrap_optimizer(resumed.optimizer)
    assert full_opt.sam["syncs"] >= 2 and full_opt.sam["step"] == 8
    assert resumed_opt.sam == full_opt.sam
    for (name, a), b in zip(full.model.named_parameters(), resumed.model.parameters()):
        assert torch.equal(a, b), f"{name} differs after resume"
    shears = [s for s in full_opt.state.values() if "shear" in s]
    assert shears, "Lazy mode must have stored shear forces"


def test_bf16_autocast_trains_on_cpu(tmp_path):
    args = training_args(tmp_path, optim="ars", bf16=True, max_steps=3)
    model = tiny_model()
    before = model.model.layers[0].mlp.up_proj.weight.detach().clone()
    trainer = RMSuonTrainer(model=model, args=args, train_dataset=token_data())
    result = trainer.train()
    assert torch.isfinite(torch.tensor(result.training_loss))
    after = model.model.layers[0].mlp.up_proj.weight
    assert after.dtype == torch.float32 and not torch.equal(before, after)
    assert unwrap_optimizer(trainer.optimizer).sam["syncs"] == 3


@pytest.mark.parametrize("compiled", [False, True], ids=["in-place", "compiled"])
def test_perturbation_ignores_gradient_scaling(monkeypatch, compiled):
    """The fp16 GradScaler path: base gradients carry the loss scale; with ``grad_scale`` the
    perturbation equals the unscaled one (ε keeps its meaning), in the in-place chain and in the
    fused passes of ``compile=True``."""
    monkeypatch.setattr(F, "compiled_newton_schulz", lambda: F.newton_schulz)  # SAM's passes are under test
    torch.manual_seed(0)
    weights = [torch.randn(8, 4), torch.randn(8)]

    def perturbation(scale):
        params = [torch.nn.Parameter(w.clone()) for w in weights]
        opt = hf_rmsuon.ARS(params, eps=1e-3, compile=compiled)
        grads = [torch.full_like(p, 1e-3) + 1e-3 * torch.arange(p.numel()).reshape(p.shape) for p in params]
        for p, g in zip(params, grads):  # one step so that v̂ (and hence ε) matters
            p.grad = g.clone()
        opt.sam_pass_due()
        opt.begin_sam_pass()
        opt.end_sam_pass()
        opt.step()
        for p, g in zip(params, grads):
            p.grad = g * scale
        opt.sam_pass_due()
        start = [p.detach().clone() for p in params]
        opt.begin_sam_pass(grad_scale=scale if scale != 1.0 else None)
        return [p.detach() - s for p, s in zip(params, start)]

    for a, b in zip(perturbation(1.0), perturbation(65536.0)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-9)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="fp16 GradScaler training needs CUDA")
def test_fp16_grad_scaler_training_cuda(tmp_path):
    args = training_args(tmp_path, optim="ars2_neo", optim_args="k=2", fp16=True, use_cpu=False, max_steps=6)
    trainer = RMSuonTrainer(model=tiny_model().cuda(), args=args, train_dataset=token_data())
    result = trainer.train()
    assert torch.isfinite(torch.tensor(result.training_loss))
    assert unwrap_optimizer(trainer.optimizer).sam["syncs"] == 3


def test_training_args_bin_loads_in_a_fresh_process(tmp_path):
    args = training_args(tmp_path, optim="ars2_neo", optim_args="k=2", max_steps=2, save_strategy="steps",
                         save_steps=2)
    RMSuonTrainer(model=tiny_model(), args=args, train_dataset=token_data()).train()
    path = tmp_path / "checkpoint-2" / "training_args.bin"
    code = f"import torch; a = torch.load({str(path)!r}, weights_only=False); print(a.optim.value, a.optim_args)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["ars2_neo", "k=2"]


def test_install_is_idempotent():
    install()
    hooked = Trainer.training_step
    install()
    assert Trainer.training_step is hooked
    assert original(Trainer, "training_step") is not hooked  # RMSuonTrainer calls the unhooked one


# -- the launcher with an unmodified script ----------------------------------------------------------------


def test_launcher_runs_unmodified_script_with_sam_pass(tmp_path):
    out = launch(tmp_path, "--optim", "ars2_neo", "--optim_args", "rho=0.05,k=2")
    assert out.returncode == 0, out.stderr[-3000:]
    record = json.loads((tmp_path / "forward_calls.json").read_text())
    assert record["per_step"] == [2, 1, 2, 1, 2, 1]  # sync steps: two forwards; lazy steps: one
    assert record["world_size"] == 1
    logged = [h for h in record["log_history"] if "loss" in h]
    assert logged and logged[-1]["optim/rho"] == pytest.approx(0.05)
    assert logged[-1]["optim/sync_ratio"] == pytest.approx(0.5)


def test_plain_trainer_without_install_explains_the_fix(tmp_path):
    """Registered names alone (no hooks): the first sync step stops with an error naming the fix."""
    code = ("import sys, runpy, hf_rmsuon.integration; sys.argv = sys.argv[1:]; "
            "runpy.run_path(sys.argv[0], run_name='__main__')")
    out = launch(tmp_path, "--optim", "ars", launcher=(sys.executable, "-c", code))
    assert out.returncode != 0
    assert "hf_rmsuon.install()" in out.stderr and "closure" in out.stderr


@pytest.mark.parametrize(
    ("optim_args", "message"),
    [("kk=2", "unknown key"), ("k=two", "k expects an integer"), ("rho=-1", "rho must be >= 0"),
     ("betas=0.9", "betas expects two numbers"), ("energy_scale=big", "choose one of")],
)
def test_launcher_rejects_bad_optim_args_before_training(tmp_path, optim_args, message):
    out = launch(tmp_path, "--optim", "ars2_neo", "--optim_args", optim_args)
    assert out.returncode != 0
    assert message in out.stderr
    if message == "unknown key":
        assert "valid keys are:" in out.stderr and "'rho'" in out.stderr
    assert not (tmp_path / "forward_calls.json").exists()
    assert "train_runtime" not in out.stdout + out.stderr


def test_launcher_unknown_optim_lists_valid_names(tmp_path):
    out = launch(tmp_path, "--optim", "ars3_neo")
    assert out.returncode != 0
    assert "invalid choice" in out.stderr and "ars2_neo" in out.stderr and "adamw_torch" in out.stderr



@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["accelerate", "torchrun"])
def test_launcher_under_multi_process_launchers(tmp_path, launcher):
    bindir = Path(sys.executable).parent
    port = str(free_port())  # other tests may run DDP at the same time (pytest-xdist)
    if launcher == "accelerate":
        prefix = (str(bindir / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2",
                  "--main_process_port", port, "-m", "hf_rmsuon.run")
    else:
        prefix = (str(bindir / "torchrun"), "--nproc_per_node", "2", "--master_port", port, "-m", "hf_rmsuon.run")
    out = launch(tmp_path, "--optim", "ars2_neo", "--optim_args", "k=2", launcher=prefix)
    assert out.returncode == 0, out.stderr[-3000:]
    record = json.loads((tmp_path / "forward_calls.json").read_text())
    assert record["world_size"] == 2  # really distributed, not two independent runs
    assert record["per_step"] == [2, 1, 2, 1, 2, 1]
