"""Tests of the recipes (recipes/): data modes, tokenizer cache, offline fallback, and short runs of
each recipe — in-process and as subprocesses, including a 2-process CPU run through
``accelerate launch``. Nothing here touches the network: the Hub is simulated as unreachable."""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _numeric import free_port

REPO = Path(__file__).resolve().parents[1]
RECIPES = REPO / "recipes"
sys.path.insert(0, str(RECIPES))

import _common as common  # noqa: E402
import grokking  # noqa: E402
import wikitext2  # noqa: E402

PY = sys.executable
SUMMARY_PPL = re.compile(r"\[(wikitext2|finetune_lora)\] summary: .*\beval_ppl=([0-9.e+]+)")


def offline_env(tmp_path: Path) -> dict[str, str]:
    """Subprocess environment: no Hub, no shared caches, one thread."""
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HOME=str(tmp_path / "hf"),
               HF_RMSUON_CACHE=str(tmp_path / "cache"), TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1",
               HF_HUB_DISABLE_TELEMETRY="1")
    return env


def run(args: list[str], tmp_path: Path, timeout: int = 240) -> subprocess.CompletedProcess:
    out = subprocess.run(args, cwd=REPO, env=offline_env(tmp_path), capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"exit {out.returncode}\nSTDOUT:\n{out.stdout[-4000:]}\nSTDERR:\n{out.stderr[-4000:]}"
    return out


def summary_ppl(text: str, recipe: str = "wikitext2") -> float:
    found = [float(m.group(2)) for m in SUMMARY_PPL.finditer(text) if m.group(1) == recipe]
    assert len(found) == 1, f"expected one {recipe} summary line, got {len(found)}:\n{text[-3000:]}"
    return found[0]


def random_lines(n: int, seed: int = 0, max_len: int = 40) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 50) for _ in range(rng.randrange(0, max_len))] for _ in range(n)]


TINY_LM = ["--preset", "tiny", "--max_steps", "3", "--disable_tqdm", "true", "--eval_strategy", "no"]


# --------------------------------------------------------------------------------------------------
# data modes
# --------------------------------------------------------------------------------------------------


def test_line_mode_packs_greedily_within_context_and_deterministically():
    eos, context = 1, 16
    lines = random_lines(200, max_len=40)  # many lines longer than the context
    seqs = common.pack_lines(lines, context, eos)
    assert all(1 <= len(s) <= context for s in seqs)
    # nothing lost, nothing reordered: the sequences are the lines (each + EOS) in order
    assert [t for s in seqs for t in s] == [t for ids in lines for t in (*ids, eos)]
    assert seqs == common.pack_lines(lines, context, eos) == common.pack_lines([list(x) for x in lines], context, eos)
    # made of whole pieces (a line + EOS, cut at the context), closed only when the next piece does not fit
    pieces = []
    for ids in lines:
        item = [*ids, eos]
        pieces += [item[i:i + context] for i in range(0, len(item), context)]
    k = 0
    for i, seq in enumerate(seqs):
        taken: list[int] = []
        while len(taken) < len(seq):
            taken += pieces[k]
            k += 1
        assert taken == seq
        if i + 1 < len(seqs):
            assert len(seq) + len(pieces[k]) > context
    assert k == len(pieces)
    # explicit small case
    assert common.pack_lines([[5, 6], [7], [8, 9, 10, 11, 12]], 4, 0) == [[5, 6, 0], [7, 0], [8, 9, 10, 11], [12, 0]]
    assert common.pack_lines([[5], [6], [7]], 4, 0) == [[5, 0, 6, 0], [7, 0]]


def test_chunk_mode_gives_exact_lengths_and_no_padding():
    eos, context = 1, 16
    lines = random_lines(100, seed=1)
    chunks = common.chunk_tokens(lines, context, eos)
    stream = [t for ids in lines for t in (*ids, eos)]
    assert chunks and all(len(c) == context for c in chunks)
    assert len(chunks) == len(stream) // context
    assert [t for c in chunks for t in c] == stream[: len(chunks) * context]
    batch = common.CausalLMCollator(pad_token_id=2)([{"input_ids": c} for c in chunks[:8]])
    assert batch["input_ids"].shape == (8, context)
    assert bool(batch["attention_mask"].all()) and not bool((batch["labels"] == common.IGNORE_INDEX).any())
    with pytest.raises(common.RecipeError, match="fewer than one"):
        common.build_sequences([[3, 4]], "chunk", context, eos, "validation")


def test_collator_masks_padding_out_of_labels():
    pad = 2
    batch = common.CausalLMCollator(pad_token_id=pad)([{"input_ids": [5, 6, 7]}, {"input_ids": [8]},
                                                        {"input_ids": [9, 10]}])
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, pad, pad], [9, 10, pad]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0], [1, 1, 0]]
    assert batch["labels"].tolist() == [[5, 6, 7], [8, -100, -100], [9, 10, -100]]


def _tiny_qwen3(vocab: int = 64) -> torch.nn.Module:
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    config = Qwen3Config(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, head_dim=16, max_position_embeddings=32,
                         pad_token_id=1, eos_token_id=0, use_cache=False)
    return Qwen3ForCausalLM(config).eval()


def test_padding_is_excluded_from_loss_and_perplexity():
    """The loss of a padded batch equals the token-weighted loss of its sequences run one by one,
    whatever the pad id; the eval-loop perplexity statistics agree."""
    model = _tiny_qwen3()
    seqs = [[5, 9, 3, 7, 11, 0, 4], [8, 6, 0], [12, 13, 14, 0, 2]]
    with torch.no_grad():
        nll, count = 0.0, 0
        for s in seqs:
            ids = torch.tensor([s])
            loss = model(input_ids=ids, labels=ids).loss
            nll += loss.item() * (len(s) - 1)
            count += len(s) - 1
        for pad_id in (1, 17):
            batch = common.CausalLMCollator(pad_token_id=pad_id)([{"input_ids": s} for s in seqs])
            out = model(**batch)
            assert out.loss.item() == pytest.approx(nll / count, rel=1e-5)
            stats = common.token_nll_stats(out.logits, batch["labels"])
            assert stats[:, 1].tolist() == [len(s) - 1 for s in seqs]
            metrics = common.perplexity_metrics(type("P", (), {"predictions": stats.numpy()})())
            assert metrics["token_loss"] == pytest.approx(nll / count, rel=1e-5)
            assert metrics["perplexity"] == pytest.approx(torch.tensor(nll / count).exp().item(), rel=1e-5)


# --------------------------------------------------------------------------------------------------
# tokenizer
# --------------------------------------------------------------------------------------------------


def test_tokenizer_is_trained_once_then_reused_from_cache(tmp_path):
    lines = common.read_text_file(common.EXCERPT_TRAIN)[:60]
    before = common.TOKENIZER_TRAININGS
    tok, path, trained = common.get_bpe_tokenizer(lines, 400, tmp_path)
    assert trained and common.TOKENIZER_TRAININGS == before + 1
    assert len(tok) <= 400 and tok.eos_token_id is not None and tok.pad_token_id is not None
    assert tok.pad_token_id != tok.eos_token_id
    text = "Homarus gammarus , known as the European lobster — 42 @-@ ünïcödé"
    assert tok.decode(tok(text)["input_ids"]) == text  # byte level: lossless, no unknown tokens
    mtime = (path / "tokenizer.json").stat().st_mtime_ns

    tok2, path2, trained2 = common.get_bpe_tokenizer(lines, 400, tmp_path)
    assert not trained2 and path2 == path and common.TOKENIZER_TRAININGS == before + 1
    assert (path / "tokenizer.json").stat().st_mtime_ns == mtime
    assert tok2(text)["input_ids"] == tok(text)["input_ids"]
    # a different vocabulary size or different data is a different cache entry
    assert common.get_bpe_tokenizer(lines, 320, tmp_path)[2]
    assert common.get_bpe_tokenizer(lines[:-1], 400, tmp_path)[2]
    assert common.TOKENIZER_TRAININGS == before + 3
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no half-written entries left


def test_line_mode_on_real_text_fits_the_context(tmp_path):
    splits = common.TextSplits(common.read_text_file(common.EXCERPT_TRAIN)[:80],
                               common.read_text_file(common.EXCERPT_VALIDATION)[:20], "excerpt")
    tok, _, _ = common.get_bpe_tokenizer(splits.train, 512, tmp_path)
    line = common.build_lm_data(tok, splits, "line", 48)
    assert max(len(s) for s in line.train.sequences) <= 48
    assert sum(len(s) for s in line.train.sequences) == sum(len(t) + 1 for t in common.tokenize_lines(tok, splits.train))
    assert [s for s in common.build_lm_data(tok, splits, "line", 48).train.sequences] == line.train.sequences
    chunk = common.build_lm_data(tok, splits, "chunk", 48)
    assert {len(s) for s in chunk.train.sequences} == {48}


# --------------------------------------------------------------------------------------------------
# the offline behaviour (hub unreachable)
# --------------------------------------------------------------------------------------------------


def _no_network(monkeypatch, probe_reason: str | None, load_error: Exception | None = None):
    """Simulate the Hub: ``probe_reason`` (unreachable) or ``load_dataset`` raising ``load_error``."""
    calls = []

    def fake_load_dataset(*args, **kwargs):
        calls.append(args)
        raise load_error or AssertionError("load_dataset must not be called when the probe failed")

    monkeypatch.setattr(common, "probe_hub", lambda timeout=5.0: probe_reason)
    monkeypatch.setattr(common.datasets, "load_dataset", fake_load_dataset)
    return calls


@pytest.mark.parametrize("failure", ["probe", "load_dataset"])
def test_unreachable_hub_falls_back_to_the_excerpt_with_a_notice(tmp_path, monkeypatch, capsys, failure):
    if failure == "probe":
        _no_network(monkeypatch, "https://huggingface.co is unreachable (ConnectError: simulated)")
        monkeypatch.setattr(common, "is_offline_mode", lambda: False)
        monkeypatch.setattr(common.datasets.config, "HF_DATASETS_OFFLINE", False)
    else:
        calls = _no_network(monkeypatch, None, ConnectionError("Couldn't reach 'wikitext' on the Hub (simulated)"))
    out_dir = tmp_path / "run"
    summary = wikitext2.main([*TINY_LM, "--optim", "ars2_neo", "--output_dir", str(out_dir),
                              "--tokenizer_cache_dir", str(tmp_path / "tok")])
    printed = capsys.readouterr().out
    assert "SMOKE RUN" in printed and "--train_file" in printed and "simulated" in printed
    assert summary["smoke_run"] and summary["steps"] == 3 and summary["optim"] == "ars2_neo"
    assert 1.0 < summary["eval_perplexity"] < 1e4
    assert summary_ppl(printed) == pytest.approx(summary["eval_perplexity"], rel=1e-3)
    assert json.loads((out_dir / "summary.json").read_text())["smoke_run"] is True
    if failure == "load_dataset":
        assert calls == [("wikitext", "wikitext-2-raw-v1")]


def test_unreachable_hub_with_another_dataset_stops_with_a_clear_error(tmp_path, monkeypatch, capsys):
    _no_network(monkeypatch, None, ConnectionError("simulated outage"))
    with pytest.raises(SystemExit) as exc:
        common.run_main(wikitext2.main, [*TINY_LM, "--dataset_name", "someone/corpus", "--output_dir",
                                         str(tmp_path / "run")])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "simulated outage" in err and "--train_file" in err
    assert "Traceback" not in err


def test_local_files_chunk_mode_and_a_pretrained_tokenizer(tmp_path, capsys):
    train, valid = tmp_path / "train.txt", tmp_path / "valid.txt"
    train_lines = common.read_text_file(common.EXCERPT_TRAIN)[:120]
    train.write_text("\n".join(train_lines) + "\n", encoding="utf-8")
    valid.write_text("\n".join(common.read_text_file(common.EXCERPT_VALIDATION)[:30]) + "\n", encoding="utf-8")
    _, tok_dir, _ = common.get_bpe_tokenizer(train_lines, 300, tmp_path / "pretrained")  # a saved tokenizer
    trainings = common.TOKENIZER_TRAININGS
    summary = wikitext2.main([*TINY_LM, "--optim", "adamw_torch", "--data_mode", "chunk", "--train_file", str(train),
                              "--validation_file", str(valid), "--tokenizer_name", str(tok_dir),
                              "--output_dir", str(tmp_path / "run")])
    printed = capsys.readouterr().out
    assert "SMOKE RUN" not in printed and not summary["smoke_run"] and " data=local " in printed
    assert summary["data_source"].startswith("local files") and summary["data_mode"] == "chunk"
    assert common.TOKENIZER_TRAININGS == trainings  # --tokenizer_name: nothing trained
    assert json.loads((tmp_path / "run" / "config.json").read_text())["vocab_size"] <= 300
    assert summary["steps"] == 3 and 1.0 < summary["eval_perplexity"] < 1e4


def test_final_evaluation_is_reused_when_training_just_ran_it(tmp_path, monkeypatch):
    calls = []
    original = wikitext2.hf_rmsuon.RMSuonTrainer.evaluate

    def counting_evaluate(self, *args, **kwargs):
        calls.append(self.state.global_step)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(wikitext2.hf_rmsuon.RMSuonTrainer, "evaluate", counting_evaluate)
    summary = wikitext2.main(["--preset", "tiny", "--max_steps", "2", "--disable_tqdm", "true", "--eval_strategy",
                              "steps", "--eval_steps", "2", "--optim", "adamw_torch", "--use_excerpt",
                              "--max_eval_lines", "20", "--output_dir", str(tmp_path / "run"),
                              "--tokenizer_cache_dir", str(tmp_path / "tok")])
    assert calls == [2] and summary["eval_perplexity"] > 1.0


# --------------------------------------------------------------------------------------------------
# the recipes as scripts
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def wikitext2_checkpoint(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """One short WikiText-2 run (python recipes/wikitext2.py) whose output the LoRA test starts from."""
    tmp = tmp_path_factory.mktemp("wt2")
    out = run([PY, "recipes/wikitext2.py", *TINY_LM, "--optim", "ars2_neo", "--optim_args", "k=2",
               "--output_dir", str(tmp / "ckpt")], tmp)
    return tmp / "ckpt", out


def test_wikitext2_script_runs_and_saves_a_checkpoint(wikitext2_checkpoint):
    ckpt, out = wikitext2_checkpoint
    ppl = summary_ppl(out.stdout)
    summary = json.loads((ckpt / "summary.json").read_text())
    assert summary["eval_perplexity"] == pytest.approx(ppl, rel=1e-3) and summary["steps"] == 3
    assert summary["optim"] == "ars2_neo" and summary["optim_args"] == "k=2"
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        assert (ckpt / name).is_file(), name
    assert "SMOKE RUN" in out.stdout  # offline: the excerpt, announced
    assert "routing report" in out.stdout and "model.layers.0.mlp.up_proj.weight" in out.stdout


def test_finetune_lora_from_the_wikitext2_checkpoint(wikitext2_checkpoint, tmp_path):
    ckpt, _ = wikitext2_checkpoint
    out_dir = tmp_path / "lora"
    out = run([PY, "recipes/finetune_lora.py", "--model_name_or_path", str(ckpt), "--optim", "rmsuon",
               "--lora_policy", "B", "--lora_r", "4", "--target_modules", "q_proj,v_proj", "--use_excerpt",
               "--max_steps", "3", "--disable_tqdm", "true", "--context_length", "32", "--output_dir", str(out_dir),
               "--log_level", "info"],
              tmp_path)
    ppl = summary_ppl(out.stdout, "finetune_lora")
    assert "trainable params:" in out.stdout
    # lora_policy=B reached the optimizer: B factors orthogonalized, A factors on AdamW
    log = out.stdout + out.stderr  # the full routing report is logged at INFO (the view column: the matrix)
    assert re.search(r"lora_B\.default\.weight\s+\(\d+, 4\)\s+matrix\s+\(\d+, 4\)\s+LoRA B factor \(lora_policy=B\)", log)
    assert re.search(r"lora_A\.default\.weight\s+\(4, \d+\)\s+adamw\s+-\s+LoRA A factor \(lora_policy=B\)", log)
    assert (out_dir / "adapter_config.json").is_file() and (out_dir / "adapter_model.safetensors").is_file()
    summary = json.loads((out_dir / "summary.json").read_text())
    assert summary["eval_perplexity"] == pytest.approx(ppl, rel=1e-3)
    assert 0 < summary["trainable_parameters"] < summary["total_parameters"]
    assert 0.0 <= summary["token_accuracy_before"] <= 1.0 and 0.0 <= summary["token_accuracy"] <= 1.0
    assert summary["accuracy_source"] in ("evaluate", "formula") and "token_acc=" in out.stdout


def test_finetune_lora_rejects_lora_policy_for_a_non_family_optimizer(tmp_path, capsys):
    import finetune_lora

    with pytest.raises(SystemExit) as exc:
        common.run_main(finetune_lora.main, ["--model_name_or_path", str(tmp_path), "--optim", "adamw_torch",
                                             "--lora_policy", "B", "--output_dir", str(tmp_path / "x")])
    assert exc.value.code == 2 and "family optimizers" in capsys.readouterr().err



def test_wikitext2_two_process_cpu_run_through_accelerate_launch(tmp_path):
    """Real 2-process DDP (gloo): one tokenizer training (main process first), one notice, one
    summary, world size 2, and the evaluation covers the validation set exactly once."""
    accelerate = str(Path(PY).parent / "accelerate")
    tok_cache = tmp_path / "tok"
    out = run([accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
               "recipes/wikitext2.py", *TINY_LM, "--optim", "ars2_neo", "--use_excerpt", "--output_dir",
               str(tmp_path / "ddp"), "--tokenizer_cache_dir", str(tok_cache)], tmp_path, timeout=300)
    summary = json.loads((tmp_path / "ddp" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 3
    assert out.stdout.count("SMOKE RUN") == 1
    # the main process trained the tokenizer first; the other rank loaded it from the cache
    assert out.stdout.count("trained and cached") == 1 and out.stdout.count("rank 1: tokenizer reused from cache") == 1
    assert summary_ppl(out.stdout) == pytest.approx(summary["eval_perplexity"], rel=1e-3)
    assert [p.name for p in tok_cache.iterdir()] == [p.name for p in tok_cache.iterdir() if p.name.startswith("bpe-")]
    assert len(list(tok_cache.iterdir())) == 1
    # every validation token counted once (no duplicates from the distributed sampler's padding)
    splits = common.excerpt_splits("test", announce=False)
    tok = common.PreTrainedTokenizerFast.from_pretrained(str(next(tok_cache.iterdir())))
    data = common.build_lm_data(tok, splits, "line", wikitext2.PRESETS["tiny"].context_length)
    assert summary["eval_tokens"] == sum(len(s) - 1 for s in data.validation.sequences)


@pytest.mark.slow
def test_two_process_run_shuts_down_cleanly_when_the_script_destroys_the_process_group(tmp_path):
    """A user script that calls ``destroy_process_group()`` after training (ARS2-Neo Lazy + AGA + ASI,
    evaluation and checkpoints on) must exit on both ranks: no collective left pending."""
    script = tmp_path / "train_then_destroy.py"
    script.write_text(
        "import sys\n"
        f"sys.path.insert(0, {str(REPO / 'recipes')!r})\n"
        "import torch.distributed as dist\n"
        "import wikitext2\n"
        "wikitext2.main(sys.argv[1:])\n"
        "dist.destroy_process_group()\n"
        "print('process group destroyed', flush=True)\n")
    accelerate = str(Path(PY).parent / "accelerate")
    out = run([accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
               str(script), "--preset", "tiny", "--max_steps", "4", "--disable_tqdm", "true", "--eval_strategy",
               "steps", "--eval_steps", "2", "--save_strategy", "steps", "--save_steps", "2", "--optim", "ars2_neo",
               "--optim_args", "k=2,adaptive_sync=true,asi=true", "--use_excerpt", "--output_dir",
               str(tmp_path / "ddp"), "--tokenizer_cache_dir", str(tmp_path / "tok")], tmp_path, timeout=300)
    assert out.stdout.count("process group destroyed") == 2


# --------------------------------------------------------------------------------------------------
# grokking
# --------------------------------------------------------------------------------------------------


def test_modular_addition_split_and_model_shapes():
    tx, ty, vx, vy = grokking.modular_addition_data(113, 0.3, seed=0)
    assert len(ty) == round(0.3 * 113 * 113) and len(ty) + len(vy) == 113 * 113
    pairs = {tuple(r[:2]) for r in tx.tolist()} | {tuple(r[:2]) for r in vx.tolist()}
    assert len(pairs) == 113 * 113  # a partition of all pairs
    assert bool((ty == (tx[:, 0] + tx[:, 1]) % 113).all()) and bool((tx[:, 2] == 113).all())
    assert torch.equal(grokking.modular_addition_data(113, 0.3, seed=0)[0], tx)
    model = grokking.OneBlockTransformer(114, 113)
    assert model(tx[:5]).shape == (5, 113)
    assert not any(isinstance(m, torch.nn.LayerNorm) for m in model.modules())
    assert grokking.first_epoch_reaching([0.1, 0.6, 0.95, 0.99], 0.9) == 3
    assert grokking.first_epoch_reaching([0.1], 0.5) is None


def test_last_position_forward_equals_the_full_causal_block():
    """The forward computes only the last position; check it against the full block everywhere."""
    torch.manual_seed(0)
    m = grokking.OneBlockTransformer(24, 23, d_model=32, n_heads=4, d_mlp=64)
    tokens = torch.randint(0, 24, (7, 3))
    b, n = tokens.shape
    x = m.embed(tokens) + m.pos_embed(torch.arange(n))

    def heads(t):
        return t.view(b, n, 4, -1).transpose(1, 2)

    att = torch.nn.functional.scaled_dot_product_attention(heads(m.q_proj(x)), heads(m.k_proj(x)),
                                                           heads(m.v_proj(x)), is_causal=True)
    x = x + m.o_proj(att.transpose(1, 2).reshape(b, n, -1))
    x = x + m.mlp_out(torch.relu(m.mlp_in(x)))
    torch.testing.assert_close(m(tokens), m.unembed(x[:, -1]))


def test_run_grokking_learns_the_training_set():
    """The training loop works: the baseline memorizes a small training set (it reaches 100% at
    ~40–60 epochs here); curves and milestones have the documented shape."""
    result = grokking.run_grokking("adamw", lr=1e-2, seed=0, epochs=150, batch_size=0, modulus=23,
                                   d_model=32, n_heads=4, d_mlp=64, progress=False)
    assert result["epochs_run"] == 150 and set(result["epochs_to"]) == {"0.1", "0.5", "0.9", "0.99"}  # 0.1: onset
    assert all(len(v) == 150 for v in result["curves"].values())
    assert result["final"]["train_acc"] == 1.0
    assert result["curves"]["train_loss"][-1] < 0.1 * result["curves"]["train_loss"][0]
    assert result["config"]["batch_size"] == result["config"]["n_train"] == round(0.3 * 23 * 23)  # full batch
    stopped = grokking.run_grokking("adamw", lr=1e-2, seed=0, epochs=150, batch_size=0, modulus=23, d_model=32,
                                    n_heads=4, d_mlp=64, progress=False, stop_at=0.0)
    assert stopped["epochs_run"] == 1 and stopped["epochs_to"]["0.5"] in (None, 1)


@pytest.mark.parametrize("optim", ["ars2_neo", "muon"])
def test_run_grokking_with_family_members(optim):
    result = grokking.run_grokking(optim, seed=1, epochs=3, modulus=23, d_model=32, n_heads=4, d_mlp=64,
                                   batch_size=64, optim_args={"k": 2} if optim == "ars2_neo" else None,
                                   progress=False)
    assert result["epochs_run"] == 3 and all(torch.isfinite(torch.tensor(v)).all() for v in result["curves"].values())
    assert result["config"]["optim_args"] == ({"k": 2} if optim == "ars2_neo" else {})


def test_grokking_script_reports_milestones_and_writes_curves(tmp_path):
    out = run([PY, "recipes/grokking.py", "--optim", "ars2_neo", "--optim_args", "rho=0.05", "--seeds", "0", "1",
               "--epochs", "2", "--modulus", "31", "--output_dir", str(tmp_path)], tmp_path)
    assert "ep@50%" in out.stdout and "ep@99%" in out.stdout and "median" in out.stdout
    assert re.search(r"^ars2_neo\s+0\s", out.stdout, re.M) and re.search(r"^ars2_neo\s+1\s", out.stdout, re.M)
    assert "routing report" in out.stdout
    payload = json.loads((tmp_path / "grokking-ars2_neo.json").read_text())
    assert [r["seed"] for r in payload["runs"]] == [0, 1] and payload["optim_args"] == "rho=0.05"
    for r in payload["runs"]:
        assert set(r["curves"]) == {"train_loss", "train_acc", "test_loss", "test_acc"}
        assert all(len(v) == 2 for v in r["curves"].values())
        assert r["config"]["n_train"] == round(0.3 * 31 * 31)
