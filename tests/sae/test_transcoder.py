"""Transcoders against a naive reference (training pass included), their folds, round trips and refusals, and a fit
that learns a sparse map from one activation to another."""

from __future__ import annotations

import json

import pytest
import torch

from fitting import fit, randomise
from midisc.sae import load_sae
from midisc.sae.jumprelu import BatchTopKSAE
from midisc.sae.relu import ReluSAE
from midisc.sae.topk import TopKSAE
from midisc.sae.transcoder import (BatchTopKTranscoder, JumpReLUTranscoder, MatryoshkaTranscoder, ReluTranscoder,
                                   coder_class)
from midisc.training.module import SAEModule

D_IN, D_OUT, EXPANSION = 6, 5, 4
D_SAE = D_IN * EXPANSION
SETTINGS = {ReluTranscoder: {}, JumpReLUTranscoder: {}, BatchTopKTranscoder: {"k": 3},
            MatryoshkaTranscoder: {"k": 3, "group_fractions": [0.25, 0.75]}}
SAVED = {(ReluTranscoder, False): "transcoder", (ReluTranscoder, True): "skip_transcoder",
         (JumpReLUTranscoder, False): "jumprelu_transcoder", (JumpReLUTranscoder, True): "jumprelu_skip_transcoder",
         (BatchTopKTranscoder, False): "jumprelu_transcoder", (BatchTopKTranscoder, True): "jumprelu_skip_transcoder",
         (MatryoshkaTranscoder, False): "jumprelu_transcoder", (MatryoshkaTranscoder, True): "jumprelu_skip_transcoder"}


def transcoder(cls=BatchTopKTranscoder, skip=True, seed=0):
    t = randomise(cls(D_IN, EXPANSION, d_out=D_OUT, skip=skip, seed=1, **SETTINGS[cls]), seed)
    if skip:
        with torch.no_grad():
            t.W_skip.copy_(torch.randn(D_OUT, D_IN, generator=torch.Generator().manual_seed(seed + 7)))
    if isinstance(t, BatchTopKSAE):
        t.running_threshold.fill_(0.2)
    return t


def pair(n=16, seed=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, D_IN, generator=g), torch.randn(n, D_OUT, generator=g)


def test_parameters_live_in_the_input_and_output_spaces():
    t = transcoder()
    shapes = {name: tuple(p.shape) for name, p in t.named_parameters() if name != "log_threshold"}
    assert shapes == {"W_enc": (D_IN, D_SAE), "b_enc": (D_SAE,), "W_dec": (D_SAE, D_OUT), "b_dec": (D_OUT,),
                      "W_skip": (D_OUT, D_IN)}
    assert transcoder(skip=False).W_skip is None
    fresh = BatchTopKTranscoder(D_IN, EXPANSION, d_out=D_OUT, skip=True, k=3, seed=0)
    assert torch.equal(fresh.W_skip, torch.zeros(D_OUT, D_IN))  # the skip path starts at zero, as SAELens's
    assert torch.allclose(fresh.W_dec.norm(dim=1), torch.ones(D_SAE))


@pytest.mark.parametrize("cls", [ReluTranscoder, JumpReLUTranscoder, BatchTopKTranscoder])
def test_inference_matches_the_naive_formula(cls):
    t, (x, y) = transcoder(cls), pair()
    pre = x @ t.W_enc + t.b_enc  # no b_dec on the input side: it lives in the output space
    threshold = 0.0 if cls is ReluTranscoder else t.threshold
    codes = torch.relu(pre) * (pre > threshold)
    y_hat = codes @ t.W_dec + t.b_dec + x @ t.W_skip.T
    with torch.no_grad():
        out = t(torch.cat((x, y), 1))
        alone = t.encode(x)  # the input alone gives the same codes
    assert torch.allclose(out.codes, codes, atol=1e-6) and torch.allclose(alone, codes, atol=1e-6)
    assert torch.allclose(out.x_hat, y_hat, atol=1e-5)
    assert out.mse == pytest.approx(float((y_hat - y).pow(2).mean()), rel=1e-5)  # scored against y, not x


@pytest.mark.parametrize("cls", [BatchTopKTranscoder, ReluTranscoder])
def test_the_training_pass_has_the_naive_loss_and_gradients(cls):
    t, (x, y) = transcoder(cls), pair()
    xy = torch.cat((x, y), 1)
    if cls is BatchTopKTranscoder:
        t.aux_k_coef = 0.0  # AuxK has its own tests; here the reconstruction alone
    out = t(xy)
    params = [t.W_enc, t.b_enc, t.W_dec, t.b_dec, t.W_skip]
    ours = torch.autograd.grad(out.loss, params)
    pre = x @ t.W_enc + t.b_enc
    if cls is BatchTopKTranscoder:  # the k·B largest pre-activations of the batch, by brute force
        cut = pre.flatten().topk(t.k * len(x)).values.min()
        codes = torch.relu(pre) * (pre >= cut)
        loss = (codes @ t.W_dec + t.b_dec + x @ t.W_skip.T - y).pow(2).mean()
    else:
        codes = torch.relu(pre)
        l1 = (codes * t.W_dec.norm(dim=1)).sum(-1).mean()
        loss = (codes @ t.W_dec + t.b_dec + x @ t.W_skip.T - y).pow(2).mean() + t.l1_coef * l1
    naive = torch.autograd.grad(loss, params)
    assert float(out.loss) == pytest.approx(float(loss), rel=1e-5)
    for mine, theirs in zip(ours, naive):
        assert torch.allclose(mine, theirs, atol=1e-5)


@pytest.mark.parametrize("cls", list(SETTINGS))
@pytest.mark.parametrize("skip", [False, True])
def test_folding_two_scales_gives_raw_outputs(cls, skip):
    t, (x, y) = transcoder(cls, skip), pair()
    s_in, s_out = 0.4, 6.0
    decoder = t.W_dec.detach().clone()
    with torch.no_grad():
        scaled = t(torch.cat((x * s_in, y * s_out), 1))
        t.fold_input_scale(s_in, s_out)
        raw = t(torch.cat((x, y), 1))
    assert torch.allclose(raw.x_hat, scaled.x_hat / s_out, atol=1e-5)
    assert torch.allclose(raw.codes, scaled.codes / s_out, atol=1e-6)
    assert torch.equal(t.W_dec, decoder)  # the decoder rows keep their (unit) norms


@pytest.mark.parametrize("cls", list(SETTINGS))
@pytest.mark.parametrize("skip", [False, True])
def test_saved_folder_names_the_saelens_class_and_reloads_identically(tmp_path, cls, skip):
    t, (x, y) = transcoder(cls, skip), pair()
    cfg = json.loads((t.save(tmp_path) / "cfg.json").read_text())
    assert cfg["architecture"] == SAVED[cls, skip] and cfg["d_out"] == D_OUT
    assert cfg["apply_b_dec_to_input"] is False  # SAELens's TranscoderConfig refuses True
    back = load_sae(tmp_path)
    assert back.is_transcoder and back.skip == skip and back.d_out == D_OUT
    with torch.no_grad():
        assert torch.equal(back(torch.cat((x, y), 1)).x_hat, t(torch.cat((x, y), 1)).x_hat)


@pytest.mark.parametrize("skip", [False, True])
def test_saelens_loads_the_transcoder_with_identical_outputs(tmp_path, skip):
    sae_lens = pytest.importorskip("sae_lens")  # not a dependency; checked where it is installed
    t, (x, _) = transcoder(BatchTopKTranscoder, skip), pair()
    theirs = sae_lens.SAE.load_from_disk(str(t.save(tmp_path)))
    assert type(theirs).__name__ == ("JumpReLUSkipTranscoder" if skip else "JumpReLUTranscoder")
    with torch.no_grad():
        assert torch.allclose(theirs(x), t.reconstruct(x, t.encode(x)), atol=1e-6)  # SAELens reads the input alone


def test_b_dec_starts_at_the_centre_of_the_outputs():
    x, y = pair(64)
    t = BatchTopKTranscoder(D_IN, EXPANSION, d_out=D_OUT, k=3)
    t.init_b_dec(torch.cat((x + 3, y + 5), 1), "mean")
    assert torch.allclose(t.b_dec, (y + 5).mean(0)) and torch.equal(t.b_enc, torch.zeros(D_SAE))


def test_refusals_name_the_value_and_what_is_valid():
    with pytest.raises(ValueError, match=r"kind=transcoder is not offered for TopKSAE.*sae=batchtopk"):
        coder_class(TopKSAE, "transcoder")
    with pytest.raises(ValueError, match=r"kind='crosscoder' is not a kind of coder; valid: sae, transcoder"):
        coder_class(ReluSAE, "crosscoder")
    with pytest.raises(ValueError, match=r"skip=True .* needs sae.kind=transcoder"):
        coder_class(ReluSAE, "sae", True)
    assert coder_class(ReluSAE, "transcoder") is ReluTranscoder and coder_class(ReluSAE) is ReluSAE
    t = transcoder()
    with pytest.raises(ValueError, match=r"d_in \+ d_out=11; got shape \(4, 6\)"):
        t.target(torch.zeros(4, D_IN))  # training needs the output beside the input
    with pytest.raises(ValueError, match=r"d_in=6, or inputs and outputs with d_in \+ d_out=11, got shape \(4, 7\)"):
        t.encode(torch.zeros(4, 7))


def test_training_learns_a_sparse_map_from_input_to_output():
    """y = sparse codes of x, read out through other directions: a fit beats its own start by far."""
    g = torch.Generator().manual_seed(0)
    read, write = torch.randn(24, D_IN * 2, generator=g), torch.randn(24, D_OUT * 2, generator=g)
    batches = []
    for _ in range(60):
        codes = torch.relu(torch.randn(256, 24, generator=g) - 1.2)
        batches.append(torch.cat((codes @ read, codes @ write), 1))
    t = BatchTopKTranscoder(D_IN * 2, 4, d_out=D_OUT * 2, k=4, skip=True, seed=0)
    module = SAEModule(t, lambda p: torch.optim.Adam(p, lr=1e-2), normalize_input=True)
    held, y = torch.cat(batches[-4:]), torch.cat(batches[-4:])[:, D_IN * 2:]

    def fvu() -> float:
        with torch.no_grad():
            return float((t(held).x_hat - y).pow(2).sum() / (y - y.mean(0)).pow(2).sum())

    start = fvu()
    fit(module, batches[:-4], epochs=3)
    module.fold_input_scale()
    assert start > 1.0 and fvu() < 0.25  # measured: 0.18
