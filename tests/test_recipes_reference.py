"""The research code's protocols in the recipes: WikiText-2's sentence mode, padding in the loss and
``--protocol reference``; grokking's per-head model, routing and AdamW track."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

RECIPES = Path(__file__).resolve().parent.parent / "recipes"
sys.path.insert(0, str(RECIPES))

import _common as common  # noqa: E402
import grokking  # noqa: E402
import wikitext2  # noqa: E402

# --------------------------------------------------------------------------------------------------
# sentence mode
# --------------------------------------------------------------------------------------------------


def test_split_sentences_splits_the_whole_text_on_periods():
    lines = ["= Title =", "A first sentence . A second one .", "Third, over", "two lines . Tail without period"]
    assert common.split_sentences(lines) == [
        "= Title = A first sentence .", "A second one .", "Third, over two lines .", "Tail without period",
    ]
    assert common.split_sentences(["..", "a.b"]) == ["a.", "b"]  # empty pieces dropped


def test_sentence_sequences_sort_longest_first_and_cut_at_256_tokens():
    lengths = [3, 300, 5, 257, 256, 1, 5, 0]
    token_sentences = [[i] * n for i, n in enumerate(lengths)]
    seqs, stats = common.sentence_sequences(token_sentences)
    assert [len(s) for s in seqs] == [256, 5, 5, 3, 1]
    assert [s[0] for s in seqs] == [4, 2, 6, 0, 5]  # ties keep text order
    assert (stats.sentences, stats.kept, stats.dropped_too_long, stats.max_tokens) == (8, 5, 2, 256)
    assert common.SENTENCE_MAX_TOKENS == 256
    seqs, stats = common.sentence_sequences(token_sentences, max_tokens=5)
    assert [len(s) for s in seqs] == [5, 5, 3, 1] and stats.dropped_too_long == 3


def test_padding_fraction_counts_target_positions():
    # batch 1: lengths 4, 2 → targets 3 + 3, 2 of them padding; batch 2: one sequence of 3, no padding
    assert common.padding_fraction([[1] * 4, [1] * 2, [1] * 3], batch_size=2) == pytest.approx(2 / 8)


def _tiny_tokenizer(tmp_path):
    text = (RECIPES / "data" / "wikitext2-excerpt.train.txt").read_text(encoding="utf-8").splitlines()[:60]
    tok, _, _ = common.get_bpe_tokenizer(common.clean_lines(text), 300, tmp_path / "tok")
    return tok


def test_build_lm_data_sentence_mode_on_a_small_text(tmp_path):
    tok = _tiny_tokenizer(tmp_path)
    text = "Short one . A rather longer sentence with several more words in it . Mid sized sentence here ."
    splits = common.TextSplits([text, "x" * 400 + " ."], [text], "test")
    data = common.build_lm_data(tok, splits, "sentence", 40)
    lengths = [len(s) for s in data.train.sequences]
    assert lengths == sorted(lengths, reverse=True) and max(lengths) <= 40
    assert len(lengths) == 3 and data.sentence_stats["train"].dropped_too_long == 1  # the 400-char "sentence"
    expected = [tok(s, add_special_tokens=False)["input_ids"] for s in common.split_sentences([text])]
    assert data.train.sequences == sorted(expected, key=len, reverse=True)
    assert tok.eos_token_id not in data.train.sequences[0]  # no EOS added in sentence mode


def test_pad_in_loss_switch(tmp_path):
    tok = _tiny_tokenizer(tmp_path)
    pad = tok.pad_token_id
    samples = [{"input_ids": [5, 6, 7, 8]}, {"input_ids": [9, 10]}]
    off = common.CausalLMCollator(pad)(samples)
    on = common.CausalLMCollator(pad, pad_in_loss=True)(samples)
    assert off["labels"][1].tolist() == [9, 10, -100, -100]
    assert on["labels"][1].tolist() == [9, 10, pad, pad]
    assert torch.equal(on["attention_mask"], off["attention_mask"]) and torch.equal(on["input_ids"], off["input_ids"])
    # the loss the model trains on: padding targets count only with the switch on
    logits = torch.randn(2, 4, len(tok))
    stats_fn = common.padded_token_nll_stats(pad)
    for batch in (off, on):  # the metrics separate real and padding targets either way
        s = stats_fn(logits, batch["labels"])
        assert s[:, 1].tolist() == [3, 1] and s[:, 3].tolist() == [0, 2]
    nll = F.cross_entropy(logits[:, :-1].reshape(-1, len(tok)), on["labels"][:, 1:].reshape(-1), reduction="none")
    real = torch.tensor([1, 1, 1, 1, 0, 0], dtype=torch.bool)
    s = stats_fn(logits, on["labels"])
    assert s[:, 0].sum().item() == pytest.approx(nll[real].sum().item(), rel=1e-5)
    assert s[:, 2].sum().item() == pytest.approx(nll[~real].sum().item(), rel=1e-5)

    class Pred:
        predictions = s.numpy()

    m = common.padded_perplexity_metrics(Pred)
    assert m["perplexity"] == pytest.approx(math.exp(nll[real].mean().item()), rel=1e-5)
    assert m["perplexity_with_padding"] == pytest.approx(math.exp(nll.mean().item()), rel=1e-5)
    assert m["padding_fraction"] == pytest.approx(2 / 6)
    loss_on = F.cross_entropy(logits[:, :-1].transpose(1, 2), on["labels"][:, 1:], ignore_index=-100)
    loss_off = F.cross_entropy(logits[:, :-1].transpose(1, 2), off["labels"][:, 1:], ignore_index=-100)
    assert loss_on.item() == pytest.approx(nll.mean().item(), rel=1e-5)
    assert loss_off.item() == pytest.approx(nll[real].mean().item(), rel=1e-5)


# --------------------------------------------------------------------------------------------------
# wikitext2 --protocol
# --------------------------------------------------------------------------------------------------


def _parse(tmp_path, *extra):
    return wikitext2.parse_args(["--output_dir", str(tmp_path), *extra])


def test_wikitext2_default_protocol_unchanged(tmp_path):
    model_args, data_args, args = _parse(tmp_path, "--optim", "ars")
    assert model_args.protocol == "default" and model_args.preset == "reference"
    assert data_args.data_mode == "line" and not data_args.pad_in_loss
    assert str(getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type)) == "cosine"
    assert args.max_grad_norm == 1.0 and args.warmup_steps == 0.05
    assert "perturb_norm" not in (args.optim_args or "")


def test_wikitext2_reference_protocol(tmp_path):
    model_args, data_args, args = _parse(tmp_path, "--protocol", "reference", "--optim", "ars",
                                         "--optim_args", "rho=0.1")
    assert model_args.preset == "reference" and wikitext2.PRESETS["reference"].hidden_size == 512
    assert data_args.data_mode == "sentence" and data_args.sentence_max_tokens == 256
    assert not data_args.pad_in_loss  # a separate switch
    assert str(getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type)) == "constant"
    assert args.max_grad_norm == 0.0 and args.warmup_steps == 0
    assert args.train_sampling_strategy == "group_by_length"  # similar lengths, random order
    assert args.optim_args == "rho=0.1,perturb_norm=per_tensor"
    # explicit flags win; members without the option get none
    _, data_args, args = _parse(tmp_path, "--protocol", "reference", "--optim", "ars2_neo", "--max_grad_norm", "1",
                                "--optim_args=perturb_norm=global", "--data_mode", "line", "--pad_in_loss")
    assert args.max_grad_norm == 1.0 and args.optim_args == "perturb_norm=global"
    assert data_args.data_mode == "line" and data_args.pad_in_loss
    _, _, args = _parse(tmp_path, "--protocol", "reference", "--optim", "adamw_torch")
    assert not args.optim_args
    _, _, args = _parse(tmp_path, "--protocol", "reference", "--optim", "ada_rmsuon")
    assert not args.optim_args


def test_wikitext2_pad_in_loss_refused_in_chunk_mode(tmp_path):
    with pytest.raises(common.RecipeError, match="chunk mode has no padding"):
        _parse(tmp_path, "--data_mode", "chunk", "--pad_in_loss")


def test_wikitext2_reference_protocol_runs(tmp_path, capsys):
    summary = wikitext2.main(["--protocol", "reference", "--preset", "tiny", "--optim", "ars", "--use_excerpt",
                              "--max_steps", "3", "--sentence_max_tokens", "48", "--pad_in_loss",
                              "--output_dir", str(tmp_path), "--disable_tqdm", "true"])
    out = capsys.readouterr().out
    assert summary["protocol"] == "reference" and summary["data_mode"] == "sentence" and summary["pad_in_loss"]
    assert summary["lr_scheduler_type"] == "constant" and summary["max_grad_norm"] == 0.0
    assert "perturb_norm=per_tensor" in summary["optim_args"]
    assert summary["eval_perplexity_with_padding"] > 0 and 0 < summary["eval_padding_fraction"] < 1
    assert summary["sentence_stats"]["train"]["max_tokens"] == 48
    assert "IS COUNTED IN THE LOSS" in out and "sorted longest first" in out


# --------------------------------------------------------------------------------------------------
# grokking --protocol reference
# --------------------------------------------------------------------------------------------------


def test_per_head_model_is_the_one_block_function():
    torch.manual_seed(0)
    ref = grokking.build_model("reference", 13, 16, 4, 32)
    base = grokking.build_model("default", 13, 16, 4, 32)
    assert {n: tuple(p.shape) for n, p in ref.named_parameters() if n.startswith("W_")} == {
        "W_E": (14, 16), "W_pos": (3, 16), "W_Q": (4, 16, 4), "W_K": (4, 16, 4), "W_V": (4, 16, 4), "W_U": (16, 13)}
    with torch.no_grad():
        base.embed.weight.copy_(ref.W_E)
        base.pos_embed.weight.copy_(ref.W_pos)
        for name in ("q", "k", "v"):  # Linear weight rows h·d_head … are head h's columns
            w = getattr(ref, f"W_{name.upper()}")
            getattr(base, f"{name}_proj").weight.copy_(w.permute(0, 2, 1).reshape(16, 16))
        base.unembed.weight.copy_(ref.W_U.T)
        for mod in ("o_proj", "mlp_in", "mlp_out"):
            getattr(base, mod).load_state_dict(getattr(ref, mod).state_dict())
    tokens = torch.tensor([[1, 2, 13], [5, 7, 13]])
    torch.testing.assert_close(ref(tokens), base(tokens), rtol=1e-5, atol=1e-5)


def test_grokking_reference_routing_and_adamw_track():
    model = grokking.build_model("reference", 113, 128, 4, 512)
    opt = grokking.build_optimizer("ada_rmsuon", model, 1e-3, (0.9, 0.98), 1.0,
                                   grokking.protocol_optim_args("reference", None))
    report = opt.routing_report
    for name in ("W_E", "W_pos", "W_U", "W_Q", "W_K", "W_V", "o_proj.weight", "mlp_in.weight", "mlp_out.weight"):
        assert report.spec_of(name).track == "matrix", name
    for name in ("W_Q", "W_K", "W_V"):
        assert report.spec_of(name).view_doc == "4×(128, 32)"  # orthogonalized per head
    for name in ("mlp_in.bias", "mlp_out.bias"):
        assert report.spec_of(name).track == "adamw"
    assert not any(e.flagged for e in report.entries) and not report.warnings
    for group in opt.param_groups:
        assert group["adamw_betas"] == (0.9, 0.999) and group["adamw_weight_decay"] == 0.01
        assert group["betas"] == (0.9, 0.98) and group["weight_decay"] == 1.0  # the matrix track's
    # the default protocol keeps its model and routing
    default = grokking.build_optimizer("ada_rmsuon", grokking.build_model("default", 113, 128, 4, 512), 1e-3,
                                       (0.9, 0.98), 1.0, grokking.protocol_optim_args("default", None))
    assert default.routing_report.spec_of("embed.weight").track == "adamw"


def test_grokking_reports_the_onset_epoch():
    assert grokking.THRESHOLDS[0] == 0.1
    r = grokking.run_grokking("ada_rmsuon", 1e-2, 0, 2, modulus=11, train_fraction=0.5, d_model=16, n_heads=2,
                              d_mlp=32, progress=False, protocol="reference")
    assert set(r["epochs_to"]) == {"0.1", "0.5", "0.9", "0.99"}
    assert r["config"]["protocol"] == "reference" and r["config"]["model"] == "PerHeadTransformer"
    acc = r["curves"]["test_acc"]
    assert r["epochs_to"]["0.1"] == grokking.first_epoch_reaching(acc, 0.1)
    assert "ep@10%" in grokking.format_table([r, r])
