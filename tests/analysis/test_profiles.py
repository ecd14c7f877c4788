"""Activation histograms, output tokens and similar features against naive per-feature loops."""

import pytest
import torch

from midisc.analysis import profiles
from midisc.data import lm
from midisc.sae import ReluSAE


def relu_sae(d_in=8, expansion=4, seed=0):
    sae = ReluSAE(d_in, expansion, seed=seed)
    with torch.no_grad():
        sae.b_enc.uniform_(-0.2, 0.2)
    return sae


def test_activation_histograms_match_histc_per_feature_and_ignore_batching():
    sae, x = relu_sae(), torch.randn(500, 8)
    codes = sae.encode(x).detach()
    hist = profiles.activation_histograms(sae, [x], bins=7)
    for f in range(sae.d_sae):
        fired = codes[:, f][codes[:, f] > 0]
        if not len(fired):
            assert hist.heights[f].sum() == 0 and hist.centres[f].abs().max() == 0
            continue
        low, high = float(fired.min()), float(fired.max())
        assert hist.heights[f].tolist() == torch.histc(fired, bins=7, min=low, max=high).long().tolist(), f
        assert hist.centres[f, 0] == pytest.approx(low + (high - low) / 14, rel=1e-5)
    assert torch.equal(profiles.activation_histograms(sae, list(x.split(37)), bins=7).heights, hist.heights)


def test_output_effects_match_the_full_product_in_small_blocks(monkeypatch):
    monkeypatch.setattr(profiles, "_BLOCK_ELEMENTS", 100)  # forces one feature per block
    w_dec, unembed = torch.randn(12, 6), torch.randn(40, 6)
    out = profiles.output_effects(w_dec, unembed, n=5, bins=8)
    full = unembed @ w_dec.T  # [vocab, d_sae]
    for f in range(12):
        column = full[:, f]
        assert out.top_ids[f].tolist() == column.topk(5).indices.tolist()
        assert out.bottom_ids[f].tolist() == (-column).topk(5).indices.tolist()
        assert torch.allclose(out.bottom_values[f], column.sort().values[:5], atol=1e-5)
        assert int(out.histograms.heights[f].sum()) == 40
        assert torch.histc(column, bins=8, min=float(column.min()), max=float(column.max())).long().tolist() \
            == out.histograms.heights[f].tolist()


def test_output_effects_refuse_a_hook_of_another_width():
    try:
        profiles.output_effects(torch.randn(4, 6), torch.randn(10, 5))
    except ValueError as err:
        assert "width 6" in str(err) and "5" in str(err)
    else:
        raise AssertionError("expected a ValueError")


def test_similar_features_find_a_planted_twin_and_never_themselves(monkeypatch):
    monkeypatch.setattr(profiles, "_BLOCK_ELEMENTS", 50)
    w_dec = torch.randn(20, 8)
    w_dec[7] = 3 * w_dec[2]
    indices, cosines = profiles.similar_features(w_dec, n=4)
    assert indices[2, 0] == 7 and indices[7, 0] == 2 and abs(float(cosines[2, 0]) - 1) < 1e-5
    assert all(f not in indices[f].tolist() for f in range(20))
    rows = torch.nn.functional.normalize(w_dec, dim=1)
    naive = (rows @ rows.T).fill_diagonal_(-2).topk(4, dim=1)
    assert torch.allclose(cosines, naive.values, atol=1e-6)


def test_unembedding_folds_the_final_norm_weight(tiny_llama):
    loaded = lm.load_model(str(tiny_llama), device_map=None)
    model = loaded.model
    with torch.no_grad():
        model.model.norm.weight.uniform_(0.5, 2.0)
    expected = model.get_output_embeddings().weight * model.model.norm.weight
    assert torch.allclose(lm.unembedding(model), expected)
    # The logit change of a direction added to the last hidden state, with the norm's 1/rms fixed.
    h = torch.randn(model.config.hidden_size)
    assert torch.allclose(model.lm_head(model.model.norm.weight * h), lm.unembedding(model) @ h, atol=1e-5)


def test_profile_rows_hold_each_feature_s_profile_as_plain_json():
    sae, x = relu_sae(), torch.randn(300, 8)
    density = profiles.activation_histograms(sae, [x], bins=6)
    outputs = profiles.output_effects(sae.W_dec.detach(), torch.randn(30, 8), n=3, bins=5)
    tokens = (profiles.token_lists(outputs.top_ids, lambda ids: [f"t{i}" for i in ids]),
              profiles.token_lists(outputs.bottom_ids, lambda ids: [f"t{i}" for i in ids]))
    similar = profiles.similar_features(sae.W_dec.detach(), n=2)
    rows = profiles.profile_rows(sae.d_sae, density, outputs, tokens, similar)
    assert [r["feature_index"] for r in rows] == list(range(sae.d_sae))
    for f, row in enumerate(rows):
        p = row["profile"]
        assert p["density"]["heights"] == density.heights[f].tolist()
        # Equal bins: the two stored edges give back every centre.
        width = (p["density"]["high"] - p["density"]["low"]) / 6
        centres = [p["density"]["low"] + (i + 0.5) * width for i in range(6)]
        assert centres == pytest.approx(density.centres[f].tolist(), abs=1e-4)
        assert [t for t, _ in p["promoted"]] == [f"t{i}" for i in outputs.top_ids[f].tolist()]
        assert [v for _, v in p["suppressed"]] == pytest.approx(outputs.bottom_values[f].tolist(), abs=1e-4)
        assert sum(p["logits"]["heights"]) == 30
        assert [j for j, _ in p["similar"]] == similar[0][f].tolist() and f not in [j for j, _ in p["similar"]]
    # What was not measured (a hook that is not residual width: no output tokens) is left out.
    bare = profiles.profile_rows(sae.d_sae, density, None, None, similar)
    assert set(bare[0]["profile"]) == {"density", "similar"}
