"""The sparse products TopK training uses equal the dense maths, in value and in every gradient."""

from __future__ import annotations

import itertools

import pytest
import torch

from midisc.sae import SparseAutoencoder, TopKSAE
from midisc.sae.jumprelu import BatchTopKSAE
from midisc.sae.sparse_ops import BatchTopKEncoder, DeadFeatures, TopKEncoder, auxk_loss, decode, sparse_auxk


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


def as_given(dead, given):
    """The dead mask as training passes it: bare (counted exactly) or with a bound the host knows."""
    n = int(dead.sum())
    return {"mask": dead, "exact bound": DeadFeatures(dead, n), "loose bound": DeadFeatures(dead, n + 7),
            "whole width": DeadFeatures(dead, len(dead))}[given]


GIVEN = ["mask", "exact bound", "loose bound", "whole width"]


@pytest.mark.parametrize("given", GIVEN)
def test_topk_training_pass_with_auxk_matches_the_dense_auxk(given):
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
            out = sae(x, dead=as_given(dead, given))
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


def test_batch_topk_encoder_passes_gradcheck_in_double():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(5, 4, dtype=torch.float64, generator=g, requires_grad=True)
    W = torch.randn(4, 6, dtype=torch.float64, generator=g, requires_grad=True)
    shift = torch.randn(6, dtype=torch.float64, generator=g, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *a: BatchTopKEncoder.apply(*a, 7)[0], (x, W, shift))


@pytest.mark.parametrize("given", GIVEN)
def test_batchtopk_training_pass_matches_the_dense_definition(given):
    # Dense: ReLU every pre-activation, keep the k·B largest of the batch, decode with a full product.
    sae = BatchTopKSAE(16, 4, k=3, seed=4)
    with torch.no_grad():
        sae.b_dec.normal_()
        sae.b_enc.normal_()
    x = torch.randn(20, 16)
    dead = torch.zeros(64, dtype=torch.bool)
    dead[1::4] = True

    def dense_pass():
        acts = torch.relu(sae.pre_acts(x))
        top = acts.flatten().topk(sae.k * len(x))
        codes = torch.zeros_like(acts.flatten()).scatter(-1, top.indices, top.values).reshape(acts.shape)
        x_hat = codes @ sae.W_dec + sae.b_dec
        aux = auxk_loss(sae.pre_acts(x), x - x_hat, sae.W_dec, dead, sae.aux_k)
        return codes, x_hat, (x_hat - x).pow(2).mean() + sae.aux_k_coef * aux

    results = []
    for sparse in (True, False):
        sae.zero_grad()
        if sparse:
            out = sae(x, dead=as_given(dead, given))
            codes, x_hat, loss = out.codes, out.x_hat, out.loss
        else:
            codes, x_hat, loss = dense_pass()
        loss.backward()
        results.append([codes.detach(), x_hat.detach(), loss.detach()] + [p.grad.clone() for p in sae.parameters()])
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_auxk_with_a_bound_of_zero_is_off_and_a_bound_too_small_keeps_the_most_dead_it_can():
    g = torch.Generator().manual_seed(5)
    x, W_enc, W_dec = torch.randn(8, 4, generator=g), torch.randn(4, 12, generator=g), torch.randn(12, 4, generator=g)
    shift, residual = torch.randn(12, generator=g), torch.randn(8, 4, generator=g)
    dead = torch.zeros(12, dtype=torch.bool)
    dead[[2, 5, 7]] = True
    assert sparse_auxk(x, W_enc, shift, W_dec, DeadFeatures(dead, 0), 2, residual) is None
    # A bound of 2 with 3 dead (features that died since the count was read): AuxK over two of them.
    two = sparse_auxk(x, W_enc, shift, W_dec, DeadFeatures(dead, 2), 2, residual)
    pairs = []
    for pair in itertools.combinations([2, 5, 7], 2):
        mask = torch.zeros(12, dtype=torch.bool)
        mask[list(pair)] = True
        pairs.append(sparse_auxk(x, W_enc, shift, W_dec, mask, 2, residual))
    assert any(torch.allclose(two, exact) for exact in pairs)


@pytest.mark.parametrize("cls", [TopKSAE, BatchTopKSAE])
def test_a_training_pass_under_bf16_autocast_keeps_float32_weights_and_gradients(cls):
    """trainer.precision=bf16-mixed: the encoder product runs in bf16, everything sparse after it in float32."""
    sae = cls(16, 4, k=4, seed=0)
    x = torch.randn(32, 16, generator=torch.Generator().manual_seed(0))
    dead = torch.zeros(64, dtype=torch.bool)
    dead[:10] = True
    reference = sae(x, dead=dead)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = sae(x, dead=DeadFeatures(dead, 16))
    out.loss.backward()
    assert out.x_hat.dtype == torch.float32 and all(p.grad.dtype == torch.float32 for p in sae.parameters())
    torch.testing.assert_close(out.loss, reference.loss, rtol=0.05, atol=0)  # bf16 keeps ~3 significant digits
