"""recipes/cifar10.py: ResNet-18 (CIFAR variant), torch augmentation, the offline fallback, routing."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

RECIPES = Path(__file__).resolve().parent.parent / "recipes"
sys.path.insert(0, str(RECIPES))

import _common as common  # noqa: E402
import cifar10  # noqa: E402


def test_resnet18_cifar_variant():
    model = cifar10.ResNet18(10, 64)
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
    assert not any(isinstance(m, torch.nn.MaxPool2d) for m in model.modules())
    assert sum(p.numel() for p in model.parameters()) == 11_173_962  # the standard CIFAR ResNet-18
    small = cifar10.ResNet18(10, 8)
    assert small(torch.zeros(2, 3, 32, 32)).shape == (2, 10)


def test_random_crop_is_a_window_of_the_zero_padded_image():
    x = torch.rand(6, 3, 8, 8)
    gen = torch.Generator().manual_seed(0)
    out = cifar10.random_crop(x, 2, gen)
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for i in range(len(x)):
        assert any(torch.equal(out[i], padded[i, :, dy:dy + 8, dx:dx + 8]) for dy in range(5) for dx in range(5))
    assert torch.equal(cifar10.random_crop(x, 0, gen), x)


def test_flip_and_cutout():
    x = torch.rand(64, 3, 8, 8)
    gen = torch.Generator().manual_seed(0)
    out = cifar10.random_flip(x, gen)
    flipped = [torch.equal(o, xi.flip(2)) for o, xi in zip(out, x)]
    kept = [torch.equal(o, xi) for o, xi in zip(out, x)]
    assert all(f or k for f, k in zip(flipped, kept)) and 10 < sum(flipped) < 54
    cut = cifar10.cutout(torch.ones(64, 3, 8, 8), 4, gen)
    zeros = (cut == 0).all(dim=1).sum(dim=(1, 2))  # zeroed pixels per image, same in every channel
    assert (zeros <= 16).all() and (zeros > 0).all() and (zeros == 16).any()
    aug = cifar10.augment((x * 255).to(torch.uint8), gen)
    assert aug.shape == x.shape and aug.dtype == torch.float32


def test_conv_weights_on_the_matrix_track_with_their_out_by_rest_view():
    model = cifar10.ResNet18(10, 8)
    opt = cifar10.build_optimizer("ada_rmsuon", model, 1e-3)
    report = opt.routing_report
    convs = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)}
    assert len(convs) == 20
    for name, conv in convs.items():
        spec = report.spec_of(f"{name}.weight")
        out, *rest = conv.weight.shape
        assert spec.track == "matrix", name
        assert tuple(spec.matrix_shape) == (out, math.prod(rest)), name  # the (out, -1) view
        assert f"({out}, {math.prod(rest)})" in str(report)
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            assert report.spec_of(f"{name}.weight").track == "adamw"


def test_runs_offline_in_a_few_steps(tmp_path, capsys):
    summary = cifar10.main(["--synthetic", "--optim", "ars2_neo", "--optim_args", "k=2", "--width", "8",
                            "--epochs", "2", "--max_steps", "3", "--batch_size", "16", "--synthetic_train", "32",
                            "--synthetic_test", "32", "--output_dir", str(tmp_path), "--no_progress"])
    out = capsys.readouterr().out
    assert "NOT CIFAR-10" in out and "[cifar10] summary:" in out and "routing report" in out
    assert summary["smoke_run"] and summary["steps"] == 3 and summary["epochs_run"] == 2
    assert 0.0 <= summary["final_test_acc"] <= 1.0 and summary["best_test_acc"] >= summary["final_test_acc"]
    assert json.loads((tmp_path / "summary.json").read_text())["steps"] == 3


def test_hub_failure_falls_back_to_synthetic_images(tmp_path, capsys, monkeypatch):
    def unreachable(name):
        raise common.HubUnavailable("no network (test)")

    monkeypatch.setattr(cifar10, "load_cifar10", unreachable)
    summary = cifar10.main(["--optim", "adamw", "--width", "4", "--epochs", "1", "--max_steps", "1",
                            "--synthetic_train", "16", "--synthetic_test", "16", "--output_dir", str(tmp_path),
                            "--no_progress"])
    out = capsys.readouterr().out
    assert "SYNTHETIC IMAGES, NOT CIFAR-10" in out and "no network (test)" in out
    assert summary["smoke_run"] and summary["data_source"].startswith("synthetic")


def test_bad_optim_args_fail_before_any_data(tmp_path):
    with pytest.raises(common.RecipeError, match="nope"):
        cifar10.main(["--optim", "rmsuon", "--optim_args", "nope=1", "--output_dir", str(tmp_path)])
