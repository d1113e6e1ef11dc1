"""benchmarks/scale.py: the host-sync counter and a smoke run on tiny shapes (the real run is `make bench-scale`)."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from benchmarks import scale
from hf_rmsuon import functional as F


def test_host_sync_counter_counts_known_reads_and_restores_torch():
    saved = {name: torch.Tensor.__dict__.get(name) for name in scale.SYNC_METHODS}
    t = torch.tensor([1.5])
    with scale.HostSyncCounter() as c:
        t.item()
        bool(t > 0)
        float(t)
        int(t)
        t.tolist()
        t.cpu()
        torch.ones(3).add_(1)  # not a read
        torch.tensor([2.0])  # an upload, counted apart
        torch.as_tensor(t)  # a tensor already: not an upload
    assert c.by_method == {"item": 1, "__bool__": 1, "__float__": 1, "__int__": 1, "tolist": 1, "cpu": 1}
    assert c.total == 6 and c.on_device == 0 and c.uploads == {"tensor": 1}
    assert c.as_dict()["total"] == 6
    assert {name: torch.Tensor.__dict__.get(name) for name in scale.SYNC_METHODS} == saved
    with scale.HostSyncCounter() as c:
        pass
    assert c.total == 0


def test_host_sync_counter_sees_a_family_step():
    import hf_rmsuon

    w = torch.nn.Parameter(torch.randn(8, 16))
    opt = hf_rmsuon.create_optimizer("muon", [w], lr=1e-2)
    w.grad = torch.randn(8, 16)
    opt.step()
    with scale.HostSyncCounter() as c:
        opt.step()
    assert c.total == 0 and not c.uploads  # a steady-state step never synchronises (issue 14)
    strict = hf_rmsuon.create_optimizer("muon", [w], lr=1e-2, on_nonfinite="raise")
    with scale.HostSyncCounter() as c:
        strict.step()
    assert c.by_method == {"__bool__": 1} and c.calls == ["__bool__"]  # the raise policy's one read


def test_scale_smoke_tiny(tmp_path):
    names = ("torch AdamW (foreach)", "torch AdamW (fused)", "torch Muon + AdamW (NS fp32)", "muon",
             "ada_rmsuon", "ars2_neo (k=5)", "muon (standard NS only)")
    cfg = replace(scale.SETTINGS["tiny"], opt_rounds=1, train_rounds=1, only=names)
    path = tmp_path / "scale.json"
    result = scale.run_scale(cfg, torch.device("cpu"), "auto", path, "tiny")
    data = json.loads(path.read_text())
    rows = data["optimizer_step"]["rows"]
    assert set(rows) == set(names)
    for name in names:
        assert rows[name]["wall"]["median_ms"] > 0, name
        assert rows[name]["host_syncs"], name
    summary = result["summary"]
    assert summary["optimizer_step"]["muon"]["limit_fraction"] > 0
    assert summary["adamw_track"]["ours_vs_fused"] > 0 and summary["adamw_track"]["hinted_vs_fused"] > 0
    assert 0 < summary["adamw_track"]["gate_vs_fused"]
    assert data["adamw_track"]["rows"][scale.GATE_ALONE]["samples"][0]["kind"] == "gate"
    assert summary["training_step"]["lazy_vs_ada_rmsuon"] is not None
    text = "\n".join(scale.section(data))
    assert "## Scale" in text and "Not run — no GPU was available" in text
    assert "the gate comes from the gradient norm the Trainer takes" in text
    assert "which alone measured" in text
    assert "SAM bookkeeping by depth" not in text  # an extra part, measured only when named


@pytest.mark.parametrize("routing", [None, {"cpu": 1 << 40}], ids=["cpu-fuses-all", "cpu-fuses-none"])
def test_scale_sam_bookkeeping_part_is_merged(tmp_path, monkeypatch, routing):
    """The extra part: the in-place chain, compile=True and (where compile=True does not fuse every
    tensor) the fused passes forced on, timed on one optimizer, each against the sync step, merged into an
    existing result with its own target rows and table."""
    if routing is not None:
        monkeypatch.setattr(F, "FUSED_SAM_MIN_NUMEL", routing)
    cfg = replace(scale.SETTINGS["tiny"], opt_rounds=1, train_rounds=1, only=("muon", "ars2_neo (k=5)"))
    path = tmp_path / "scale.json"
    scale.run_scale(cfg, torch.device("cpu"), "auto", path, "tiny")
    result = scale.run_scale(cfg, torch.device("cpu"), "auto", path, "tiny", parts=("sam_bookkeeping",))
    row = result["sam_bookkeeping"]["depths"]["1"]
    assert row["n_params"] > row["matrix_params"] > 0
    measured = scale.SAM_PATHS if routing else scale.SAM_PATHS[:2]
    for path_name in scale.SAM_PATHS:
        assert (path_name in row) == (path_name in measured), path_name
    for path_name in (*measured, scale.SAM_FLOOR):
        assert row[path_name]["median_ms"] > 0 and row[f"{path_name}_vs_step"] > 0
    assert "sam_bookkeeping_compiled_1_layers" in result["summary"]["targets"]
    assert F.FUSED_SAM_MIN_NUMEL == (routing or {"cpu": 0, "cuda": 1 << 24})  # restored after the "fused" path
    text = "\n".join(scale.section(json.loads(path.read_text())))
    assert "SAM bookkeeping by depth" in text and "| 1 |" in text and "plain SAM's least" in text
    assert "Even plain SAM's least" in text and "the 5% target at 1 layer(s)" in text
    assert ("= `compile=True`" in text) == (routing is None)
