"""Helpers shared by the tests: numeric comparisons, the SAM closure recorder and protocol driver,
and a free port for multi-process runs."""

import socket

import torch


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def assert_rel(got: torch.Tensor, want: torch.Tensor, tol: float) -> None:
    """‖got − want‖ ≤ tol·‖want‖ (Frobenius): robust to float32 NS rounding in single entries."""
    err = float((got.double() - want.double()).norm())
    scale = float(want.double().norm())
    assert err <= tol * scale, f"relative error {err / max(scale, 1e-300):.3g} > {tol}"


class Recorder:
    """A closure over (model, batch) that records, per call, the weights it saw, the gradients it
    produced and the loss — a test's own view of the passes of one SAM step."""

    def __init__(self, opt, model):
        self.opt, self.model = opt, model
        self.params = list(model.parameters())
        self.batch = None
        self.calls: list[dict] = []

    def __call__(self):
        self.opt.zero_grad()
        x, y = self.batch
        loss = torch.nn.functional.mse_loss(self.model(x), y)
        loss.backward()
        self.calls.append({"weights": [p.detach().clone() for p in self.params],
                           "grads": [p.grad.detach().clone() for p in self.params],
                           "loss": float(loss.detach())})
        return loss

    def step(self, batch):
        self.batch, self.calls = batch, []
        return self.opt.step(self)


class Driver:
    """``sam_pass_due → begin_sam_pass → (second backward) → end_sam_pass → step`` with given
    gradients; returns whether the step synced and the weights seen inside the second pass."""

    def __init__(self, opt, params):
        self.opt, self.params = opt, params

    def step(self, g, g_adv=None, loss=None, adv_loss=None):
        for p, gi in zip(self.params, g):
            p.grad = gi.clone()
        due = self.opt.sam_pass_due()
        perturbed = None
        if due:
            w = [p.detach().clone() for p in self.params]
            self.opt.begin_sam_pass()
            perturbed = [p.detach().clone() for p in self.params]
            assert all(torch.count_nonzero(p.grad) == 0 for p in self.params)  # zeroed for the replay
            for p, ga in zip(self.params, g_adv):
                p.grad.add_(ga)
            self.opt.end_sam_pass(loss, adv_loss)
            for p, a in zip(self.params, w):
                assert torch.equal(p.detach(), a)  # restored exactly, before the update
        self.opt.step()
        return due, perturbed


def free_port() -> int:
    """A free TCP port on the loopback interface (tests may run multi-process jobs side by side)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


#: SAM's schedule counts step() calls, applied or skipped (a skip is decided on the device, unseen by
#: the host); everything else in ``opt.sam`` must survive a skipped step unchanged.
SAM_SCHEDULE_KEYS = ("step", "last_sync", "syncs", "prev_lazy")


def assert_sam_state_unchanged(now: dict, before: dict) -> None:
    """``opt.sam`` outside the schedule (ν, ASI's ρ and averages) equals ``before`` exactly."""
    assert now.keys() == before.keys()
    for key, value in before.items():
        if key in SAM_SCHEDULE_KEYS:
            continue
        if isinstance(value, torch.Tensor) or isinstance(now[key], torch.Tensor):
            assert torch.equal(torch.as_tensor(now[key], dtype=torch.float64),
                               torch.as_tensor(value, dtype=torch.float64)), key
        else:
            assert now[key] == value, key
