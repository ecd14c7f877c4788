"""The synthetic ground truth: its data are what it says, and the scores measure recovery."""

import pytest
import torch

from midisc.analysis.ground_truth import CHILD_RATE, feature_f1, make_ground_truth, match, sample


def test_samples_have_the_asked_sparsity_and_children_fire_only_with_parents():
    truth = make_ground_truth(200, 32, mean_active=5.0, seed=3)
    x, active = sample(truth, 30_000, torch.Generator().manual_seed(0))
    assert x.shape == (30_000, 32) and active.float().sum(1).mean().item() == pytest.approx(5.0, rel=0.05)
    children = truth.parent >= 0
    assert children.sum() == 50  # a quarter of the features
    assert not (active[:, children] & ~active[:, truth.parent[children]]).any()
    given_parent = active[:, children].float().sum() / active[:, truth.parent[children]].float().sum()
    assert given_parent.item() == pytest.approx(CHILD_RATE, rel=0.05)
    assert torch.allclose(truth.directions.norm(dim=1), torch.ones(200))
    # x is the offset plus the active directions' sum, and noise: the residual has the noise's size.
    residual = x - truth.offset - (active.float() * 1.0) @ truth.directions
    assert residual.std().item() > truth.noise


def test_matching_finds_a_shuffled_copy_and_scores_a_random_one_low():
    truth = make_ground_truth(64, 16, seed=1)
    order = torch.randperm(80, generator=torch.Generator().manual_seed(2))
    decoder = torch.randn(80, 16)
    decoder[order[:64]] = truth.directions * 3  # scale does not matter, only direction
    latent, cosine = match(decoder, truth.directions)
    assert torch.equal(latent, order[:64]) and torch.allclose(cosine, torch.ones(64))
    _, random_cosine = match(torch.randn(80, 16), truth.directions)
    assert random_cosine.mean() < 0.7
    with pytest.raises(ValueError, match="10 latents cannot each match one of 64 true features"):
        match(torch.randn(10, 16), truth.directions)


def test_feature_f1_by_hand():
    active = torch.tensor([[1, 0], [1, 1], [0, 1], [0, 0]], dtype=torch.bool)
    codes = torch.tensor([[0.5, 0.0, 2.0], [0.0, 0.0, 1.0], [0.0, 3.0, 0.0], [0.0, 1.0, 0.0]])
    # true feature 0 <-> latent 2: fired on samples 0, 1 (both active): F1 1. Feature 1 <-> latent 1: fired on
    # 2, 3, active on 1, 2: one hit, F1 = 2·1 / (2 + 2) = 0.5.
    assert feature_f1(codes, active, torch.tensor([2, 1])).tolist() == [1.0, 0.5]
