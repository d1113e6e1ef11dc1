"""The registry (names, SPEC §4 defaults, typed schema), hyperparameter validation and the typed
``--optim_args`` parsing."""

from __future__ import annotations

import inspect
import re

import pytest
import torch

import hf_rmsuon
from hf_rmsuon import available_optimizers, create_optimizer, get_optimizer_class, parse_optim_args
from hf_rmsuon.registry import hyperparameter_schema

NAMES = ["muon", "pure_ns_muon", "adamuon", "rmsuon", "ada_rmsuon", "f_ada_rmsuon", "ars", "ars2_neo"]
SAM_MEMBERS = ("ars", "ars2_neo")
ADA = ("ada_rmsuon", "f_ada_rmsuon", "ars", "ars2_neo")


def test_registry_names_and_classes():
    assert available_optimizers() == NAMES
    classes = ["Muon", "PureNSMuon", "AdaMuon", "RMSuon", "AdaRMSuon", "FAdaRMSuon", "ARS", "ARS2Neo"]
    for name, cls_name in zip(NAMES, classes):
        cls = get_optimizer_class(name)
        assert cls is getattr(hf_rmsuon, cls_name)
        assert issubclass(cls, torch.optim.Optimizer) and cls.name == name


# The defaults table of SPEC §4, written out again.
SPEC_DEFAULTS = {
    "muon": dict(lr=1e-3, momentum=0.95, nesterov=True, weight_decay=0.1, adjust_lr="original"),
    "pure_ns_muon": dict(lr=1e-3, weight_decay=0.1),
    "adamuon": dict(lr=1e-3, betas=(0.95, 0.95), eps=1e-8, weight_decay=0.01),
    "rmsuon": dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01),
    "ada_rmsuon": dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01, energy_scale="reference"),
    "f_ada_rmsuon": dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01, energy_scale="reference",
                         natural_wd="projected"),
    "ars": dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01, energy_scale="reference", rho=0.1, k=1,
                alpha=0.1, adaptive=True, perturb_norm="global"),
    "ars2_neo": dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01, rho=0.1, k=1, alpha=0.1,
                     adaptive_sync=False, asi=False, aga_beta=0.99, aga_lambda=2.0, aga_gamma=2.0, aga_rule="abs",
                     adaptive=True, perturb_norm="global"),
}


@pytest.mark.parametrize("name", NAMES)
def test_defaults_follow_spec(name):
    defaults = get_optimizer_class(name).schema.defaults()
    for key, value in SPEC_DEFAULTS[name].items():
        assert defaults[key] == value, key
    assert defaults["ns_steps"] == 5 and tuple(defaults["ns_coefficients"]) == (3.4445, -4.7750, 2.0315)
    opt = get_optimizer_class(name)([torch.zeros(3, 3, requires_grad=True)])
    for key, value in SPEC_DEFAULTS[name].items():
        assert opt.defaults[key] == value, key
    # help() shows the class's own hyperparameters with their own defaults, then the routing options
    # and the two construction objects (model, data_parallel_group) — and nothing else
    sig = inspect.signature(get_optimizer_class(name))
    routing = list(hf_rmsuon.optim.base.ROUTING_HPARAMS.defaults())
    assert list(sig.parameters) == ["params", *defaults, *routing, "model", "data_parallel_group"]
    for key, value in defaults.items():
        assert sig.parameters[key].default == value, key
    schema = hyperparameter_schema(name)
    for key in ("lora_policy", "adamw_patterns", "matrix_patterns", "adamw_lr", "no_decay_1d"):
        assert key in schema


def test_unknown_name_lists_valid_names():
    for call in (lambda: get_optimizer_class("adam"), lambda: create_optimizer("adam", [torch.zeros(2, 2)]),
                 lambda: parse_optim_args("adam", "lr=1")):
        with pytest.raises(ValueError) as info:
            call()
        for name in NAMES:
            assert name in str(info.value)


# --------------------------------------------------------------------------------------------------
# Invalid hyperparameters → ValueError naming the argument
# --------------------------------------------------------------------------------------------------

COMMON_BAD = [
    ("lr", -1e-3), ("lr", float("nan")), ("weight_decay", -0.1), ("betas", (1.0, 0.9)), ("betas", (0.9, 1.0)),
    ("betas", (-0.1, 0.9)), ("betas", (0.9, 1.5)), ("betas", (0.9,)), ("eps", 0.0), ("eps", -1e-8), ("ns_steps", 0),
    ("ns_steps", -2), ("ns_steps", 2.5), ("ns_coefficients", (1.0, 2.0)), ("ns_dtype", "float16"),
    ("on_nonfinite", "ignore"),
]
CLASS_BAD = {
    "muon": [("adjust_lr", "x"), ("momentum", 1.0), ("momentum", -0.5), ("nesterov", "maybe")],
    "pure_ns_muon": [("adjust_lr", "spectral")],
    "ada_rmsuon": [("energy_scale", "x")],
    "f_ada_rmsuon": [("energy_scale", "x"), ("natural_wd", "x"), ("natural_wd", "euclidean")],
    "ars": [("rho", -0.1), ("k", -1), ("k", 1.5), ("alpha", -0.1), ("perturb_norm", "x"), ("adaptive", "yes please"),
            ("energy_scale", "x")],
    "ars2_neo": [("rho", -0.1), ("k", -1), ("aga_rule", "x"), ("aga_lambda", -1.0), ("aga_beta", -0.5),
                 ("aga_gamma", -2.0), ("perturb_norm", "spectral"), ("adaptive_sync", 2), ("asi", "on?")],
}
BAD_CASES = [(n, k, v) for n in NAMES for k, v in COMMON_BAD] + [
    (n, k, v) for n, cases in CLASS_BAD.items() for k, v in cases]


@pytest.mark.parametrize("name,key,value", BAD_CASES, ids=[f"{n}-{k}-{v}" for n, k, v in BAD_CASES])
def test_invalid_hyperparameter_names_the_argument(name, key, value):
    pattern = rf"\b{re.escape(key)}\b"
    params = [torch.zeros(3, 3, requires_grad=True), torch.zeros(3, requires_grad=True)]
    with pytest.raises(ValueError, match=pattern):
        get_optimizer_class(name)(params, **{key: value})
    with pytest.raises(ValueError, match=pattern):
        create_optimizer(name, params, **{key: value})
    if key not in get_optimizer_class(name).global_hparams:  # per param group as well
        with pytest.raises(ValueError, match=pattern):
            get_optimizer_class(name)([{"params": params[:1], "track": "matrix", key: value}])


@pytest.mark.parametrize("name", NAMES)
def test_unknown_hyperparameter_lists_the_valid_ones(name):
    foreign = "rho" if name not in SAM_MEMBERS else "adjust_lr"
    with pytest.raises(ValueError, match=foreign) as info:
        get_optimizer_class(name)([torch.zeros(2, 2, requires_grad=True)], **{foreign: 0.1})
    for key in get_optimizer_class(name).schema.defaults():
        assert key in str(info.value)


@pytest.mark.parametrize("name", NAMES)
def test_lora_policy_is_validated(ref, name):
    model = ref.tiny_causal_lm("qwen3")
    with pytest.raises(ValueError, match="lora_policy"):
        create_optimizer(name, model, lora_policy="x")


def test_optimizer_wide_options_cannot_differ_per_group():
    p = torch.zeros(3, 3, requires_grad=True)
    for cls, key, value in ((hf_rmsuon.ARS, "k", 2), (hf_rmsuon.ARS2Neo, "aga_rule", "signed"),
                            (hf_rmsuon.RMSuon, "on_nonfinite", "raise")):
        with pytest.raises(ValueError, match=key):
            cls([{"params": [p], "track": "matrix", key: value}])


def test_valid_values_are_accepted_and_normalised():
    p = torch.zeros(3, 3, requires_grad=True)
    opt = hf_rmsuon.ARS2Neo([p], lr=0, betas=[0.0, 0.5], k=0, rho=0, ns_steps=1, aga_rule="signed",
                            ns_dtype="float32", weight_decay=0)
    assert opt.defaults["betas"] == (0.0, 0.5) and opt.defaults["k"] == 0 and isinstance(opt.defaults["lr"], float)


# --------------------------------------------------------------------------------------------------
# --optim_args: typed parsing
# --------------------------------------------------------------------------------------------------


def test_parse_optim_args_types():
    parsed = parse_optim_args(
        "ars2_neo",
        "lr=3e-4, betas=0.9:0.95, k=3, adaptive_sync=true, asi=0, rho=0.05, aga_rule=signed, lora_policy=B, "
        "adamw_patterns=lm_head:embed, adamw_lr=1e-4, ns_coefficients=3:-4:2, ns_dtype=float32")
    assert parsed == {
        "lr": 3e-4, "betas": (0.9, 0.95), "k": 3, "adaptive_sync": True, "asi": False, "rho": 0.05,
        "aga_rule": "signed", "lora_policy": "B", "adamw_patterns": ("lm_head", "embed"), "adamw_lr": 1e-4,
        "ns_coefficients": (3.0, -4.0, 2.0), "ns_dtype": "float32",
    }
    assert isinstance(parsed["k"], int) and isinstance(parsed["lr"], float)
    for text, value in (("true", True), ("1", True), ("yes", True), ("on", True), ("False", False), ("0", False),
                        ("no", False), ("off", False)):
        assert parse_optim_args("muon", f"nesterov={text}") == {"nesterov": value}
    assert parse_optim_args("muon", "") == {} and parse_optim_args("muon", None) == {}
    assert parse_optim_args("rmsuon", "adamw_lr=none") == {"adamw_lr": None}


def test_parsed_args_build_the_optimizer(ref):
    model = ref.tiny_causal_lm("qwen3")
    opt = create_optimizer("ars2_neo", model, **parse_optim_args("ars2_neo", "k=3,betas=0.8:0.9,adaptive_sync=true"))
    assert opt.defaults["k"] == 3 and opt.defaults["betas"] == (0.8, 0.9) and opt.defaults["adaptive_sync"] is True


def test_parse_optim_args_unknown_key_lists_valid_keys():
    with pytest.raises(ValueError, match="rhoo") as info:
        parse_optim_args("ars", "rhoo=0.1")
    for key in hyperparameter_schema("ars").defaults():
        assert key in str(info.value)
    with pytest.raises(ValueError, match="rho"):
        parse_optim_args("muon", "rho=0.1")  # a SAM option on a non-SAM member


@pytest.mark.parametrize("text,key", [
    ("k=abc", "k"), ("k=1.5", "k"), ("rho=abc", "rho"), ("rho=-1", "rho"), ("adaptive_sync=maybe", "adaptive_sync"),
    ("betas=0.9", "betas"), ("betas=0.9:1.2", "betas"), ("betas=a:b", "betas"), ("aga_rule=x", "aga_rule"),
    ("lora_policy=A", "lora_policy"), ("ns_steps=0", "ns_steps"), ("lr=", "lr"), ("rho", "rho"),
    ("rho=0.1,rho=0.2", "rho"),
])
def test_parse_optim_args_rejects_bad_values(text, key):
    with pytest.raises(ValueError, match=rf"\b{key}\b"):
        parse_optim_args("ars2_neo", text)
