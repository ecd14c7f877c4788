"""JumpReLU and BatchTopK against naive references, their SAELens round trip, and short trainings."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import compose_config, tiny_overrides
from midisc.training.module import SAEModule
from midisc.sae import load_sae
from midisc.sae.jumprelu import BatchTopKSAE, JumpReLUSAE
from fitting import fit, randomise, sparse_data

D_IN, EXPANSION = 6, 4
D_SAE = D_IN * EXPANSION


def jumprelu(**kw):
    # A wide window and thresholds among the pre-activations, so many pass through the estimator.
    sae = randomise(JumpReLUSAE(D_IN, EXPANSION, **{"l0_coef": 0.05, "bandwidth": 0.5, "seed": 1, **kw}))
    with torch.no_grad():
        sae.log_threshold.copy_(torch.empty(D_SAE).uniform_(-2.0, 0.0, generator=torch.Generator().manual_seed(2)))
    return sae


def grads(sae, loss):
    names = [n for n, _ in sae.named_parameters()]
    return dict(zip(names, torch.autograd.grad(loss, [p for _, p in sae.named_parameters()])))


# --- JumpReLU ------------------------------------------------------------------------------
def naive_jumprelu_loss(sae, x):
    """The paper's loss with its pseudo-derivatives built from detached pieces, no custom autograd."""
    eps = sae.bandwidth
    pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
    theta = sae.log_threshold.exp()
    fires = (pre > theta).float().detach()
    kernel = (((pre - theta) / eps).abs() < 0.5).float().detach()
    # d/dθ of the surrogate is -(θ/ε)K for the codes and -K/ε for the step, with values added as 0.
    surrogate_codes = -theta * (theta.detach() / eps) * kernel
    surrogate_step = -theta / eps * kernel
    codes = pre * fires + surrogate_codes - surrogate_codes.detach()
    step = fires + surrogate_step - surrogate_step.detach()
    x_hat = codes @ sae.W_dec + sae.b_dec
    mse = ((x_hat - x) ** 2).mean()
    return mse + sae.l0_coef * step.sum(-1).mean(), codes, x_hat


def test_jumprelu_matches_the_naive_reference_in_values_and_gradients():
    sae, x = jumprelu(), torch.randn(32, D_IN)
    out = sae(x)
    ref_loss, ref_codes, ref_x_hat = naive_jumprelu_loss(sae, x)
    torch.testing.assert_close(out.codes, ref_codes)
    torch.testing.assert_close(out.x_hat, ref_x_hat)
    torch.testing.assert_close(out.loss, ref_loss)
    got, want = grads(sae, out.loss), grads(sae, ref_loss)
    assert set(got) == {"W_enc", "b_enc", "W_dec", "b_dec", "log_threshold"}
    for name in got:
        torch.testing.assert_close(got[name], want[name], msg=name)
    assert got["log_threshold"].abs().sum() > 0  # the estimator was exercised, not vacuously zero


def test_jumprelu_threshold_gradient_is_the_papers_formula():
    sae, x = jumprelu(), torch.randn(16, D_IN)
    out = sae(x)
    (g_codes,) = torch.autograd.grad(out.mse, out.codes, retain_graph=True)
    with torch.no_grad():
        pre, theta, eps = sae.pre_acts(x), sae.threshold, sae.bandwidth
        k = ((pre - theta) / eps > -0.5) & ((pre - theta) / eps < 0.5)
        d_theta = (g_codes * -(theta / eps) * k).sum(0) + sae.l0_coef * (-(1 / eps) * k).sum(0) / len(x)
        want = d_theta * theta  # chain rule through θ = exp(log θ)
    torch.testing.assert_close(grads(sae, out.loss)["log_threshold"], want)


def test_jumprelu_codes_zero_below_threshold_and_pass_through_above():
    sae, x = jumprelu(), torch.randn(64, D_IN)
    with torch.no_grad():
        pre, codes = sae.pre_acts(x), sae.encode(x)
    above = pre > sae.threshold
    assert torch.equal(codes[above], pre[above]) and (codes[~above] == 0).all() and above.any() and (~above).any()


# --- BatchTopK -----------------------------------------------------------------------------
def batchtopk(k=3, **kw):
    return randomise(BatchTopKSAE(D_IN, EXPANSION, k=k, seed=1, **kw))


def naive_batch_topk(pre, k):
    values = sorted(((v, b, j) for b, row in enumerate(pre.tolist()) for j, v in enumerate(row)), reverse=True)
    keep = {(b, j) for v, b, j in values[: k * len(pre)] if v > 0}
    mask = torch.tensor([[float((b, j) in keep) for j in range(pre.shape[1])] for b in range(len(pre))])
    return pre * mask


def test_batchtopk_training_matches_the_naive_reference():
    sae, x = batchtopk(), torch.randn(16, D_IN)
    sae.train()
    out = sae(x)
    pre = sae.pre_acts(x)
    codes = naive_batch_topk(pre, sae.k)
    x_hat = codes @ sae.W_dec + sae.b_dec
    ref_loss = ((x_hat - x) ** 2).mean()
    torch.testing.assert_close(out.codes, codes)
    torch.testing.assert_close(out.loss, ref_loss)
    got, want = grads(sae, out.loss), grads(sae, ref_loss)
    for name in got:
        torch.testing.assert_close(got[name], want[name], msg=name)


def test_batchtopk_keeps_exactly_k_times_batch_and_lets_tokens_differ():
    sae = batchtopk(k=3)
    with torch.no_grad():
        sae.b_enc.fill_(100.0)  # every pre-activation positive
    out = sae.train()(torch.randn(20, D_IN))
    per_token = (out.codes > 0).sum(-1)
    assert per_token.sum() == 3 * 20 and per_token.min() < per_token.max()


def test_batchtopk_threshold_tracks_the_smallest_kept_value_and_thresholds_at_inference():
    sae, x1, x2 = batchtopk(threshold_lr=0.25), torch.randn(16, D_IN), torch.randn(16, D_IN)
    sae.train()
    first = sae(x1).codes
    m1 = first[first > 0].min().item()
    assert sae.running_threshold.item() == pytest.approx(m1)  # the first batch sets it outright
    second = sae(x2).codes
    m2 = second[second > 0].min().item()
    assert sae.running_threshold.item() == pytest.approx(0.75 * m1 + 0.25 * m2)
    sae.eval()
    x = torch.randn(40, D_IN)
    with torch.no_grad():
        pre, out = sae.pre_acts(x), sae(x)
    theta = sae.running_threshold.item()
    want = [[v if v > theta else 0.0 for v in row] for row in pre.tolist()]
    torch.testing.assert_close(out.codes, torch.tensor(want), rtol=0, atol=0)
    assert sae.running_threshold.item() == pytest.approx(0.75 * m1 + 0.25 * m2)  # inference leaves it alone


# --- save and load -------------------------------------------------------------------------
def test_jumprelu_saves_in_the_saelens_layout_and_reloads_identically(tmp_path):
    sae, x = jumprelu(), torch.randn(200, D_IN)
    folder = sae.save(tmp_path / "sae")
    cfg = json.loads((folder / "cfg.json").read_text())
    assert cfg["architecture"] == "jumprelu" and cfg["d_sae"] == D_SAE
    weights = load_file(str(folder / "sae_weights.safetensors"))
    assert set(weights) == {"W_enc", "W_dec", "b_enc", "b_dec", "threshold"}
    assert weights["threshold"].shape == (D_SAE,) and torch.equal(weights["threshold"], sae.threshold.detach())
    loaded = load_sae(folder)
    assert isinstance(loaded, JumpReLUSAE) and torch.equal(loaded.threshold, sae.threshold.detach())
    with torch.no_grad():
        assert torch.equal(loaded(x).codes, sae(x).codes) and torch.equal(loaded(x).x_hat, sae(x).x_hat)


def test_batchtopk_reloads_as_a_jumprelu_with_the_same_inference_outputs(tmp_path):
    sae = batchtopk()
    sae.train()
    for _ in range(5):
        sae(torch.randn(16, D_IN))
    sae.eval()
    folder = sae.save(tmp_path / "sae")
    cfg = json.loads((folder / "cfg.json").read_text())
    assert cfg["architecture"] == "jumprelu" and cfg["k"] == 3 and cfg["metadata"]["trained_as"] == "batchtopk"
    threshold = load_file(str(folder / "sae_weights.safetensors"))["threshold"]
    assert (threshold == threshold[0]).all() and threshold[0] > 0  # one threshold shared by every feature
    loaded = load_sae(folder)
    assert isinstance(loaded, JumpReLUSAE)
    x = torch.randn(500, D_IN)
    with torch.no_grad():
        want, got = sae(x), loaded(x)
    assert torch.equal(got.codes, want.codes) and torch.equal(got.x_hat, want.x_hat)
    assert (want.codes > 0).any() and (want.codes == 0).any()


@pytest.mark.parametrize("seed", range(3))
def test_any_batchtopk_threshold_survives_the_log_round_trip_bit_for_bit(tmp_path, seed):
    # exp(log(t)) != t for some floats; the saved threshold must still reload as exactly what ran.
    g = torch.Generator().manual_seed(seed)
    for value in torch.rand(50, generator=g, dtype=torch.float64) * 10 ** torch.randint(-4, 3, (50,), generator=g):
        sae = batchtopk()
        sae.running_threshold.fill_(value.item())
        loaded = load_sae(sae.save(tmp_path / "sae"))
        assert torch.equal(loaded.threshold, sae.threshold), value.item()


def test_an_untrained_batchtopk_is_a_relu_and_still_round_trips(tmp_path):
    sae, x = batchtopk().eval(), torch.randn(30, D_IN)
    with torch.no_grad():
        assert torch.equal(sae(x).codes, torch.relu(sae.pre_acts(x)))
        assert torch.equal(load_sae(sae.save(tmp_path / "sae"))(x).codes, sae(x).codes)


@pytest.mark.parametrize("make", [jumprelu, batchtopk])
def test_folding_an_input_scale_changes_nothing_but_units(make):
    g = torch.Generator().manual_seed(0)
    sae, x, scale = make(), torch.randn(64, D_IN, generator=g), 4.0
    if isinstance(sae, BatchTopKSAE):
        # Another batch: the threshold equals one of its codes exactly, which rounding may put either side of it.
        sae.train()(torch.randn(64, D_IN, generator=g) * scale)
    sae.eval()
    with torch.no_grad():
        scaled = sae(x * scale)
        sae.fold_input_scale(scale)
        raw = sae(x)
    assert torch.equal(raw.codes > 0, scaled.codes > 0)
    torch.testing.assert_close(raw.codes * scale, scaled.codes)
    torch.testing.assert_close(raw.x_hat * scale, scaled.x_hat)


# --- refused settings ----------------------------------------------------------------------
@pytest.mark.parametrize("make, message", [
    (lambda: JumpReLUSAE(D_IN, l0_coef=-1.0), "l0_coef must be a finite number >= 0, got -1.0"),
    (lambda: JumpReLUSAE(D_IN, l0_coef="a"), "l0_coef must be a finite number >= 0, got 'a'"),
    (lambda: JumpReLUSAE(D_IN, bandwidth=0), "bandwidth must be a finite number > 0, got 0"),
    (lambda: JumpReLUSAE(D_IN, init_threshold=-0.1), "init_threshold must be a finite number > 0, got -0.1"),
    (lambda: BatchTopKSAE(D_IN, 2, k=13), "k=13 is larger than the SAE width 12 (expansion 2 x d_in 6); choose 1 <= k <= 12"),
    (lambda: BatchTopKSAE(D_IN, 2, k=0), "k=0 is too small; it must be >= 1"),
    (lambda: BatchTopKSAE(D_IN, 2, k=2.5), "k must be an integer >= 1, got 2.5"),
    (lambda: BatchTopKSAE(D_IN, threshold_lr=0), "threshold_lr must be a finite number in (0, 1], got 0"),
])
def test_bad_settings_are_refused_in_one_line(make, message):
    with pytest.raises(ValueError) as info:
        make()
    assert message in str(info.value) and "\n" not in str(info.value)


# --- training ------------------------------------------------------------------------------
def fvu(sae, x):
    with torch.no_grad():
        x_hat = sae.eval()(x).x_hat
    return ((x_hat - x) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()


# Thresholds started among the activations and a window wide enough to move them within 120 steps; the
# paper's 0.001 start needs thousands of steps (Adam moves log θ by about lr per step).
@pytest.mark.parametrize("make, max_l0", [
    (lambda: JumpReLUSAE(16, 4, l0_coef=1e-2, init_threshold=0.5, bandwidth=0.1, seed=0), 16),
    (lambda: BatchTopKSAE(16, 4, k=4, seed=0), 8),
], ids=["jumprelu", "batchtopk"])
def test_short_training_with_the_real_module_lowers_fvu(make, max_l0):
    sae, data = make(), sparse_data()
    module = SAEModule(sae, lambda params: torch.optim.Adam(params, lr=1e-2), b_dec_init="mean")
    before = fvu(sae, data[0])
    start = sae.threshold.detach().clone()
    fit(module, data, epochs=3)
    after = fvu(sae, data[0])
    assert after < 0.5 * before and after < 0.2, (before.item(), after.item())
    with torch.no_grad():
        l0 = (sae.eval()(data[0]).codes > 0).sum(-1).float().mean()
    assert 1 <= l0 < max_l0  # sparse at inference too, not a dense ReLU
    assert not torch.equal(sae.threshold, start)  # the thresholds were trained (JumpReLU) or tracked (BatchTopK)
    norms = sae.W_dec.norm(dim=1)
    torch.testing.assert_close(norms, torch.ones_like(norms))


# --- end to end ----------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("option", ["jumprelu", "batchtopk"])
def test_tiny_run_trains_and_reloads(tmp_path, tiny_llama, text_folder, option):
    from midisc.train import train

    sae = (f"sae={option}", "sae.k=8") if option == "batchtopk" else (f"sae={option}",)
    cfg = compose_config(tiny_overrides(tiny_llama, text_folder, tmp_path / "runs.db", sae=sae))
    result = train(cfg, tmp_path / "out")
    assert result.metrics["fvu"] < 0.9, result.metrics
    assert json.loads((result.sae_dir / "cfg.json").read_text())["architecture"] == "jumprelu"
    reloaded = load_sae(result.sae_dir)
    x = torch.randn(64, result.sae.d_in)
    with torch.no_grad():
        assert torch.equal(reloaded(x).x_hat, result.sae.eval()(x).x_hat)
