"""Parameter routing (SPEC §3): model-aware for transformers/PEFT models, the shape rule for bare
tensors, name-pattern overrides and the printable report."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import hf_rmsuon
from hf_rmsuon import create_optimizer, route_model, route_tensors

# PEFT calls a transformers API that transformers 5 deprecates; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")


def _tracks_in_optimizer(opt) -> dict[int, str]:
    out: dict[int, str] = {}
    for group in opt.param_groups:
        for p in group["params"]:
            assert id(p) not in out, "a tensor is in two param groups"
            out[id(p)] = opt.spec_of(p).track
    return out


def _expected_track(model: nn.Module) -> dict[str, str]:
    """Independent expectation for a plain causal LM: the weights of the attention/MLP Linear layers
    are matrices; embeddings, the output head, norms and biases go to AdamW."""
    head = model.get_output_embeddings()
    matrix_ids = {id(m.weight) for m in model.modules() if isinstance(m, nn.Linear) and m is not head}
    return {n: ("matrix" if id(p) in matrix_ids else "adamw") for n, p in model.named_parameters()}


@pytest.mark.parametrize("kind,tied,bias", [("qwen3", False, False), ("qwen3", True, False), ("llama", False, True),
                                            ("llama", True, False)])
def test_causal_lm_routing(ref, kind, tied, bias):
    model = ref.tiny_causal_lm(kind, tied=tied)
    if bias:  # a Llama with attention biases, to have Linear biases in the model
        import transformers

        cfg = model.config
        cfg.attention_bias = True
        torch.manual_seed(0)
        model = transformers.LlamaForCausalLM(cfg)
    opt = create_optimizer("ars2_neo", model)
    report = opt.routing_report
    expected = _expected_track(model)
    in_opt = _tracks_in_optimizer(opt)
    named = dict(model.named_parameters())
    assert {id(p) for p in named.values()} == set(in_opt)  # every trainable tensor exactly once
    for name, p in named.items():
        assert report.track_of(name) == expected[name], name
        assert in_opt[id(p)] == expected[name], name
    emb = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    assert in_opt[id(emb)] == "adamw" and in_opt[id(head)] == "adamw"
    assert (emb is head) == tied
    if tied:
        assert "tied" in next(e.reason for e in report.entries if e.name == "model.embed_tokens.weight")
    assert any(e.track == "matrix" and "q_proj" in e.name for e in report.entries)
    if bias:
        assert any(n.endswith("q_proj.bias") and report.track_of(n) == "adamw" for n in named)
    # one param group (the model's); 1-D tensors get no weight decay by default (the transformers
    # convention), matrices and embeddings keep it
    assert len(opt.param_groups) == 1
    for name, p in named.items():
        assert opt.spec_of(p).decay == (p.ndim >= 2), name
    assert not report.warnings


def test_no_decay_1d_off_and_adamw_lr(ref):
    model = ref.tiny_causal_lm("qwen3")
    opt = create_optimizer("rmsuon", model, lr=0.01, weight_decay=0.2, no_decay_1d=False, adamw_lr=0.003)
    assert len(opt.param_groups) == 1
    group = opt.param_groups[0]
    assert group["weight_decay"] == 0.2 and group["lr"] == 0.01
    assert all(opt.spec_of(p).decay for p in group["params"])
    assert opt.adamw_settings(group)[0] == 0.003


def test_routing_report_is_printable_and_complete(ref):
    model = ref.tiny_causal_lm("qwen3", tied=False)
    report = route_model(model)
    text = str(report)
    for name, _ in model.named_parameters():
        assert name in text
    counts = report.counts()
    n_matrix = sum(1 for e in report.entries if e.track == "matrix")
    assert counts["matrix"]["tensors"] == n_matrix == 14  # 2 layers × (4 attention + 3 MLP)
    assert counts["adamw"]["numel"] + counts["matrix"]["numel"] == sum(p.numel() for p in model.parameters())
    assert "matrix track: 14 tensors" in text


# --------------------------------------------------------------------------------------------------
# The shape rule for bare tensors
# --------------------------------------------------------------------------------------------------

SHAPE_CASES = [((5,), "adamw"), ((3, 4), "matrix"), ((2, 3, 4), "matrix"), ((4, 3, 3, 3), "matrix"),
               ((10000, 4), "adamw"), ((9999, 4), "matrix"), ((4, 10000), "adamw"), ((), "adamw"), ((1, 1), "matrix")]


def test_route_tensors_shape_rule():
    tensors = [torch.zeros(s, requires_grad=True) for s, _ in SHAPE_CASES]
    report = route_tensors(tensors)
    assert [e.track for e in report.entries] == [t for _, t in SHAPE_CASES]
    # 3-D bare tensors are flagged: a stack by the seeds' rule, but a Conv1d weight cannot be told apart
    assert len(str(report).splitlines()) == len(SHAPE_CASES) + 2 + len(report.warnings)  # header, rows, totals
    assert [e.name for e in report.entries if e.flagged] == ["param2"]


def test_bare_tensors_and_untracked_groups_use_the_shape_rule():
    tensors = [torch.zeros(s, requires_grad=True) for s, _ in SHAPE_CASES]
    for opt in (create_optimizer("muon", tensors), hf_rmsuon.Muon(tensors)):
        tracks = _tracks_in_optimizer(opt)
        assert [tracks[id(p)] for p in tensors] == [t for _, t in SHAPE_CASES]
    # a group without a track keeps its tensors and settings; each tensor is routed by the shape rule
    opt = hf_rmsuon.RMSuon([{"params": tensors[:3], "lr": 0.5}, {"params": tensors[3:], "track": "adamw"}], lr=0.1)
    assert len(opt.param_groups) == 2
    assert opt.param_groups[0]["lr"] == 0.5 and opt.param_groups[1]["lr"] == 0.1
    assert [id(p) for p in opt.param_groups[0]["params"]] == [id(p) for p in tensors[:3]]
    tracks = _tracks_in_optimizer(opt)
    assert [tracks[id(p)] for p in tensors[:3]] == ["adamw", "matrix", "matrix"]
    assert all(tracks[id(p)] == "adamw" for p in tensors[3:])
    with pytest.raises(ValueError, match="track"):
        hf_rmsuon.RMSuon([{"params": tensors[:1], "track": "vector"}])


# --------------------------------------------------------------------------------------------------
# Name-pattern overrides and flagged guesses
# --------------------------------------------------------------------------------------------------


def test_pattern_overrides(ref):
    model = ref.tiny_causal_lm("qwen3", tied=False)
    opt = create_optimizer("ada_rmsuon", model, adamw_patterns=[r"mlp\.down_proj"], matrix_patterns=["embed_tokens",
                                                                                                      "no_such_layer"])
    report = opt.routing_report
    tracks = _tracks_in_optimizer(opt)
    for name, p in model.named_parameters():
        if "down_proj" in name:
            assert report.track_of(name) == "adamw" and tracks[id(p)] == "adamw"
        elif "embed_tokens" in name:
            assert report.track_of(name) == "matrix" and tracks[id(p)] == "matrix"
        elif "up_proj" in name:
            assert report.track_of(name) == "matrix"
    assert any("no_such_layer" in w for w in report.warnings)
    assert not any("down_proj" in w for w in report.warnings)
    assert "no_such_layer" in str(report)
    # patterns string form (as --optim_args gives them): "a:b"
    opt = create_optimizer("ada_rmsuon", model, adamw_patterns="down_proj:up_proj")
    assert all(opt.routing_report.track_of(n) == "adamw" for n, _ in model.named_parameters() if "_proj" in n and
               "mlp" in n and "gate" not in n)
    # a vector cannot be forced onto the matrix track
    with pytest.raises(ValueError, match="matrix"):
        create_optimizer("ada_rmsuon", model, matrix_patterns=["norm"])
    # patterns need names
    with pytest.raises(ValueError, match="model"):
        create_optimizer("ada_rmsuon", list(model.parameters()), adamw_patterns=["x"])


class _RawParams(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.table = nn.Parameter(torch.zeros(6, 4))  # 2-D, but not a Linear/Conv/Embedding weight
        self.huge = nn.Parameter(torch.zeros(10001, 2))

    def forward(self, x):
        return self.lin(x) + self.table.sum() + self.huge.sum()


def test_shape_rule_guesses_are_flagged_in_the_report():
    model = _RawParams()
    report = route_model(model)
    assert report.track_of("lin.weight") == "matrix" and report.track_of("lin.bias") == "adamw"
    assert report.track_of("table") == "matrix" and report.track_of("huge") == "adamw"
    flagged = {e.name for e in report.entries if e.flagged}
    assert flagged == {"table", "huge"}
    assert any("table" in w and "shape rule" in w for w in report.warnings)
    assert "<-- check" in str(report)


def test_frozen_parameters_are_not_routed(ref):
    model = ref.tiny_causal_lm("qwen3")
    model.model.layers[0].self_attn.q_proj.weight.requires_grad_(False)
    opt = create_optimizer("muon", model)
    assert id(model.model.layers[0].self_attn.q_proj.weight) not in _tracks_in_optimizer(opt)
    assert "model.layers.0.self_attn.q_proj.weight" not in str(opt.routing_report)


# --------------------------------------------------------------------------------------------------
# PEFT: LoRA, modules_to_save, DoRA
# --------------------------------------------------------------------------------------------------


def _peft(ref, **lora_kwargs):
    from peft import LoraConfig, get_peft_model

    model = ref.tiny_causal_lm("qwen3", tied=False)
    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, **lora_kwargs))


@pytest.mark.parametrize("policy,a_track,b_track", [("both", "matrix", "matrix"), ("B", "adamw", "matrix"),
                                                    ("none", "adamw", "adamw")])
def test_lora_policy(ref, policy, a_track, b_track):
    model = _peft(ref, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"])
    opt = create_optimizer("ars2_neo", model, lora_policy=policy)
    report = opt.routing_report
    tracks = _tracks_in_optimizer(opt)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert {id(p) for p in trainable.values()} == set(tracks)
    n_a = n_b = 0
    for name, p in trainable.items():
        if ".lora_A." in name:
            n_a += 1
            assert report.track_of(name) == a_track and tracks[id(p)] == a_track
        elif ".lora_B." in name:
            n_b += 1
            assert report.track_of(name) == b_track and tracks[id(p)] == b_track
        elif "modules_to_save" in name:  # PEFT's trainable copy of the output head
            assert name.endswith("lm_head.modules_to_save.default.weight")
            assert report.track_of(name) == "adamw" and tracks[id(p)] == "adamw"
        else:
            raise AssertionError(f"unexpected trainable tensor {name}")
    assert n_a == n_b == 4  # 2 layers × (q_proj, v_proj)
    assert not any("original_module" in e.name or "base_layer" in e.name for e in report.entries)


def test_dora_magnitudes_and_lora_embedding_factors(ref):
    model = _peft(ref, target_modules=["q_proj", "v_proj", "embed_tokens"], use_dora=True)
    opt = create_optimizer("ada_rmsuon", model)
    report = opt.routing_report
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    magnitudes = [n for n in names if "lora_magnitude_vector" in n]
    emb_factors = [n for n in names if "lora_embedding_" in n]
    assert magnitudes and emb_factors
    for n in magnitudes + emb_factors:
        assert report.track_of(n) == "adamw", n
    for n in names:
        if ".lora_A." in n or ".lora_B." in n:
            assert report.track_of(n) == "matrix", n


@pytest.mark.parametrize("name", hf_rmsuon.available_optimizers())
def test_zero_initialised_lora_factors_are_safe(ref, name):
    model = _peft(ref, target_modules=["q_proj", "v_proj"])
    opt = create_optimizer(name, model, lr=1e-3)
    ids = ref.token_batch(1)

    def closure():
        opt.zero_grad()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        return loss

    for _ in range(2):
        opt.step(closure)
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert torch.isfinite(p).all(), n
    assert opt.diagnostics()["nonfinite_steps"] == 0
    lora_b = [p for n, p in model.named_parameters() if ".lora_B." in n]
    assert any(p.abs().sum() > 0 for p in lora_b)  # B (initialised to 0) has moved


def test_invalid_lora_policy(ref):
    model = ref.tiny_causal_lm("qwen3")
    for call in (lambda: route_model(model, lora_policy="A"), lambda: create_optimizer("ars", model, lora_policy="A")):
        with pytest.raises(ValueError, match="lora_policy"):
            call()
