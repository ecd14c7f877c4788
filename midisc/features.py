"""Per-feature statistics over a set of activation vectors, computed in one streaming pass.

Memory stays flat in the number of tokens: each batch updates a firing count, an activation sum and a
running max per feature, all vectorised over features.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

from midisc.sae import SparseAutoencoder


@dataclass
class FeatureStats:
    frequency: torch.Tensor        # [d_sae] fraction of tokens on which the feature fires
    mean_activation: torch.Tensor  # [d_sae] mean activation when it fires (0 if it never does)
    max_activation: torch.Tensor   # [d_sae] largest activation seen (0 if it never fires)
    n_tokens: int


@torch.no_grad()
def feature_stats(sae: SparseAutoencoder, batches: Iterable[torch.Tensor]) -> FeatureStats:
    device = sae.W_dec.device
    d_sae = sae.W_dec.shape[0]
    fires = torch.zeros(d_sae, dtype=torch.long, device=device)
    total = torch.zeros(d_sae, dtype=torch.float64, device=device)
    peak = torch.zeros(d_sae, device=device)
    n = 0
    for x in batches:
        codes = sae.encode(x.to(device, torch.float32))
        fires += (codes > 0).sum(0)
        total += codes.sum(0, dtype=torch.float64)
        peak = torch.maximum(peak, codes.max(0).values)
        n += len(codes)
    if n == 0:
        raise ValueError("feature statistics need at least one activation vector")
    return FeatureStats(frequency=(fires / n).float().cpu(),
                        mean_activation=(total / fires.clamp_min(1)).float().cpu(),
                        max_activation=peak.cpu(), n_tokens=n)
