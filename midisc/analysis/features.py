"""What each feature does, in one streaming pass: firing statistics and the examples it fires on.

For every feature over a set of analysed tokens: how often it fires, its mean activation when it fires,
its maximum, the contexts of its `n_top` strongest activations, and `n_quantile` examples drawn
uniformly from all the tokens it fires on (so weak, typical activations show too, as feature dashboards
do). Memory stays flat as the tokens grow: each feature keeps a fixed number of example slots, and a
batch of contexts is merged into them with one top-k per kind, vectorised over all features.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from midisc.data.activations import ContextChunk
from midisc.sae import SparseAutoencoder

# The frequency bins researchers read SAE sparsity in (fraction of tokens a feature fires on).
FREQUENCY_BINS: tuple[tuple[str, float, float], ...] = (
    ("never", 0.0, 0.0), ("<0.01%", 0.0, 1e-4), ("0.01-0.1%", 1e-4, 1e-3), ("0.1-1%", 1e-3, 1e-2),
    ("1-10%", 1e-2, 0.1), ("10-20%", 0.1, 0.2), (">20%", 0.2, math.inf))
# Elements of the per-batch [contexts, T, d_sae] activation grid; bounds memory with 20k+ features.
_GRID_ELEMENTS = 1 << 24


@dataclass
class FeatureStats:
    frequency: torch.Tensor        # [d_sae] fraction of tokens on which the feature fires
    mean_activation: torch.Tensor  # [d_sae] mean activation when it fires (0 if it never does)
    max_activation: torch.Tensor   # [d_sae] largest activation seen (0 if it never fires)
    n_tokens: int


class _Counts:
    """Firing count, activation sum and running max per feature."""

    def __init__(self, d_sae: int, device: torch.device) -> None:
        self.fires = torch.zeros(d_sae, dtype=torch.long, device=device)
        self.total = torch.zeros(d_sae, dtype=torch.float64, device=device)
        self.peak = torch.zeros(d_sae, device=device)
        self.n = 0

    def add(self, codes: torch.Tensor) -> None:  # codes [n, d_sae]
        self.fires += (codes > 0).sum(0)
        self.total += codes.sum(0, dtype=torch.float64)
        if len(codes):
            self.peak = torch.maximum(self.peak, codes.max(0).values)
        self.n += len(codes)

    def result(self) -> FeatureStats:
        if self.n == 0:
            raise ValueError("feature statistics need at least one activation vector")
        return FeatureStats(frequency=(self.fires / self.n).float().cpu(),
                            mean_activation=(self.total / self.fires.clamp_min(1)).float().cpu(),
                            max_activation=self.peak.cpu(), n_tokens=self.n)


@torch.no_grad()
def feature_stats(sae: SparseAutoencoder, batches: Iterable[torch.Tensor]) -> FeatureStats:
    """Statistics alone, over bare activation batches [n, d_in]."""
    counts = _Counts(sae.d_sae, sae.W_dec.device)
    for x in batches:
        counts.add(sae.encode(x.to(sae.W_dec.device, torch.float32)))
    return counts.result()


class _Slots:
    """Per feature, the `size` candidates with the largest key seen so far, with their windows."""

    def __init__(self, d_sae: int, size: int, width: int, device: torch.device) -> None:
        self.key = torch.full((d_sae, size), -math.inf, device=device)
        self.activation = torch.zeros(d_sae, size, device=device)
        self.context = torch.full((d_sae, size), -1, dtype=torch.long, device=device)
        self.position = torch.zeros(d_sae, size, dtype=torch.long, device=device)
        self.window_ids = torch.full((d_sae, size, width), -1, dtype=torch.int32, device=device)
        self.window_values = torch.zeros(d_sae, size, width, device=device)

    def merge(self, key, activation, context, position, window_ids, window_values) -> None:
        """Candidates [d_sae, c] (windows [d_sae, c, W]); a key of -inf marks an empty candidate."""
        size = self.key.shape[1]
        keys = torch.cat([self.key, key], dim=1)
        best = keys.topk(size, dim=1).indices
        self.key = keys.gather(1, best)
        for name, new in (("activation", activation), ("context", context), ("position", position)):
            setattr(self, name, torch.cat([getattr(self, name), new], dim=1).gather(1, best))
        wide = best[..., None].expand(-1, -1, self.window_ids.shape[2])
        self.window_ids = torch.cat([self.window_ids, window_ids], dim=1).gather(1, wide)
        self.window_values = torch.cat([self.window_values, window_values], dim=1).gather(1, wide)


@dataclass
class FeatureAnalysis:
    stats: FeatureStats
    top: _Slots       # strongest activations, by activation
    sample: _Slots    # uniform sample of firing tokens, by random priority
    before: int       # window tokens before the max token


def window_peaks(grid: torch.Tensor, radius: int) -> torch.Tensor:
    """Where each feature's activation is the largest within `radius` tokens either side in its context (the
    earliest of equal ones): [b, T, d_sae] -> bool of the same shape. Two peaks of a feature are more than
    `radius` tokens apart, so windows of radius + 1 tokens around them never overlap."""
    if radius < 1:
        return grid > 0
    rows = grid.permute(0, 2, 1)  # [b, d_sae, T]
    length = rows.shape[2]
    # Max over the `radius` tokens before (out[p]) and after (out[p + radius + 1]) each position.
    out = F.max_pool1d(F.pad(rows, (radius, radius), value=-math.inf), kernel_size=radius, stride=1)
    before, after = out[..., :length], out[..., radius + 1:radius + 1 + length]
    return ((rows > before) & (rows >= after) & (rows > 0)).permute(0, 2, 1)


class FeatureAnalyzer:
    """Feed it `ContextChunk`s (activations that know their contexts); `result()` gives the analysis."""

    def __init__(self, sae: SparseAutoencoder, *, n_top: int = 20, n_quantile: int = 10, before: int = 16,
                 after: int = 4, seed: int = 0) -> None:
        if n_top < 1 or n_quantile < 0 or before < 0 or after < 0:
            raise ValueError(f"n_top={n_top} must be >= 1 and n_quantile={n_quantile}, before={before}, "
                             f"after={after} >= 0")
        self.sae = sae
        self.device = sae.W_dec.device
        self.offsets = torch.arange(-before, after + 1, device=self.device)
        self.before = before
        self.counts = _Counts(sae.d_sae, self.device)
        width = len(self.offsets)
        self.top = _Slots(sae.d_sae, n_top, width, self.device)
        self.sample = _Slots(sae.d_sae, max(n_quantile, 1), width, self.device)
        self.n_quantile = n_quantile
        self.generator = torch.Generator(self.device).manual_seed(seed)

    @torch.no_grad()
    def add(self, chunk: ContextChunk) -> None:
        step = max(1, _GRID_ELEMENTS // (chunk.tokens.shape[1] * self.sae.d_sae))
        rows = chunk.keep.sum(1).tolist()
        start = 0
        for first in range(0, len(chunk.tokens), step):
            n = sum(rows[first:first + step])
            self._add(chunk.tokens[first:first + step], chunk.keep[first:first + step],
                      chunk.acts[start:start + n], chunk.first + first)
            start += n

    def _add(self, tokens: torch.Tensor, keep: torch.Tensor, acts: torch.Tensor, first: int) -> None:
        tokens, keep = tokens.to(self.device), keep.to(self.device)
        codes = self.sae.encode(acts.to(self.device, torch.float32))  # [n, d_sae]
        self.counts.add(codes)
        if not len(codes):
            return
        ctx, pos = keep.nonzero(as_tuple=True)  # row-major, as the kept rows were taken
        grid = codes.new_zeros(*tokens.shape, codes.shape[1])  # [b, T, d_sae]: 0 where nothing was kept
        grid[keep] = codes
        by_feature = codes.T  # [d_sae, n]
        # Top examples are the peaks of their windows: no two of a feature's windows share a token, so ten
        # examples are ten uses, not one phrase seen through ten overlapping windows.
        peaks = (grid * window_peaks(grid, len(self.offsets) - 1))[keep].T  # [d_sae, n]
        top = peaks.topk(min(self.top.key.shape[1], len(codes)), dim=1)
        self._offer(self.top, top.values.masked_fill(top.values <= 0, -math.inf), top.indices, by_feature,
                    tokens, grid, ctx, pos, first)
        if self.n_quantile:
            # A uniform random key per firing token: keeping the largest keys samples without replacement.
            priority = torch.rand(by_feature.shape, generator=self.generator, device=self.device)
            priority = priority.masked_fill(by_feature <= 0, -math.inf)
            pick = priority.topk(min(self.sample.key.shape[1], len(codes)), dim=1)
            self._offer(self.sample, pick.values, pick.indices, by_feature, tokens, grid, ctx, pos, first)

    def _offer(self, slots: _Slots, key, index, by_feature, tokens, grid, ctx, pos, first) -> None:
        c, p = ctx[index], pos[index]  # [d_sae, k]
        at = p[..., None] + self.offsets  # [d_sae, k, W]
        inside = (at >= 0) & (at < tokens.shape[1])
        at = at.clamp(0, tokens.shape[1] - 1)
        cw = c[..., None].expand_as(at)
        feature = torch.arange(grid.shape[2], device=self.device)[:, None, None].expand_as(at)
        ids = tokens[cw, at].to(torch.int32).masked_fill(~inside, -1)
        values = grid[cw, at, feature].masked_fill(~inside, 0.0)
        slots.merge(key, by_feature.gather(1, index), c + first, p, ids, values)

    def result(self) -> FeatureAnalysis:
        return FeatureAnalysis(stats=self.counts.result(), top=self.top, sample=self.sample, before=self.before)


def analyze(sae: SparseAutoencoder, chunks: Iterable[ContextChunk], **options) -> FeatureAnalysis:
    analyzer = FeatureAnalyzer(sae, **options)
    for chunk in chunks:
        analyzer.add(chunk)
    return analyzer.result()


def example_rows(analysis: FeatureAnalysis, decode: Callable[[Sequence[int]], list[str]]) -> list[dict]:
    """The examples as plain rows for the store, strongest first within each kind.

    `decode` turns a list of distinct token ids into their texts, one each; it is called once.
    """
    kinds = (("top", analysis.top), ("quantile", analysis.sample))
    used = torch.cat([s.window_ids[s.key > -math.inf].flatten() for _, s in kinds])
    distinct = sorted(set(used[used >= 0].tolist()))
    text = dict(zip(distinct, decode(distinct)))
    rows = []
    for kind, slots in kinds:
        valid = slots.key > -math.inf
        activation = slots.activation.masked_fill(~valid, -math.inf)
        order = activation.argsort(dim=1, descending=True)
        for feature, rank_order in enumerate(order.tolist()):
            rank = 0
            for slot in rank_order:
                if not valid[feature, slot]:
                    break
                ids = slots.window_ids[feature, slot].tolist()
                inside = [i for i, t in enumerate(ids) if t >= 0]
                rows.append({"feature_index": feature, "kind": kind, "rank": rank,
                             "activation": float(slots.activation[feature, slot]),
                             "context_index": int(slots.context[feature, slot]),
                             "token_index": int(slots.position[feature, slot]),
                             "max_token_index": analysis.before - inside[0],
                             "tokens": [text[ids[i]] for i in inside],
                             "values": [round(float(v), 5) for v in slots.window_values[feature, slot, inside[0]:
                                                                                          inside[-1] + 1]]})
                rank += 1
    return rows


def frequency_bins(frequency: Sequence[float]) -> dict[str, int]:
    """How many features fall in each of FREQUENCY_BINS; 'never' holds the features that never fired."""
    counts = dict.fromkeys((name for name, _, _ in FREQUENCY_BINS), 0)
    for f in frequency:
        for name, low, high in FREQUENCY_BINS:
            if (f == 0 and name == "never") or (f > 0 and low <= f < high and name != "never"):
                counts[name] += 1
                break
    return counts


def log_density_histogram(frequency: Sequence[float], bins: int = 20) -> tuple[list[float], list[int], int]:
    """(edges, counts, never): a histogram of log10(frequency) over the features that fired at all."""
    logs = torch.tensor([math.log10(f) for f in frequency if f > 0], dtype=torch.float64)
    never = len(frequency) - len(logs)
    if not len(logs):
        return [], [], never
    low, high = math.floor(float(logs.min())), max(0.0, math.ceil(float(logs.max())))
    if high - low < 1:
        high = low + 1
    counts = torch.histc(logs, bins=bins, min=low, max=high)
    edges = torch.linspace(low, high, bins + 1)
    return [round(float(e), 4) for e in edges], [int(c) for c in counts], never
