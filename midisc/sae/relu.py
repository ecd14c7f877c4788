"""ReLU codes with an L1 penalty on decoder-norm-weighted codes (Anthropic, April 2024): SAELens's "standard"."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor

from midisc.sae.base import SparseAutoencoder
from midisc.sae.settings import number


class ReluSAE(SparseAutoencoder):
    """ReLU codes with an L1 penalty on decoder-norm-weighted codes (Anthropic, April 2024)."""

    architecture: ClassVar[str] = "standard"

    def __init__(
        self,
        d_in: int,
        expansion: int = 8,
        *,
        l1_coef: float = 1e-3,
        d_sae: int | None = None,
        seed: int | None = None,
    ) -> None:
        super().__init__(d_in, expansion, d_sae=d_sae, seed=seed)
        self.l1_coef = number("l1_coef", l1_coef, 0.0)

    def encode(self, x: Tensor) -> Tensor:
        if torch.is_grad_enabled() and self.W_enc.requires_grad:
            # Training: b_dec enters as b_dec @ W_enc, so its gradient is a vector product instead of the
            # [B, d_sae] x [d_sae, d_in] product back to the input batch (one of the step's six big products).
            return torch.relu(self.checked(x) @ self.W_enc + self.encoder_shift())
        return torch.relu(self.pre_acts(x))  # inference: SAELens's sums, bit for bit

    def objective(self, mse: Tensor, l1: Tensor, sparsity_scale: float = 1.0) -> Tensor:
        return mse + sparsity_scale * self.l1_coef * l1

    def hparams(self) -> dict[str, Any]:
        return {**super().hparams(), "l1_coef": self.l1_coef}

    def cfg_dict(self, metadata: dict | None = None) -> dict[str, Any]:
        # SAELens keeps l1_coefficient in its training config only; metadata is the one place a
        # SAELens-valid cfg.json can carry it, and load_sae reads it back from there.
        return super().cfg_dict({**(metadata or {}), "l1_coefficient": self.l1_coef})
