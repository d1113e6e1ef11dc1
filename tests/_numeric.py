"""Small numeric helpers shared by the optimizer tests, and the SAM closure recorder."""

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
