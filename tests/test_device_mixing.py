"""Every member steps on the ``meta`` device, which has no values: any host read inside a step
(``item``, ``bool``, ``tolist``, ``float``) raises there, and so does any per-step tensor built on the
CPU and mixed with device tensors (a CUDA-only crash otherwise invisible on a CPU machine). Nothing is
patched out: a steady-state step of every member — SAM sync and lazy steps, ASI included — must be
free of both."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import hf_rmsuon


def _meta_model() -> nn.Module:
    with torch.device("meta"):
        return nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.Linear(16, 4))


@pytest.mark.parametrize("name", hf_rmsuon.available_optimizers())
def test_members_keep_every_tensor_on_the_parameters_device(name):
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.Linear(16, 4), nn.Conv1d(4, 4, 3))
    extra = {"k": 0} if name in ("ars", "ars2_neo") else {}
    for hp in ({}, {"energy_scale": "rms"}, {"natural_wd": "elementwise"}, {"adjust_lr": "match_rms_adamw"}):
        schema = hf_rmsuon.get_optimizer_class(name).schema
        if not all(k in schema for k in hp):
            continue
        opt = hf_rmsuon.create_optimizer(name, model, ns_dtype="float32", **extra, **hp)
        for _ in range(2):
            for p in model.parameters():
                p.grad = torch.empty_like(p)
            opt.step()
        assert all(v.device.type == "meta" for st in opt.state.values() for v in st.values()
                   if isinstance(v, torch.Tensor))
        assert opt._last["energy"].device.type == "meta"


@pytest.mark.parametrize("extra", [dict(k=1), dict(k=2), dict(k=3, asi=True), dict(k=2, asi=True, perturb_norm="per_tensor")])
@pytest.mark.parametrize("name", ["ars", "ars2_neo"])
def test_sam_sync_and_lazy_steps_never_read_the_device(name, extra):
    if name == "ars" and "asi" in extra:
        pytest.skip("ASI is ARS2-Neo's")
    model = _meta_model()
    x = torch.empty(4, 8, device="meta")
    opt = hf_rmsuon.create_optimizer(name, model, ns_dtype="float32", **extra)

    def closure():
        opt.zero_grad()
        loss = model(x).square().mean()
        loss.backward()
        return loss

    for _ in range(5):  # sync and lazy steps
        opt.step(closure)
    assert opt.sam["step"] == 5 and opt.sam["syncs"] == {1: 5, 2: 3, 3: 2}[extra["k"]]
    assert all(v.device.type == "meta" for st in opt.state.values() for v in st.values() if isinstance(v, torch.Tensor))
