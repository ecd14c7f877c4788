"""AuxK (Gao et al. 2024) for TopK and BatchTopK: the loss against a naive reference, and that its gradient
reaches the dead features, which the main loss never trains, and nothing else."""

from __future__ import annotations

import pytest
import torch

from midisc.sae import SparseAutoencoder, TopKSAE
from midisc.sae.sparse_ops import auxk_loss
from midisc.sae.jumprelu import BatchTopKSAE

D, WIDTH = 8, 32


def naive_auxk(pre, residual, W_dec, dead, aux_k):
    dead_ids = [j for j in range(len(dead)) if dead[j]]
    k = min(aux_k, len(dead_ids))
    total = 0.0
    for row, err in zip(pre.tolist(), residual.tolist()):
        chosen = sorted(dead_ids, key=lambda j: row[j], reverse=True)[:k]
        e_hat = [sum(max(row[j], 0.0) * W_dec[j][i].item() for j in chosen) for i in range(len(err))]
        total += sum((a - b) ** 2 for a, b in zip(e_hat, err))
    return min(len(dead_ids) / aux_k, 1.0) * total / (len(err) * len(pre))


@pytest.mark.parametrize("n_dead,aux_k", [(10, 4), (3, 4), (1, 1)])
def test_auxk_loss_matches_the_naive_reference(n_dead, aux_k):
    g = torch.Generator().manual_seed(n_dead)
    pre, residual = torch.randn(5, WIDTH, generator=g), torch.randn(5, D, generator=g)
    W_dec = torch.randn(WIDTH, D, generator=g)
    dead = torch.zeros(WIDTH, dtype=torch.bool)
    dead[torch.randperm(WIDTH, generator=g)[:n_dead]] = True
    got = auxk_loss(pre, residual, W_dec, dead, aux_k)
    assert got.item() == pytest.approx(naive_auxk(pre, residual, W_dec, dead, aux_k), rel=1e-5)


def test_no_dead_features_means_no_auxk_term():
    pre, residual, W_dec = torch.randn(4, WIDTH), torch.randn(4, D), torch.randn(WIDTH, D)
    assert auxk_loss(pre, residual, W_dec, torch.zeros(WIDTH, dtype=torch.bool), 4) is None
    assert auxk_loss(pre, residual, W_dec, None, 4) is None
    sae = TopKSAE(D, 4, k=4, seed=0)
    out = sae(torch.randn(16, D), dead=torch.zeros(WIDTH, dtype=torch.bool))
    assert out.aux is None and torch.equal(out.loss, out.mse)


@pytest.mark.parametrize("cls", [TopKSAE, BatchTopKSAE])
def test_auxk_joins_the_loss_and_trains_only_dead_features(cls):
    sae = cls(D, 4, k=4, seed=0)
    x = torch.randn(64, D)
    dead = torch.zeros(WIDTH, dtype=torch.bool)
    dead[:12] = True
    out = sae(x, dead=dead)
    assert out.aux is not None and out.aux > 0
    torch.testing.assert_close(out.loss, out.mse + sae.aux_k_coef * out.aux)
    sae.zero_grad()
    out.aux.backward()  # the auxiliary term alone: it must reach the dead features and nothing else
    assert sae.W_enc.grad[:, 12:].abs().max() == 0 and sae.W_enc.grad[:, :12].abs().max() > 0
    assert sae.W_dec.grad[12:].abs().max() == 0 and sae.W_dec.grad[:12].abs().max() > 0


def test_aux_k_coef_zero_turns_auxk_off():
    sae = TopKSAE(D, 4, k=4, aux_k_coef=0.0, seed=0)
    out = sae(torch.randn(8, D), dead=torch.ones(WIDTH, dtype=torch.bool))
    assert out.aux is None and torch.equal(out.loss, out.mse)


@pytest.mark.parametrize("kwargs,message", [
    (dict(aux_k_coef=-1.0), "aux_k_coef must be a finite number >= 0"),
    (dict(aux_k=0), "aux_k=0 is too small; it must be in 1..32"),
    (dict(aux_k=33), "aux_k=33 is too large; it must be in 1..32"),
])
def test_bad_auxk_settings_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TopKSAE(D, 4, k=4, **kwargs)


def test_aux_k_defaults_to_half_of_d_in():
    assert TopKSAE(D, 4, k=4).aux_k == D // 2 and BatchTopKSAE(D, 4, k=4).aux_k == D // 2


def test_dense_inference_ignores_the_dead_mask():
    sae = TopKSAE(D, 4, k=4, seed=0)
    x = torch.randn(8, D)
    with torch.no_grad():
        assert torch.equal(sae(x, dead=torch.ones(WIDTH, dtype=torch.bool)).x_hat, SparseAutoencoder.forward(sae, x).x_hat)
