"""End to end: transformers' own FSDP2 (`from_pretrained(..., distributed_config=DistributedConfig(
fsdp_size=2))`) with `RMSuonTrainer` and with a plain `Trainer` after `install()`, `--optim ars2_neo`,
2 CPU ranks under torchrun: trains, runs the second forward on sync steps only, and follows the loss
curve of a DDP run of the same configuration."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from _numeric import free_port

SCRIPT = Path(__file__).parent / "scripts" / "fsdp2_trainer.py"


def _torchrun(mode: str, tmp: Path) -> dict:
    out = tmp / f"{mode}.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
         str(SCRIPT), mode, str(out), str(tmp / "checkpoint")],
        capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("fsdp2")
    return {mode: _torchrun(mode, tmp) for mode in ("ddp", "fsdp2", "fsdp2_install")}


def test_fsdp2_trainer_matches_ddp(runs):
    ddp, fsdp = runs["ddp"], runs["fsdp2"]
    assert fsdp["sharded"] and not ddp["sharded"] and ddp["split"]
    assert len(fsdp["loss"]) == len(ddp["loss"]) == 6
    for a, b in zip(fsdp["loss"], ddp["loss"]):
        assert a == pytest.approx(b, rel=1e-4)
    assert fsdp["loss"][-1] < fsdp["loss"][0]


@pytest.mark.parametrize("mode", ["fsdp2", "fsdp2_install", "ddp"])
def test_second_forward_on_sync_steps_only(runs, mode):
    # k=2: steps 1, 3, 5 sync; gradient accumulation 2 → 2 micro-batches, replayed on sync steps
    assert runs[mode]["forwards"] == [4, 2, 4, 2, 4, 2]
