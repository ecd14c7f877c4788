import pytest
import torch

from midisc.features import feature_stats
from midisc.sae import ReluSAE


def test_statistics_match_a_naive_count_over_all_tokens():
    torch.manual_seed(0)
    sae = ReluSAE(8, expansion=2, seed=0)
    x = torch.randn(500, 8)
    stats = feature_stats(sae, x.split(37))
    codes = sae.encode(x)
    for j in range(sae.d_sae):
        col = codes[:, j]
        fired = col[col > 0]
        assert abs(stats.frequency[j].item() - len(fired) / 500) < 1e-6
        assert abs(stats.max_activation[j].item() - (col.max().item() if len(fired) else 0.0)) < 1e-6
        assert abs(stats.mean_activation[j].item() - (fired.mean().item() if len(fired) else 0.0)) < 1e-5
    assert stats.n_tokens == 500


def test_a_planted_feature_fires_exactly_on_its_direction():
    sae = ReluSAE(4, expansion=1, seed=0)
    with torch.no_grad():
        sae.W_enc.copy_(torch.eye(4) * torch.tensor([1.0, -1, -1, -1]))  # only feature 0 can fire
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    x = torch.zeros(10, 4)
    x[:3, 0] = torch.tensor([1.0, 2.0, 3.0])
    stats = feature_stats(sae, [x])
    assert stats.frequency.tolist() == pytest.approx([0.3, 0.0, 0.0, 0.0])
    assert stats.max_activation[0] == 3.0 and stats.mean_activation[0] == 2.0
