"""Pin dead-feature resampling: what the resampled features become, what is left alone, how inputs are drawn."""

from __future__ import annotations

import pytest
import torch

from midisc.training.resampling import resample_dead
from midisc.sae import ReluSAE

D_IN, EXPANSION = 8, 4
D_SAE = D_IN * EXPANSION
DEAD = (1, 5, 17, 30)


def make_sae(seed: int = 0) -> ReluSAE:
    sae = ReluSAE(D_IN, EXPANSION, l1_coef=1e-3, seed=seed)
    with torch.no_grad():  # a nonzero b_dec, so centring the drawn input matters
        sae.b_dec.copy_(torch.randn(D_IN, generator=torch.Generator().manual_seed(seed + 100)))
    return sae


def sample(n: int = 64, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, D_IN, generator=torch.Generator().manual_seed(seed)) * 3


def mask(indices=DEAD) -> torch.Tensor:
    dead = torch.zeros(D_SAE, dtype=torch.bool)
    dead[list(indices)] = True
    return dead


def adam_steps(sae: ReluSAE, x: torch.Tensor, steps: int = 3) -> torch.optim.Adam:
    """A real Adam optimizer after a few steps, so its moments are nonzero."""
    opt = torch.optim.Adam(sae.parameters(), lr=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        sae(x).loss.backward()
        opt.step()
    return opt


def snapshot(sae, opt) -> tuple[dict, dict]:
    params = {n: p.detach().clone() for n, p in sae.named_parameters()}
    state = {n: {k: v.clone() for k, v in opt.state[p].items()} for n, p in sae.named_parameters()}
    return params, state


def drawn_inputs(sae: ReluSAE, x: torch.Tensor, features) -> list[int]:
    """Which row of x each resampled decoder row points along (the closest centred, normalised input)."""
    units = torch.nn.functional.normalize(x - sae.b_dec.detach(), dim=1)
    return [int((units @ sae.W_dec[i].detach()).argmax()) for i in features]


def test_no_dead_feature_is_a_no_op():
    sae, x = make_sae(), sample()
    opt = adam_steps(sae, x)
    params, state = snapshot(sae, opt)
    assert resample_dead(sae, opt, x, torch.zeros(D_SAE, dtype=torch.bool)) == 0
    for name, p in sae.named_parameters():
        assert torch.equal(p, params[name]), name
        for key, value in opt.state[p].items():
            assert torch.equal(value, state[name][key]), (name, key)


def test_resampled_features_point_at_centred_inputs_with_the_specified_encoder_norm():
    sae, x = make_sae(), sample()
    dead = mask()
    alive_norm = sae.W_enc.detach()[:, ~dead].norm(dim=0).mean()
    assert resample_dead(sae, None, x, dead, generator=torch.Generator().manual_seed(0)) == len(DEAD)

    units = torch.nn.functional.normalize(x - sae.b_dec.detach(), dim=1)
    rows = drawn_inputs(sae, x, DEAD)
    assert len(set(rows)) == len(DEAD)  # without replacement: distinct inputs while there are enough
    for i, row in zip(DEAD, rows):
        assert torch.allclose(sae.W_dec[i], units[row], atol=1e-6)
        assert torch.isclose(sae.W_dec[i].norm(), torch.tensor(1.0), atol=1e-6)
        assert torch.allclose(sae.W_enc[:, i], units[row] * 0.2 * alive_norm, atol=1e-6)
        assert sae.b_enc[i] == 0


def test_encoder_scale_and_the_all_dead_fallback():
    sae, x = make_sae(), sample()
    resample_dead(sae, None, x, torch.ones(D_SAE, dtype=torch.bool), encoder_scale=0.5)
    # No alive feature to take a scale from: the unit direction times encoder_scale alone.
    assert torch.allclose(sae.W_enc.norm(dim=0), torch.full((D_SAE,), 0.5), atol=1e-6)
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(D_SAE), atol=1e-6)


def test_alive_features_and_optimizer_state_outside_the_resampled_slices_are_untouched():
    sae, x = make_sae(), sample()
    opt = adam_steps(sae, x)
    dead = mask()
    params, state = snapshot(sae, opt)
    for name in ("W_enc", "b_enc", "W_dec"):  # precondition: the moments being reset are really nonzero
        cut = state[name]["exp_avg_sq"][:, dead] if name == "W_enc" else state[name]["exp_avg_sq"][dead]
        assert (cut != 0).any(), name

    resample_dead(sae, opt, x, dead, generator=torch.Generator().manual_seed(0))

    assert torch.equal(sae.b_dec, params["b_dec"])
    assert torch.equal(sae.W_enc[:, ~dead], params["W_enc"][:, ~dead])
    assert torch.equal(sae.W_dec[~dead], params["W_dec"][~dead])
    assert torch.equal(sae.b_enc[~dead], params["b_enc"][~dead])
    for name, p in sae.named_parameters():
        for key, value in opt.state[p].items():
            before = state[name][key]
            if key == "step" or name == "b_dec":
                assert torch.equal(value, before), (name, key)
            elif name == "W_enc":
                assert torch.equal(value[:, ~dead], before[:, ~dead]) and (value[:, dead] == 0).all(), key
            else:
                assert torch.equal(value[~dead], before[~dead]) and (value[dead] == 0).all(), (name, key)


def test_adam_keeps_stepping_after_a_reset():
    sae, x = make_sae(), sample()
    opt = adam_steps(sae, x)
    resample_dead(sae, opt, x, mask())
    opt.zero_grad()
    sae(x).loss.backward()
    opt.step()
    assert all(torch.isfinite(p).all() for p in sae.parameters())


def zero_code_sae() -> ReluSAE:
    """An SAE whose codes are always zero, so x_hat = b_dec exactly and only inputs off b_dec have error."""
    sae = make_sae()
    with torch.no_grad():
        sae.b_enc.fill_(-1e4)
    return sae


def test_draws_only_inputs_with_reconstruction_error():
    sae = zero_code_sae()
    perfect = sae.b_dec.detach().expand(60, D_IN)
    bad = sample(len(DEAD), seed=7)  # exactly as many high-loss inputs as dead features
    x = torch.cat([perfect[:30], bad, perfect[30:]])
    resample_dead(sae, None, x, mask(), generator=torch.Generator().manual_seed(3))
    assert sorted(drawn_inputs(sae, x, DEAD)) == list(range(30, 30 + len(DEAD)))


def test_fewer_bad_inputs_than_dead_features_falls_back_to_drawing_with_replacement():
    sae = zero_code_sae()
    x = torch.cat([sae.b_dec.detach().expand(20, D_IN), sample(1, seed=7)])
    assert resample_dead(sae, None, x, mask()) == len(DEAD)
    assert drawn_inputs(sae, x, DEAD) == [20] * len(DEAD)


def test_inputs_are_weighted_by_the_square_of_their_squared_error(monkeypatch):
    sae, x = make_sae(), sample()
    seen = {}
    real = torch.multinomial

    def spy(weights, n, **kw):
        seen["weights"] = weights.clone()
        return real(weights, n, **kw)

    with torch.no_grad():  # the error of the SAE as it was: resampling changes x_hat
        loss = (sae(x).x_hat - x).pow(2).sum(dim=1).double()
    monkeypatch.setattr(torch, "multinomial", spy)
    resample_dead(sae, None, x, mask())
    expected = loss.pow(2) / loss.pow(2).sum()
    assert torch.allclose(seen["weights"] / seen["weights"].sum(), expected, rtol=1e-5)


def test_same_generator_seed_gives_the_same_resampling():
    x = sample(256)
    a, b = make_sae(), make_sae()
    resample_dead(a, None, x, mask(), generator=torch.Generator().manual_seed(11))
    resample_dead(b, None, x, mask(), generator=torch.Generator().manual_seed(11))
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)


def test_a_resampled_feature_fires_on_the_input_it_was_drawn_from():
    sae, x = make_sae(), sample()
    with torch.no_grad():
        sae.b_enc.fill_(-1e4)  # dead for real: nothing fires before resampling
    assert (sae.encode(x) == 0).all()
    resample_dead(sae, None, x, mask(), generator=torch.Generator().manual_seed(0))
    for i, row in zip(DEAD, drawn_inputs(sae, x, DEAD)):
        assert sae.encode(x[row])[i] > 0


@pytest.mark.parametrize(
    ("x", "dead", "scale", "message"),
    [
        (torch.zeros(4, D_IN + 1), mask(), 0.2, r"x must be .* shape \[N, 8\], got \(4, 9\)"),
        (torch.zeros(D_IN), mask(), 0.2, r"x must be .*got \(8,\)"),
        (torch.zeros(0, D_IN), mask(), 0.2, r"non-empty"),
        (torch.zeros(4, D_IN), torch.zeros(D_SAE), 0.2, r"bool mask of shape \(32,\), got torch.float32"),
        (torch.zeros(4, D_IN), torch.zeros(D_SAE + 1, dtype=torch.bool), 0.2, r"got torch.bool of shape \(33,\)"),
        (torch.zeros(4, D_IN), mask(), 0.0, r"encoder_scale must be .* > 0, got 0.0"),
        (torch.full((4, D_IN), float("nan")), mask(), 0.2, r"not finite"),
    ],
)
def test_bad_input_is_refused_with_a_clear_message(x, dead, scale, message):
    with pytest.raises(ValueError, match=message):
        resample_dead(make_sae(), None, x, dead, encoder_scale=scale)
