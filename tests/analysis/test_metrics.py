import pytest
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


# --- every definition pinned against values worked out by hand (METRICS_VERSION 1) ------------------------------
X = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [2.0, 0.0]])
X_HAT = torch.tensor([[1.0, 0.0], [0.0, 0.0], [1.0, 1.0], [1.0, 0.0]])
CODES = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 0.0], [2.0, 1.0, 0.0], [0.0, 0.5, 0.0]])


class FixedSAE:
    """An 'SAE' whose outputs on X are X_HAT and CODES, so every figure below is arithmetic on three small tables."""

    d_sae = 3
    W_dec = torch.zeros(3, 2)

    def __call__(self, x):
        from midisc.sae.base import Output

        assert torch.equal(x, X)
        zero = torch.tensor(0.0)
        return Output(x_hat=X_HAT.clone(), codes=CODES.clone(), loss=zero, mse=zero, l1=zero)


def test_the_metric_definitions_are_the_ones_worked_out_by_hand():
    from midisc.analysis.saebench import core_report, reconstruction
    from midisc.analysis.splice import SpliceTotals

    # Σ‖x − x̂‖² = 0 + 1 + 0 + 1 = 2. The mean is (1, 0.5); Σ‖x − mean‖² = 0.25 + 1.25 + 0.25 + 1.25 = 3.
    assert metrics.METRICS_VERSION == 1  # a changed definition changes a figure here: bump the version with it
    assert metrics.fvu(X, X_HAT).item() == pytest.approx(2 / 3)
    assert metrics.mse(X, X_HAT).item() == pytest.approx(2 / 8)
    assert metrics.l0(CODES).item() == pytest.approx(4 / 4)  # 1 + 0 + 2 + 1 active over 4 tokens
    assert metrics.dead_fraction(torch.tensor([0, 5, 10]), window=5).item() == pytest.approx(2 / 3)
    recon = reconstruction(FixedSAE(), [X])
    assert recon["fvu"] == pytest.approx(2 / 3) and recon["mse"] == pytest.approx(0.25)
    assert recon["l0"] == pytest.approx(1.0) and recon["l1"] == pytest.approx((1 + 3 + 0.5) / 4)
    assert recon["dead_frac"] == pytest.approx(1 / 3)  # feature 2 never fires
    assert recon["cossim"] == pytest.approx(3 / 4)  # 1, 0 (x̂ = 0), 1, 1
    # Per token: CE clean 1.0, with the SAE 1.3, zero-ablated 3.0; KL with the SAE 0.4, zero-ablated 1.0.
    totals = SpliceTotals(tokens=2, ce={"clean": 2.0, "sae": 2.6, "zero": 6.0}, kl={"sae": 0.8, "zero": 2.0})
    scores = totals.scores()
    assert scores["ce_loss_score"] == pytest.approx((3.0 - 1.3) / (3.0 - 1.0))
    assert scores["kl_div_score"] == pytest.approx((1.0 - 0.4) / 1.0)
    report = core_report(recon, scores, 2, {})
    # Explained variance against the mean (1/3), not against zero (1 − 2/8 = 0.75: SAELens #665's mistake).
    assert report["eval_result_metrics"]["reconstruction_quality"]["explained_variance"] == pytest.approx(1 / 3)
    assert report["midisc"]["metrics_version"] == metrics.METRICS_VERSION
