"""The Gated SAE against a naive reference in SAELens's units, its SAELens round trip, folding, and training."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import compose_config, tiny_overrides
from midisc.training.module import SAEModule
from midisc.sae import load_sae
from midisc.sae.gated import GatedSAE
from fitting import fit, sparse_data

D_IN, EXPANSION = 6, 4
D_SAE = D_IN * EXPANSION
SIX = {"W_enc": (D_IN, D_SAE), "W_dec": (D_SAE, D_IN), "b_dec": (D_IN,), "b_gate": (D_SAE,), "r_mag": (D_SAE,),
       "b_mag": (D_SAE,)}


def gated(l1_coef=0.05, seed=0):
    """Every parameter random, the two biases apart, so gate and magnitude disagree on some features."""
    sae = GatedSAE(D_IN, EXPANSION, l1_coef=l1_coef, seed=1)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return sae


def grads(sae, loss):
    names = [n for n, _ in sae.named_parameters()]
    return dict(zip(names, torch.autograd.grad(loss, list(sae.parameters()))))


def saelens_reference(sae, x, l1_coefficient):
    """GatedTrainingSAE's loss as SAELens writes it: squared errors summed over d_in, then a batch mean."""
    sae_in = x - sae.b_dec
    pi_gate = sae_in @ sae.W_enc + sae.b_gate
    magnitude = torch.relu(sae_in @ (sae.W_enc * sae.r_mag.exp()) + sae.b_mag)
    codes = (pi_gate > 0).float() * magnitude
    x_hat = codes @ sae.W_dec + sae.b_dec
    mse = (x_hat - x).pow(2).sum(-1).mean()
    pi_act = torch.relu(pi_gate)
    l1 = l1_coefficient * (pi_act * sae.W_dec.norm(dim=1)).sum(-1).mean()
    aux = (pi_act @ sae.W_dec.detach() + sae.b_dec.detach() - x).pow(2).sum(-1).mean()
    return mse + l1 + aux, codes, x_hat


def test_matches_saelens_divided_by_d_in_in_values_and_every_gradient():
    sae, x = gated(), torch.randn(64, D_IN)
    out = sae(x)
    # Our l1_coef is SAELens's l1_coefficient / d_in, and our loss SAELens's / d_in (see GatedSAE.forward).
    ref_loss, ref_codes, ref_x_hat = saelens_reference(sae, x, sae.l1_coef * D_IN)
    torch.testing.assert_close(out.codes, ref_codes)
    torch.testing.assert_close(out.x_hat, ref_x_hat)
    torch.testing.assert_close(out.loss, ref_loss / D_IN)
    torch.testing.assert_close(out.l1, (ref_codes * sae.W_dec.norm(dim=1)).sum(-1).mean())
    got, want = grads(sae, out.loss), grads(sae, ref_loss / D_IN)
    assert set(got) == set(SIX)
    for name in got:
        torch.testing.assert_close(got[name], want[name], msg=name)
        assert got[name].abs().sum() > 0, name  # every parameter is trained
    # Not vacuous: some features pass the gate with a zero magnitude, some have a magnitude but a shut gate.
    with torch.no_grad():
        x_enc = (x - sae.b_dec) @ sae.W_enc
        gate, mag = x_enc + sae.b_gate > 0, x_enc * sae.r_mag.exp() + sae.b_mag > 0
    assert (gate & ~mag).any() and (~gate & mag).any() and (gate & mag).any()


def test_the_auxiliary_reconstruction_trains_the_gate_but_not_the_decoder_matrix():
    sae, x = gated(l1_coef=0.0), torch.randn(32, D_IN)
    out = sae(x)
    aux_w_dec, aux_b_gate = torch.autograd.grad(out.aux, [sae.W_dec, sae.b_gate], retain_graph=True,
                                                allow_unused=True)
    assert aux_w_dec is None  # a frozen copy of the decoder, as in the paper
    (mse_b_gate,) = torch.autograd.grad(out.mse, [sae.b_gate], retain_graph=True, allow_unused=True)
    assert mse_b_gate is None or torch.equal(mse_b_gate, torch.zeros(D_SAE))  # the step passes no gradient
    assert aux_b_gate.abs().sum() > 0  # so with l1_coef = 0 the gate learns through aux alone


def test_sparsity_scale_multiplies_the_l1_term_and_zero_removes_it():
    sae, x = gated(l1_coef=0.1), torch.randn(32, D_IN)
    with torch.no_grad():
        full, half, none = (sae(x, sparsity_scale=s).loss for s in (1.0, 0.5, 0.0))
        out = sae(x)
        gate = torch.relu((x - sae.b_dec) @ sae.W_enc + sae.b_gate)
        l1_gate = (gate * sae.W_dec.norm(dim=1)).sum(-1).mean()
        unpenalised = gated(l1_coef=0.0)(x).loss
    torch.testing.assert_close(none, out.mse + out.aux)
    torch.testing.assert_close(none, unpenalised)
    torch.testing.assert_close(full - none, 0.1 * l1_gate)
    torch.testing.assert_close(half - none, 0.05 * l1_gate)
    assert sae(x, dead=torch.ones(D_SAE, dtype=torch.bool)).loss.item() == full.item()  # dead is ignored


def test_has_exactly_saelens_six_tensors_and_no_b_enc():
    sae = GatedSAE(D_IN, EXPANSION, seed=0)
    assert {n: tuple(p.shape) for n, p in sae.named_parameters()} == SIX
    assert set(sae.state_dict()) == set(SIX) and set(sae.cpu_tensors()) == set(SIX)
    assert not hasattr(sae, "b_enc")
    for name in ("b_gate", "r_mag", "b_mag"):
        assert torch.equal(getattr(sae, name), torch.zeros(D_SAE)), name  # SAELens's init


def test_saves_in_the_saelens_gated_layout_and_reloads_bit_for_bit(tmp_path):
    sae, x = gated(l1_coef=0.02), torch.randn(200, D_IN)
    folder = sae.save(tmp_path / "sae")
    cfg = json.loads((folder / "cfg.json").read_text())
    assert cfg["architecture"] == "gated" and (cfg["d_in"], cfg["d_sae"]) == (D_IN, D_SAE)
    assert cfg["metadata"]["l1_coefficient"] == 0.02
    weights = load_file(str(folder / "sae_weights.safetensors"))
    assert {n: tuple(t.shape) for n, t in weights.items()} == SIX
    loaded = load_sae(folder)
    assert isinstance(loaded, GatedSAE) and loaded.l1_coef == 0.02 and not loaded.training
    with torch.no_grad():
        want, got = sae(x), loaded(x)
    for name in ("codes", "x_hat", "loss", "mse", "l1"):
        assert torch.equal(getattr(got, name), getattr(want, name)), name
    assert (want.codes > 0).any() and (want.codes == 0).any()
    assert loaded.hparams() == sae.hparams() == {"architecture": "gated", "d_in": D_IN, "d_sae": D_SAE,
                                                 "expansion": EXPANSION, "l1_coef": 0.02}


@pytest.mark.parametrize("scale", [4.0, 0.037])
def test_folding_an_input_scale_changes_nothing_but_units(scale):
    sae, x = gated(), torch.randn(64, D_IN) * 3
    r_mag, w_enc = sae.r_mag.detach().clone(), sae.W_enc.detach().clone()
    with torch.no_grad():
        scaled = sae(x * scale)  # what training saw
        sae.fold_input_scale(scale)
        raw = sae(x)
    assert torch.equal(raw.codes > 0, scaled.codes > 0)
    torch.testing.assert_close(raw.codes * scale, scaled.codes)
    torch.testing.assert_close(raw.x_hat * scale, scaled.x_hat)
    assert torch.equal(sae.r_mag, r_mag) and torch.equal(sae.W_enc, w_enc)
    with pytest.raises(ValueError, match="must be a finite number > 0, got -1.0"):
        sae.fold_input_scale(-1.0)


@pytest.mark.parametrize("make, message", [
    (lambda: GatedSAE(D_IN, l1_coef=-1.0), "l1_coef must be a finite number >= 0, got -1.0"),
    (lambda: GatedSAE(D_IN, l1_coef="a"), "l1_coef must be a finite number >= 0, got 'a'"),
    (lambda: GatedSAE(D_IN, l1_coef=float("nan")), "l1_coef must be a finite number >= 0, got nan"),
    (lambda: GatedSAE(D_IN, l1_coef=True), "l1_coef must be a finite number >= 0, got True"),
    (lambda: GatedSAE(0), "d_in=0 is too small; it must be >= 1"),
    (lambda: GatedSAE(D_IN, 1.5), "expansion must be an integer >= 1, got 1.5"),
])
def test_bad_settings_are_refused_in_one_line(make, message):
    with pytest.raises(ValueError) as info:
        make()
    assert message in str(info.value) and "\n" not in str(info.value)


def fvu(sae, x):
    with torch.no_grad():
        x_hat = sae.eval()(x).x_hat
    return ((x_hat - x) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()


def test_three_hundred_steps_with_the_real_module_lower_fvu_and_keep_codes_sparse():
    # The data's elements have a variance near 3, not 1, hence a coefficient above the configured default.
    sae, data = GatedSAE(16, 4, l1_coef=0.1, seed=0), sparse_data(n=100)
    module = SAEModule(sae, lambda params: torch.optim.Adam(params, lr=1e-2), b_dec_init="mean")
    before = fvu(sae, data[0])
    trainer = fit(module, data, epochs=3)
    after = fvu(sae, data[0])
    assert trainer.global_step == 300
    assert after < 0.1 * before and after < 0.1, (before.item(), after.item())
    with torch.no_grad():
        l0 = (sae(data[0]).codes > 0).sum(-1).float().mean()
    assert 1 <= l0 < 20, l0  # sparse among the 64 features (13 when written), on data made of 3 atoms per vector
    assert not torch.equal(sae.r_mag, torch.zeros(64))  # the magnitude path has learnt its own scale
    assert "train/aux_loss" in trainer.callback_metrics
    norms = sae.W_dec.norm(dim=1)
    torch.testing.assert_close(norms, torch.ones_like(norms))


@pytest.mark.slow
def test_tiny_run_trains_reloads_and_passes_verify(tmp_path, tiny_llama, text_folder, capsys):
    from midisc import verify
    from midisc.train import train

    db = tmp_path / "runs.db"
    cfg = compose_config(tiny_overrides(tiny_llama, text_folder, db, sae=("sae=gated",)))
    result = train(cfg, tmp_path / "out")
    assert result.metrics["fvu"] < 0.9, result.metrics
    assert json.loads((result.sae_dir / "cfg.json").read_text())["architecture"] == "gated"
    reloaded = load_sae(result.sae_dir)
    x = torch.randn(64, result.sae.d_in)
    with torch.no_grad():
        assert torch.equal(reloaded(x).x_hat, result.sae.eval()(x).x_hat)
    code = verify.main([str(result.run_id), "--db", f"sqlite:///{db}", "--json"])
    report = json.loads(capsys.readouterr().out)
    failed = {c["name"]: c["reason"] for c in report["checks"] if c["status"] == "FAIL"}
    assert code == 0 and report["passed"] and not failed, failed
    skipped = {c["name"] for c in report["checks"] if c["status"] == "SKIP"}
    assert skipped <= {"SAELens loads it"}, skipped  # only when SAELens is not installed
