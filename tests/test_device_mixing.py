"""Every member steps on the ``meta`` device: any per-step tensor built on the CPU and mixed with
device tensors (a CUDA-only crash otherwise invisible on a CPU machine) raises here. The two host
reads of a step (the finiteness flag, AGA's decision) cannot run on meta and are patched out."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import hf_rmsuon
from hf_rmsuon.optim import base


@pytest.mark.parametrize("name", hf_rmsuon.available_optimizers())
def test_members_keep_every_tensor_on_the_parameters_device(name, monkeypatch):
    monkeypatch.setattr(base.FamilyOptimizer, "_finite_flag", lambda self, gathered: True)
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
        assert opt._last["update_rms"].device.type == "meta"
