import torch

from midisc.analysis import metrics
from midisc.sae import TopKSAE


def test_fvu_is_zero_for_perfect_and_one_for_the_mean():
    x = torch.randn(100, 8) + 5
    assert metrics.fvu(x, x).item() == 0
    assert abs(metrics.fvu(x, x.mean(0).expand_as(x)).item() - 1) < 1e-6


def test_fvu_is_against_variance_about_the_mean_not_the_raw_norm():
    x = torch.randn(1000, 4) + 100  # a large offset must not flatter the score
    noisy = x + 0.5 * torch.randn_like(x)
    assert 0.2 < metrics.fvu(x, noisy).item() < 0.3


def test_l0_counts_active_features_per_token():
    codes = torch.tensor([[0.0, 1.0, 2.0], [0.0, 0.0, 3.0]])
    assert metrics.l0(codes).item() == 1.5


def test_dead_fraction_uses_the_window():
    since = torch.tensor([0, 10, 100, 1000])
    assert metrics.dead_fraction(since, window=100).item() == 0.5


def test_running_totals_equal_the_whole_set_at_once():
    torch.manual_seed(0)
    x = torch.randn(1000, 6) * 3 + 2
    x_hat = x + torch.randn_like(x)
    codes = (torch.rand(1000, 10) > 0.7).float()
    totals = metrics.ReconstructionTotals()
    for part in range(0, 1000, 96):
        totals.update(x[part:part + 96], x_hat[part:part + 96], codes[part:part + 96])
    got = totals.compute()
    assert abs(got["fvu"] - metrics.fvu(x, x_hat).item()) < 1e-5
    assert abs(got["mse"] - metrics.mse(x, x_hat).item()) < 1e-5
    assert abs(got["l0"] - metrics.l0(codes).item()) < 1e-6


def test_reconstruction_metrics_match_a_direct_forward():
    sae = TopKSAE(6, expansion=2, k=3, seed=0)
    x = torch.randn(300, 6)
    got = metrics.reconstruction_metrics(sae, x.split(64))
    out = sae(x)
    assert abs(got["fvu"] - metrics.fvu(x, out.x_hat).item()) < 1e-5
    assert got["l0"] <= 3
