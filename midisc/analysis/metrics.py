"""Pure functions for reconstruction and sparsity metrics.

FVU (fraction of variance unexplained) is measured against the variance of the inputs about their own
mean, so a reconstruction that only learned the mean scores 1.0 and a perfect one 0.0.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from midisc.sae import SparseAutoencoder

# The version of the metric definitions below, recorded with every stored evaluation, so that a figure is only
# ever compared with figures that mean the same. tests/analysis/test_metrics.py pins each against values
# worked out by hand on a tiny input: changing a definition fails it, and then this number goes up.
#   1: FVU = Σ‖x − x̂‖² / Σ‖x − mean(x)‖² (explained variance = 1 − FVU, against the mean, not against zero);
#      MSE = Σ‖x − x̂‖² / (n d); L0 = mean count of codes > 0 per token; dead = no firing in the last
#      `dead_window` training tokens (in an evaluation: never fired on its tokens); CE loss recovered =
#      (CE zero-ablated − CE with SAE) / (CE zero-ablated − CE clean), per predicted token; the KL score alike.
METRICS_VERSION = 1


def mse(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    return (x_hat - x).pow(2).mean()


def fvu(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """Σ‖x − x̂‖² / Σ‖x − mean(x)‖² over the batch x [B, d]."""
    return (x_hat - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum().clamp_min(1e-12)


def l0(codes: torch.Tensor) -> torch.Tensor:
    """Mean number of active features per token."""
    return (codes > 0).float().sum(-1).mean()


def dead_fraction(tokens_since_fired: torch.Tensor, window: int) -> torch.Tensor:
    """Fraction of features that have not fired in the last `window` tokens."""
    return (tokens_since_fired >= window).float().mean()


class ReconstructionTotals:
    """Running sums over many batches, so FVU over a whole held-out set is exact, not a mean of batch FVUs."""

    def __init__(self) -> None:
        self.n = 0
        self.err2 = 0.0
        self.active = 0.0
        self.total = None  # Σx [d] in float64
        self.total2 = 0.0  # Σ‖x‖²
        self.d = 0

    def update(self, x: torch.Tensor, x_hat: torch.Tensor, codes: torch.Tensor) -> None:
        x64 = x.detach().double()
        self.n += len(x)
        self.d = x.shape[1]
        self.err2 += (x_hat.detach().double() - x64).pow(2).sum().item()
        self.active += (codes > 0).sum().item()
        s = x64.sum(0)
        self.total = s if self.total is None else self.total + s
        self.total2 += x64.pow(2).sum().item()

    def compute(self) -> dict[str, float]:
        if self.n == 0:
            raise ValueError("no activation vectors were measured")
        mean = self.total / self.n
        variance = self.total2 - self.n * mean.pow(2).sum().item()  # Σ‖x − x̄‖²
        return {"mse": self.err2 / (self.n * self.d), "fvu": self.err2 / max(variance, 1e-12),
                "l0": self.active / self.n}


def target_of(sae, x: torch.Tensor) -> torch.Tensor:
    """What the SAE's x_hat reconstructs of the vectors x: x itself, or a transcoder's output half."""
    return sae.target(x) if getattr(sae, "is_transcoder", False) else x


@torch.no_grad()
def reconstruction_metrics(sae: SparseAutoencoder, batches: Iterable[torch.Tensor]) -> dict[str, float]:
    """MSE, FVU and L0 of `sae` over all batches (e.g. the held-out activations)."""
    totals = ReconstructionTotals()
    device = sae.W_dec.device
    for x in batches:
        x = x.to(device, torch.float32)
        out = sae(x)
        totals.update(target_of(sae, x), out.x_hat, out.codes)
    return totals.compute()
