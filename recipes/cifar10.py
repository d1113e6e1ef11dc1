#!/usr/bin/env python
"""CIFAR-10 image classification with ResNet-18 (CIFAR variant) and any family optimizer.

    python recipes/cifar10.py --optim ars2_neo --optim_args "rho=0.1,k=1" --epochs 10   # seed 004's run
    python recipes/cifar10.py --optim rmsuon --epochs 10                               # seed 003's table
    python recipes/cifar10.py --optim adamw --epochs 10                                # torch.optim.AdamW
    python recipes/cifar10.py --synthetic --width 16 --epochs 2                        # offline smoke run

Model: ResNet-18 for 32×32 inputs — a 3×3 stem convolution (stride 1) and no max-pool, then four
stages of two basic blocks (64, 128, 256, 512 channels at the default ``--width 64``), global
average pooling and a linear classifier. Augmentation (training only), written in torch so that no
torchvision is needed: random crop with 4-pixel zero padding, horizontal flip, Cutout (one
``--cutout``-pixel square set to zero after normalisation; 0 disables). Evaluation on the test split
after every epoch; the summary gives the best and the final test accuracy.

Routing: the family optimizers get the model (``hf_rmsuon.create_optimizer``): convolution and
linear weights go to the matrix track — a convolution weight ``(out, in, kh, kw)`` is orthogonalized
as its ``(out, in·kh·kw)`` view — and BatchNorm weights/biases to the AdamW track; the routing
report is printed at the start. Sharpness-aware members get a closure; their second pass leaves the
BatchNorm running statistics alone.

Data: ``datasets.load_dataset("uoft-cs/cifar10")`` from the Hugging Face Hub (or its local cache).
When the Hub cannot be reached — or with ``--synthetic`` — the recipe trains on small *synthetic*
images (ten noisy class templates) with a loud notice: a smoke run that shows the pipeline works,
whose accuracies say nothing about CIFAR-10.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import _common as common
import datasets
import numpy as np
import torch
import torch.nn.functional as F
from huggingface_hub import is_offline_mode
from torch import Tensor, nn
from tqdm.auto import tqdm

import hf_rmsuon

TAG = "cifar10"
BASELINE = "adamw"
HUB_DATASET = "uoft-cs/cifar10"
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
#: per-channel mean and standard deviation of the CIFAR-10 training images (the usual constants)
MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)


# --------------------------------------------------------------------------------------------------
# model
# --------------------------------------------------------------------------------------------------


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet18(nn.Module):
    """ResNet-18, CIFAR variant: 3×3 stride-1 stem, no max-pool; ``width`` channels in the first
    stage (64 is the standard network, 11.2 M parameters; tests use 8)."""

    def __init__(self, num_classes: int = 10, width: int = 64):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        layers, c_in = [], width
        for i, c_out in enumerate((width, 2 * width, 4 * width, 8 * width)):
            stride = 1 if i == 0 else 2
            layers.append(nn.Sequential(BasicBlock(c_in, c_out, stride), BasicBlock(c_out, c_out, 1)))
            c_in = c_out
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.fc = nn.Linear(c_in, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(out, 1), 1))


# --------------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------------


@dataclass
class ImageData:
    """uint8 images ``(N, 3, H, W)`` and int64 labels, for both splits."""

    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor
    source: str
    synthetic: bool = False

    @property
    def kind(self) -> str:
        return "synthetic(smoke)" if self.synthetic else "hub"


def synthetic_notice(reason: str) -> str:
    return common.banner(
        "SMOKE RUN — SYNTHETIC IMAGES, NOT CIFAR-10",
        [
            f"why: {reason}",
            "The recipe trains on small synthetic 32×32 images (ten fixed random class templates plus",
            "noise and random shifts). This only shows that the pipeline works end to end;",
            "its accuracies are NOT CIFAR-10 results and say nothing about the optimizers.",
            f"For a real run, let the recipe reach the Hugging Face Hub (dataset {HUB_DATASET}) or have",
            "it in the local datasets cache (HF_DATASETS_OFFLINE=1 then uses the cache).",
        ],
    )


def synthetic_images(n_train: int, n_test: int, seed: int = 0, size: int = 32) -> ImageData:
    """Ten classes, each a fixed smooth random colour template; a sample is its class template,
    randomly shifted by up to 4 pixels, plus pixel noise — learnable, but not trivially. Deterministic."""
    gen = torch.Generator().manual_seed(seed)
    low = torch.rand(len(CLASSES), 3, 4, 4, generator=gen)
    templates = F.interpolate(low, size=(size, size), mode="bilinear", align_corners=False)

    def sample(n: int) -> tuple[Tensor, Tensor]:
        y = torch.randint(0, len(CLASSES), (n,), generator=gen)
        shifts = torch.randint(-4, 5, (n, 2), generator=gen)
        x = torch.stack([torch.roll(templates[c], (int(dy), int(dx)), dims=(1, 2))
                         for c, (dy, dx) in zip(y.tolist(), shifts.tolist())])
        x = (x + 0.25 * torch.randn(x.shape, generator=gen)).clamp(0, 1)
        return (x * 255).round().to(torch.uint8), y

    train_x, train_y = sample(n_train)
    test_x, test_y = sample(n_test)
    return ImageData(train_x, train_y, test_x, test_y,
                     f"synthetic images ({n_train} train, {n_test} test; smoke run)", synthetic=True)


def _to_tensors(split: Any) -> tuple[Tensor, Tensor]:
    image_col = "img" if "img" in split.column_names else "image"
    label_col = "label" if "label" in split.column_names else "labels"
    images = np.stack([np.asarray(img.convert("RGB") if hasattr(img, "convert") else img, dtype=np.uint8)
                       for img in split[image_col]])
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), torch.as_tensor(split[label_col], dtype=torch.long)


def load_cifar10(dataset_name: str = HUB_DATASET) -> ImageData:
    """CIFAR-10 from the Hub (or the local datasets cache); raises :class:`common.HubUnavailable`."""
    offline = is_offline_mode() or bool(datasets.config.HF_DATASETS_OFFLINE)
    if not offline:
        reason = common.probe_hub()
        if reason is not None:
            raise common.HubUnavailable(reason)
    try:
        ds = datasets.load_dataset(dataset_name)
    except Exception as err:  # datasets raises many types for "not reachable / not cached"
        raise common.HubUnavailable(f"load_dataset({dataset_name!r}) failed: {type(err).__name__}: "
                                    f"{str(err).splitlines()[0] if str(err) else ''}") from err
    if "train" not in ds or "test" not in ds:
        raise common.RecipeError(f"{dataset_name} has no train/test splits (splits: {list(ds)})")
    train_x, train_y = _to_tensors(ds["train"])
    test_x, test_y = _to_tensors(ds["test"])
    return ImageData(train_x, train_y, test_x, test_y, f"hub {dataset_name}")


def get_data(args: argparse.Namespace) -> ImageData:
    if args.synthetic:
        print(synthetic_notice("--synthetic was given"), flush=True)
        data = synthetic_images(args.synthetic_train, args.synthetic_test, args.seed)
    else:
        try:
            data = load_cifar10(args.dataset_name)
        except common.HubUnavailable as err:
            print(synthetic_notice(str(err)), flush=True)
            data = synthetic_images(args.synthetic_train, args.synthetic_test, args.seed)
    if args.max_train_samples:
        data.train_x, data.train_y = data.train_x[: args.max_train_samples], data.train_y[: args.max_train_samples]
    if args.max_eval_samples:
        data.test_x, data.test_y = data.test_x[: args.max_eval_samples], data.test_y[: args.max_eval_samples]
    if len(data.train_y) == 0 or len(data.test_y) == 0:
        raise common.RecipeError("no images left in the training or test split")
    return data


# --------------------------------------------------------------------------------------------------
# augmentation (batched, in torch)
# --------------------------------------------------------------------------------------------------


def normalize(x: Tensor) -> Tensor:
    """uint8 or [0, 1] images → normalised float (CIFAR-10 mean/std)."""
    x = x.float() / 255.0 if x.dtype == torch.uint8 else x
    mean = torch.tensor(MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def random_crop(x: Tensor, padding: int, gen: torch.Generator) -> Tensor:
    """Per image: zero-pad by ``padding`` on every side, then crop back to the original size at a
    random offset (torchvision's ``RandomCrop(size, padding)``)."""
    if padding <= 0:
        return x
    n, _, h, w = x.shape
    padded = F.pad(x, (padding,) * 4)
    dy = torch.randint(0, 2 * padding + 1, (n,), generator=gen).to(x.device)
    dx = torch.randint(0, 2 * padding + 1, (n,), generator=gen).to(x.device)
    rows = (dy[:, None] + torch.arange(h, device=x.device))[:, :, None]  # (n, h, 1)
    cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, :]  # (n, 1, w)
    batch = torch.arange(n, device=x.device)[:, None, None]
    return padded.permute(0, 2, 3, 1)[batch, rows, cols].permute(0, 3, 1, 2).contiguous()


def random_flip(x: Tensor, gen: torch.Generator) -> Tensor:
    """Flip each image left-right with probability 1/2."""
    flip = (torch.rand(len(x), generator=gen) < 0.5).to(x.device)
    return torch.where(flip[:, None, None, None], x.flip(3), x)


def cutout(x: Tensor, size: int, gen: torch.Generator) -> Tensor:
    """Cutout (DeVries & Taylor 2017): per image, a ``size``×``size`` square at a random centre (it
    may reach over the border) set to zero."""
    if size <= 0:
        return x
    n, _, h, w = x.shape
    cy = torch.randint(0, h, (n,), generator=gen).to(x.device)
    cx = torch.randint(0, w, (n,), generator=gen).to(x.device)
    ys = torch.arange(h, device=x.device)[None, :]
    xs = torch.arange(w, device=x.device)[None, :]
    in_y = (ys >= (cy - size // 2)[:, None]) & (ys < (cy - size // 2 + size)[:, None])  # (n, h)
    in_x = (xs >= (cx - size // 2)[:, None]) & (xs < (cx - size // 2 + size)[:, None])  # (n, w)
    mask = in_y[:, :, None] & in_x[:, None, :]
    return x.masked_fill(mask[:, None], 0.0)


def augment(x_uint8: Tensor, gen: torch.Generator, crop_padding: int = 4, flip: bool = True,
            cutout_size: int = 16) -> Tensor:
    """Training augmentation: crop with zero padding and flip on the [0, 1] image, then normalise,
    then Cutout (zeros in normalised space, i.e. the mean colour)."""
    x = x_uint8.float() / 255.0
    x = random_crop(x, crop_padding, gen)
    if flip:
        x = random_flip(x, gen)
    return cutout(normalize(x), cutout_size, gen)


# --------------------------------------------------------------------------------------------------
# training
# --------------------------------------------------------------------------------------------------


def build_optimizer(optim: str, model: nn.Module, lr: float, weight_decay: float | None = None,
                    optim_args: dict[str, Any] | None = None) -> torch.optim.Optimizer:
    """``torch.optim.AdamW`` for ``"adamw"`` (weight decay 5e-4 unless given, BatchNorm parameters
    undecayed), else the family member with model-aware routing (its own default weight decay unless
    given)."""
    if optim == BASELINE:
        if optim_args:
            raise common.RecipeError(f"--optim_args are for family optimizers, not {BASELINE}")
        decay = [p for p in model.parameters() if p.ndim >= 2]
        no_decay = [p for p in model.parameters() if p.ndim < 2]
        wd = 5e-4 if weight_decay is None else weight_decay
        return torch.optim.AdamW([{"params": decay, "weight_decay": wd}, {"params": no_decay, "weight_decay": 0.0}],
                                 lr=lr)
    extra = dict(optim_args or {})
    if weight_decay is not None:
        extra["weight_decay"] = weight_decay
    return hf_rmsuon.create_optimizer(optim, model, lr=lr, **extra)


def default_learning_rate(optim: str) -> float:
    """The recipes' per-optimizer default (``_common.RECOMMENDED_LR``: measured on WikiText-2, not on
    CIFAR-10 — a starting point)."""
    return common.recommended_learning_rate("adamw_torch" if optim == BASELINE else optim)


@torch.no_grad()
def evaluate(model: nn.Module, x: Tensor, y: Tensor, device: torch.device, batch_size: int = 500) -> tuple[float, float]:
    """(mean loss, accuracy) on un-augmented, normalised images."""
    model.eval()
    loss_sum, correct = 0.0, 0
    for start in range(0, len(y), batch_size):
        xb = normalize(x[start:start + batch_size].to(device))
        yb = y[start:start + batch_size].to(device)
        logits = model(xb)
        loss_sum += F.cross_entropy(logits.float(), yb, reduction="sum").item()
        correct += (logits.argmax(dim=-1) == yb).sum().item()
    model.train()
    return loss_sum / len(y), correct / len(y)


def lr_factor(schedule: str, step: int, total: int, warmup: int) -> float:
    """Multiplier of the base learning rate at optimizer step ``step`` (0-based)."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def train(args: argparse.Namespace, data: ImageData) -> dict[str, Any]:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(args.seed)
    model = ResNet18(len(CLASSES), args.width).to(device)
    optim_args = hf_rmsuon.parse_optim_args(args.optim, args.optim_args) if args.optim != BASELINE else {}
    if args.optim == BASELINE and args.optim_args:
        raise common.RecipeError(f"--optim_args are for family optimizers, not {BASELINE}")
    lr = args.learning_rate if args.learning_rate is not None else default_learning_rate(args.optim)
    optimizer = build_optimizer(args.optim, model, lr, args.weight_decay, optim_args)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"[{TAG}] data: {data.source}; {len(data.train_y)} training, {len(data.test_y)} test images "
          f"({tuple(data.train_x.shape[1:])})", flush=True)
    print(f"[{TAG}] model: ResNet-18 (CIFAR variant, width {args.width}), {n_params:,} parameters; optimizer "
          f"{args.optim} lr {lr:g}{' (recipe default)' if args.learning_rate is None else ''}, "
          f"{args.lr_schedule} schedule, warm-up {args.warmup_epochs:g} epochs; augmentation: crop pad "
          f"{args.crop_padding}, flip {'on' if not args.no_flip else 'off'}, cutout {args.cutout}", flush=True)
    report = getattr(optimizer, "routing_report", None)
    if report is not None:
        print(f"[{TAG}] {type(optimizer).__name__} — routing report:\n{report}", flush=True)

    steps_per_epoch = math.ceil(len(data.train_y) / args.batch_size)
    total_steps = steps_per_epoch * args.epochs
    if args.max_steps:
        total_steps = min(total_steps, args.max_steps)
    warmup = int(round(args.warmup_epochs * steps_per_epoch))
    base_lrs = [g["lr"] for g in optimizer.param_groups]
    gen = torch.Generator().manual_seed(args.seed + 1)
    history: list[dict[str, Any]] = []
    step = 0
    clock = time.perf_counter()
    train_x, train_y = data.train_x.to(device), data.train_y.to(device)
    for epoch in range(1, args.epochs + 1):
        epoch_start = time.perf_counter()
        order = torch.randperm(len(train_y), generator=gen).to(device)
        loss_sum = correct = seen = 0
        bar = tqdm(range(0, len(order), args.batch_size), desc=f"epoch {epoch}/{args.epochs}", leave=False,
                   disable=args.no_progress, dynamic_ncols=True)
        for start in bar:
            if step >= total_steps:
                break
            idx = order[start:start + args.batch_size]
            xb, yb = augment(train_x[idx], gen, args.crop_padding, not args.no_flip, args.cutout), train_y[idx]
            for group, base in zip(optimizer.param_groups, base_lrs):
                group["lr"] = base * lr_factor(args.lr_schedule, step, total_steps, warmup)
            out: dict[str, Tensor] = {}

            def closure(xb: Tensor = xb, yb: Tensor = yb, out: dict[str, Tensor] = out) -> Tensor:
                optimizer.zero_grad(set_to_none=True)
                logits = model(xb)
                loss = F.cross_entropy(logits, yb)
                loss.backward()
                out.setdefault("logits", logits.detach())  # the first pass: the weights being trained
                return loss

            loss = optimizer.step(closure)
            if not torch.isfinite(loss):
                raise common.RecipeError(f"{args.optim}: training loss became {loss.item()} at step {step + 1}; "
                                         "try a smaller --learning_rate")
            loss_sum += loss.item() * len(yb)
            correct += (out["logits"].argmax(-1) == yb).sum().item()
            seen += len(yb)
            step += 1
            bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{correct / seen:.3f}")
        bar.close()
        test_loss, test_acc = evaluate(model, data.test_x, data.test_y, device)
        best = max([h["test_acc"] for h in history] + [test_acc])
        record = {"epoch": epoch, "step": step, "train_loss": loss_sum / max(seen, 1),
                  "train_acc": correct / max(seen, 1), "test_loss": test_loss, "test_acc": test_acc,
                  "lr": optimizer.param_groups[0]["lr"], "seconds": time.perf_counter() - epoch_start}
        history.append(record)
        print(f"[{TAG}] epoch {epoch}/{args.epochs} step {step}: train loss {record['train_loss']:.4f} "
              f"acc {record['train_acc']:.4f} | test loss {test_loss:.4f} acc {test_acc:.4f} (best {best:.4f}) "
              f"| {record['seconds']:.1f}s", flush=True)
        if step >= total_steps:
            break
    best_epoch = max(history, key=lambda h: h["test_acc"])
    diagnostics = optimizer.diagnostics() if hasattr(optimizer, "diagnostics") else {}
    return {
        "recipe": TAG, "optim": args.optim, "optim_args": args.optim_args, "learning_rate": lr,
        "weight_decay": args.weight_decay, "lr_schedule": args.lr_schedule, "epochs": args.epochs,
        "epochs_run": len(history), "steps": step, "batch_size": args.batch_size, "width": args.width,
        "parameters": n_params, "data_source": data.source, "smoke_run": data.synthetic, "seed": args.seed,
        "best_test_acc": best_epoch["test_acc"], "best_epoch": best_epoch["epoch"],
        "final_test_acc": history[-1]["test_acc"], "final_train_loss": history[-1]["train_loss"],
        "history": history, "train_seconds": time.perf_counter() - clock, "device": str(device),
        "diagnostics": {k: float(v) for k, v in diagnostics.items()},
        "augmentation": {"crop_padding": args.crop_padding, "flip": not args.no_flip, "cutout": args.cutout},
    }


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    names = [BASELINE, *hf_rmsuon.available_optimizers()]
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--optim", default="ars2_neo", choices=names, help="family member, or adamw (torch.optim.AdamW)")
    p.add_argument("--optim_args", default="", help='family hyperparameters, e.g. "rho=0.1,k=1"')
    p.add_argument("--learning_rate", "--lr", dest="learning_rate", type=float, default=None,
                   help="default: the recipes' per-optimizer table (recipes/_common.py)")
    p.add_argument("--weight_decay", type=float, default=None,
                   help="default: the family member's own default; 5e-4 for adamw")
    p.add_argument("--lr_schedule", choices=("cosine", "constant"), default="cosine")
    p.add_argument("--warmup_epochs", type=float, default=0.0)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--max_steps", type=int, default=0, help="stop after this many optimizer steps (0: no limit)")
    p.add_argument("--batch_size", type=int, default=128)
    p.add_argument("--width", type=int, default=64, help="channels of the first stage (64: standard ResNet-18)")
    p.add_argument("--crop_padding", type=int, default=4, help="random-crop padding (0: no crop)")
    p.add_argument("--no_flip", action="store_true", help="no horizontal flips")
    p.add_argument("--cutout", type=int, default=16, help="Cutout square side (0: no Cutout)")
    p.add_argument("--dataset_name", default=HUB_DATASET)
    p.add_argument("--synthetic", action="store_true",
                   help="skip the Hub and train on synthetic images (a smoke run, like the offline fallback)")
    p.add_argument("--synthetic_train", type=int, default=2000, help="synthetic training images")
    p.add_argument("--synthetic_test", type=int, default=500, help="synthetic test images")
    p.add_argument("--max_train_samples", type=int, default=0, help="use only the first N training images")
    p.add_argument("--max_eval_samples", type=int, default=0, help="use only the first N test images")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--output_dir", default=None, help="default: runs/cifar10-<optim>")
    p.add_argument("--no_progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    for name in ("epochs", "batch_size", "width"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the recipe; returns the summary (also written to ``<output_dir>/summary.json``)."""
    args = parse_args(argv)
    try:
        if args.optim != BASELINE:
            hf_rmsuon.parse_optim_args(args.optim, args.optim_args)  # fail before loading any data
    except (ValueError, TypeError) as err:
        raise common.RecipeError(str(err)) from None
    data = get_data(args)
    summary = train(args, data)
    out_dir = Path(args.output_dir or f"runs/{TAG}-{args.optim}")
    common.write_json(out_dir / "summary.json", summary)
    print(common.format_summary(TAG, {
        "optim": args.optim, "data": data.kind, "epochs": summary["epochs_run"], "steps": summary["steps"],
        "best_test_acc": summary["best_test_acc"], "best_epoch": summary["best_epoch"],
        "final_test_acc": summary["final_test_acc"], "train_time_s": round(summary["train_seconds"], 1),
        "output_dir": str(out_dir),
    }), flush=True)
    if data.synthetic:
        print(f"[{TAG}] (synthetic images: a smoke run, NOT CIFAR-10 — see the notice above)", flush=True)
    return summary


if __name__ == "__main__":
    common.run_main(main, sys.argv[1:])
