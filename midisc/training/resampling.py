"""Dead-feature resampling for ReLU + L1 SAEs (Anthropic, "Towards Monosemanticity", 2023, appendix
"Neuron Resampling").

A feature that never fires gets no gradient from the reconstruction and only shrinking pressure from
the L1 penalty, so it stays dead and its share of the dictionary is wasted. TopK SAEs revive such
features with the AuxK loss; ReLU + L1 SAEs have no such term, so every so often we point each dead
feature at an input the SAE reconstructs badly, which gives it something useful to learn at once.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from midisc.sae import SparseAutoencoder

# Guards the normalisation of a centred input that happens to sit exactly on b_dec.
_EPS = 1e-8
# Inputs per forward pass while scoring: codes are [chunk, d_sae], and a resampling sample is often
# hundreds of thousands of inputs, far too many for one dense pass on a wide SAE.
_CHUNK = 4096


@torch.no_grad()
def resample_dead(
    sae: SparseAutoencoder,
    optimizer: torch.optim.Optimizer | None,
    x: Tensor,
    dead: Tensor,
    *,
    generator: torch.Generator | None = None,
    encoder_scale: float = 0.2,
) -> int:
    """Re-initialise the dead features of `sae` from high-loss inputs in x [N, d_in]; return how many.

    dead [d_sae] bool marks the features to resample (no dead feature: nothing changes, returns 0).
    Each one gets an input v drawn with probability proportional to ||v - x_hat||^4 (the square of its
    squared error), its decoder row becomes the unit vector along v - b_dec, its encoder column that
    vector times encoder_scale times the mean encoder-column norm of the other (alive) features, and its
    b_enc zero. Optimizer state shaped like W_enc, b_enc or W_dec (Adam's moments) is zeroed for them.
    """
    if x.ndim != 2 or x.shape[1] != sae.d_in or x.shape[0] == 0:
        raise ValueError(f"x must be a non-empty sample of shape [N, {sae.d_in}], got {tuple(x.shape)}")
    if dead.dtype != torch.bool or tuple(dead.shape) != (sae.d_sae,):
        raise ValueError(
            f"dead must be a bool mask of shape ({sae.d_sae},), got {dead.dtype} of shape {tuple(dead.shape)}"
        )
    if not isinstance(encoder_scale, (int, float)) or isinstance(encoder_scale, bool) \
            or not math.isfinite(encoder_scale) or encoder_scale <= 0:
        raise ValueError(f"encoder_scale must be a finite number > 0, got {encoder_scale!r}")
    device = sae.W_enc.device
    idx = dead.to(device).nonzero().squeeze(1)
    n_dead = idx.numel()
    if n_dead == 0:
        return 0

    x = x.to(device=device, dtype=torch.float32)
    # float64 so the fourth power of a large error does not overflow to inf.
    sq_err = torch.cat([(sae(c).x_hat.float() - c).pow(2).sum(dim=1) for c in x.split(_CHUNK)]).double()
    if not torch.isfinite(sq_err).all():
        raise ValueError("the SAE's reconstruction error is not finite on some inputs; cannot resample from it")
    weights = sq_err.pow(2)
    # A perfect reconstruction everywhere leaves no preference: draw uniformly instead.
    weights = weights if weights.max() > 0 else torch.ones_like(weights)
    weights = weights / weights.max()
    # Without replacement, so dead features spread over distinct bad inputs instead of all copying the
    # worst one; only when fewer inputs have any error than there are dead features must inputs repeat.
    replace = int((weights > 0).sum()) < n_dead
    if generator is not None:
        weights = weights.to(generator.device)
    chosen = torch.multinomial(weights, n_dead, replacement=replace, generator=generator).to(device)

    directions = x[chosen] - sae.b_dec.float()  # [n_dead, d_in]
    directions = directions / directions.norm(dim=1, keepdim=True).clamp_min(_EPS)
    # "Alive" is simply "not in the dead mask": those are the features whose scale has been learned.
    alive = ~dead.to(device)
    alive_norm = sae.W_enc[:, alive].norm(dim=0).mean().item() if alive.any() else 1.0

    sae.W_dec[idx] = directions.to(sae.W_dec.dtype)
    sae.W_enc[:, idx] = (directions.T * (encoder_scale * alive_norm)).to(sae.W_enc.dtype)
    sae.b_enc[idx] = 0.0

    if optimizer is not None:
        # Stale moments would drag the fresh weights straight back, or make Adam's first steps on them
        # tiny (a large exp_avg_sq from the old life); anything shaped like the parameter is per-entry state.
        for param, select in ((sae.W_enc, (slice(None), idx)), (sae.b_enc, (idx,)), (sae.W_dec, (idx,))):
            for state in optimizer.state.get(param, {}).values():
                if isinstance(state, Tensor) and state.shape == param.shape:
                    state[select] = 0.0
    return n_dead
