"""The sparse products TopK training uses equal the dense maths, in value and in every gradient."""

from __future__ import annotations

import torch

from midisc.sae import SparseAutoencoder, TopKSAE
from midisc.sparse_ops import TopKEncoder, auxk_loss, decode


def test_topk_encoder_passes_gradcheck_in_double():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 5, dtype=torch.float64, generator=g, requires_grad=True)
    W = torch.randn(5, 12, dtype=torch.float64, generator=g, requires_grad=True)
    shift = torch.randn(12, dtype=torch.float64, generator=g, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *a: TopKEncoder.apply(*a, 3)[0], (x, W, shift))


def test_topk_encoder_matches_dense_topk_with_repeated_features():
    g = torch.Generator().manual_seed(1)
    x, W, shift = torch.randn(64, 8, generator=g), torch.randn(8, 10, generator=g), torch.randn(10, generator=g)
    weights = torch.randn(64, 4, generator=g)
    grads = []
    for sparse in (True, False):
        params = [t.clone().requires_grad_() for t in (x, W, shift)]
        if sparse:
            values, indices = TopKEncoder.apply(*params, 4)
        else:
            top = (params[0] @ params[1] + params[2]).topk(4, dim=-1)
            values, indices = top.values, top.indices
        (values * weights).sum().backward()
        grads.append([p.grad for p in params] + [values.detach(), indices])
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_decode_reads_the_selected_rows():
    W_dec = torch.randn(10, 3)
    indices, values = torch.tensor([[1, 4], [4, 9]]), torch.tensor([[2.0, 0.5], [1.0, -1.0]])
    want = torch.stack([2 * W_dec[1] + 0.5 * W_dec[4], W_dec[4] - W_dec[9]])
    torch.testing.assert_close(decode(indices, values, W_dec), want)


def test_topk_training_pass_with_auxk_matches_the_dense_auxk():
    sae = TopKSAE(16, 4, k=4, seed=3)
    with torch.no_grad():
        sae.b_dec.normal_()
        sae.b_enc.normal_()
    x = torch.randn(32, 16)
    dead = torch.zeros(64, dtype=torch.bool)
    dead[::3] = True

    def grads(sparse: bool):
        sae.zero_grad()
        if sparse:
            out = sae(x, dead=dead)
            loss, aux = out.loss, out.aux
        else:
            dense = SparseAutoencoder.forward(sae, x)
            aux = auxk_loss(sae.pre_acts(x), x - dense.x_hat, sae.W_dec, dead, sae.aux_k)
            loss = dense.mse + sae.aux_k_coef * aux
        loss.backward()
        return aux.detach(), {name: p.grad.clone() for name, p in sae.named_parameters()}

    (aux_sparse, sparse), (aux_dense, dense) = grads(True), grads(False)
    torch.testing.assert_close(aux_sparse, aux_dense)
    for name, grad in dense.items():
        torch.testing.assert_close(sparse[name], grad, rtol=1e-5, atol=1e-6)
