"""Signum (Bernstein et al. 2018, "signSGD"): SGD on the sign of the momentum, the optimizer EleutherAI's sparsify
ships beside Adam. Every weight moves by exactly lr per step, whatever its gradient's scale."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

from midisc.sae.settings import number


class Signum(torch.optim.Optimizer):
    """w -= lr * sign(m), with m the exponential average of the gradients at rate 1 - momentum."""

    def __init__(self, params: Iterable[torch.nn.Parameter], lr: float = 1e-3, momentum: float = 0.9) -> None:
        defaults = {"lr": number("lr", lr, 0.0, strict=True), "momentum": number("momentum", momentum, 0.0, high=1.0)}
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum" not in state:
                    state["momentum"] = torch.zeros_like(p)
                average = state["momentum"].lerp_(p.grad, 1 - group["momentum"])
                p.add_(average.sign(), alpha=-group["lr"])
        return loss
