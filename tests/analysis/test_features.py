
import pytest
import torch

from midisc.analysis import features
from midisc.data.activations import ContextChunk
from midisc.analysis.features import (FeatureAnalyzer, analyze, example_rows, feature_stats, frequency_bins,
                             log_density_histogram)
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


def planted_sae(d: int = 4) -> ReluSAE:
    """Feature 0 reads direction 0 and nothing else can fire."""
    sae = ReluSAE(d, expansion=1, seed=0)
    with torch.no_grad():
        sae.W_enc.copy_(torch.eye(d) * torch.tensor([1.0] + [-1.0] * (d - 1)))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae


def planted_chunks(n_ctx: int = 6, T: int = 12, marker: int = 7, per_chunk: int = 2, seed: int = 0):
    """Contexts of random tokens; activations carry direction 0 scaled by 1 + position only at `marker`."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(10, 50, (n_ctx, T), generator=g)
    tokens[0, 3] = tokens[2, 5] = tokens[2, 9] = tokens[5, 11] = marker
    tokens[4, 0] = marker  # position 0 is never analysed
    keep = torch.ones(n_ctx, T, dtype=torch.bool)
    keep[:, 0] = False
    keep[1, 4] = False  # an outlier that was dropped
    acts = torch.zeros(n_ctx, T, 4)
    acts[..., 1] = 1.0
    ctx, pos = (tokens == marker).nonzero(as_tuple=True)
    acts[ctx, pos, 0] = 1.0 + pos.float() + ctx.float() / 10
    chunks = []
    for first in range(0, n_ctx, per_chunk):
        k = keep[first:first + per_chunk]
        chunks.append(ContextChunk(tokens=tokens[first:first + per_chunk], keep=k,
                                   acts=acts[first:first + per_chunk][k], first=first))
    return tokens, chunks


def test_a_planted_features_top_examples_are_exactly_the_contexts_of_its_token():
    tokens, chunks = planted_chunks()
    result = analyze(planted_sae(), chunks, n_top=5, n_quantile=3, before=2, after=1)
    assert result.stats.n_tokens == 6 * 11 - 1
    assert result.stats.frequency.tolist() == pytest.approx([4 / 65, 0, 0, 0])
    rows = example_rows(result, lambda ids: [f"<{i}>" for i in ids])
    top = [r for r in rows if r["kind"] == "top"]
    assert [(r["context_index"], r["token_index"]) for r in top] == [(5, 11), (2, 9), (2, 5), (0, 3)]
    assert [r["rank"] for r in top] == [0, 1, 2, 3] and all(r["feature_index"] == 0 for r in rows)
    assert top[0]["activation"] == pytest.approx(12.5)
    # The window is clipped at the context's end, and the max token's text is the marker's.
    assert top[0]["tokens"] == [f"<{int(t)}>" for t in tokens[5, 9:12]] and top[0]["max_token_index"] == 2
    assert top[0]["values"] == [0.0, 0.0, 12.5]
    assert top[1]["tokens"][top[1]["max_token_index"]] == "<7>" and len(top[1]["tokens"]) == 4
    # With only four firing tokens, the three-slot sample is three of them.
    sample = [r for r in rows if r["kind"] == "quantile"]
    assert len(sample) == 3 and {(r["context_index"], r["token_index"]) for r in sample} < {
        (r["context_index"], r["token_index"]) for r in top}


def test_top_examples_never_share_a_token_of_their_windows():
    # Feature 0 fires on a whole phrase (positions 3-8 of context 0, rising then falling) and once elsewhere.
    tokens = torch.arange(40).view(2, 20) + 10
    keep = torch.ones(2, 20, dtype=torch.bool)
    acts = torch.zeros(2, 20, 4)
    acts[0, 3:9, 0] = torch.tensor([1.0, 2.0, 5.0, 4.0, 3.0, 2.5])
    acts[0, 15, 0] = 2.0   # 7 tokens after the phrase's peak: its window is clear of the peak's
    acts[1, 10, 0] = 1.5
    acts[1, 12, 0] = 1.5   # a tie within reach: the earlier one is kept
    chunk = ContextChunk(tokens=tokens, keep=keep, acts=acts.view(-1, 4), first=0)
    result = analyze(planted_sae(), [chunk], n_top=5, n_quantile=0, before=4, after=2)
    top = [r for r in example_rows(result, lambda ids: [str(i) for i in ids]) if r["kind"] == "top"]
    assert [(r["context_index"], r["token_index"], r["activation"]) for r in top] == [(0, 5, 5.0), (0, 15, 2.0),
                                                                                     (1, 10, 1.5)]
    # Statistics still count every firing token.
    assert result.stats.frequency[0].item() == pytest.approx(9 / 40)


def test_window_peaks_are_more_than_the_radius_apart():
    torch.manual_seed(0)
    grid = torch.relu(torch.randn(3, 50, 6))
    peaks = features.window_peaks(grid, 5)
    for b, f in ((b, f) for b in range(3) for f in range(6)):
        where = peaks[b, :, f].nonzero().flatten().tolist()
        assert all(q - p > 5 for p, q in zip(where, where[1:]))
        for p in where:  # each is the largest within reach
            assert grid[b, max(0, p - 5):p + 6, f].max() == grid[b, p, f]
        # and the strongest activation of the row is always one
        if grid[b, :, f].max() > 0:
            assert int(grid[b, :, f].argmax()) in where


def test_the_analysis_does_not_depend_on_how_contexts_are_chunked(monkeypatch):
    torch.manual_seed(1)
    sae = ReluSAE(4, expansion=4, seed=0)
    tokens = torch.randint(0, 50, (6, 12))
    keep = torch.rand(6, 12) > 0.2
    acts = torch.randn(6, 12, 4)  # no ties, so the order of equal activations cannot differ

    def chunks(size):
        return [ContextChunk(tokens[i:i + size], keep[i:i + size], acts[i:i + size][keep[i:i + size]], i)
                for i in range(0, 6, size)]

    def decode(ids):
        return [str(i) for i in ids]

    a = example_rows(analyze(sae, chunks(6), n_quantile=0), decode)
    monkeypatch.setattr(features, "_GRID_ELEMENTS", 1)  # one context per grid
    b = example_rows(analyze(sae, chunks(1), n_quantile=0), decode)
    assert a == b and len(a) > 16


def test_the_quantile_sample_is_uniform_over_firing_tokens():
    sae = planted_sae()
    n_ctx, T = 200, 8
    tokens = torch.zeros(n_ctx, T, dtype=torch.long)
    keep = torch.ones(n_ctx, T, dtype=torch.bool)
    acts = torch.zeros(n_ctx, T, 4)
    acts[..., 0] = torch.rand(n_ctx, T)  # fires everywhere, uniform activations
    hits = torch.zeros(n_ctx * T)
    for seed in range(40):
        chunks = [ContextChunk(tokens[i:i + 20], keep[i:i + 20], acts[i:i + 20][keep[i:i + 20]], i)
                  for i in range(0, n_ctx, 20)]
        result = analyze(sae, chunks, n_top=1, n_quantile=10, seed=seed)
        hits[result.sample.context[0] * T + result.sample.position[0]] += 1
    assert hits.sum() == 400
    # Early and late contexts are drawn alike: the streaming merge favours neither.
    first, second = hits[: n_ctx * T // 2].sum(), hits[n_ctx * T // 2:].sum()
    assert abs(first - second) < 80


def test_memory_is_bounded_by_the_slots_not_the_tokens():
    sae = ReluSAE(4, expansion=8, seed=0)
    analyzer = FeatureAnalyzer(sae, n_top=3, n_quantile=2, before=1, after=1)
    _, chunks = planted_chunks()
    shapes = None
    for _ in range(3):
        for chunk in chunks:
            analyzer.add(chunk)
        now = [t.shape for t in vars(analyzer.top).values()] + [t.shape for t in vars(analyzer.sample).values()]
        assert shapes in (None, now)
        shapes = now


def test_twenty_thousand_features_in_one_pass():
    sae = ReluSAE(16, d_sae=20480, seed=0)
    tokens = torch.randint(0, 100, (6, 32))
    keep = torch.ones(6, 32, dtype=torch.bool)
    acts = torch.randn(6 * 32, 16)
    result = analyze(sae, [ContextChunk(tokens, keep, acts, 0)], n_top=2, n_quantile=1)
    assert result.stats.frequency.shape == (20480,) and result.top.window_ids.shape[:2] == (20480, 2)
    assert torch.allclose(result.stats.max_activation, sae.encode(acts).max(0).values)


def test_frequency_bins_and_log_density_histogram():
    freq = [0.0, 0.0, 5e-5, 5e-4, 5e-3, 0.05, 0.15, 0.5, 1.0]
    assert frequency_bins(freq) == {"never": 2, "<0.01%": 1, "0.01-0.1%": 1, "0.1-1%": 1, "1-10%": 1,
                                    "10-20%": 1, ">20%": 2}
    edges, counts, never = log_density_histogram(freq, bins=5)
    assert never == 2 and sum(counts) == 7 and edges[0] == -5 and edges[-1] == 0
    assert log_density_histogram([0.0, 0.0]) == ([], [], 2)


def test_bad_options_are_refused():
    with pytest.raises(ValueError, match="n_top=0"):
        FeatureAnalyzer(planted_sae(), n_top=0)
