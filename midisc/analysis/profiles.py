"""What a feature dashboard shows besides examples: activation histograms and what the decoder writes.

- `activation_histograms`: per feature, how its nonzero activations spread between their min and max
  (Neuronpedia's "activation density" bars), counted in one pass over activation batches.
- `output_effects`: per feature, the output tokens its decoder direction promotes and suppresses most
  (direction @ W_U.T, the logit lens of the feature) and the histogram of that effect over the vocabulary.
- `similar_features`: per feature, the features whose decoder directions are closest in cosine.

All vectorised over features and chunked so 20k+ features fit in memory; nothing here knows of files.
`profile_rows` turns them into the plain per-feature rows the store keeps for the feature browser.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from midisc.sae import SparseAutoencoder

# Elements of one [rows, features] block; bounds memory for 20k+ features and 50k+ vocabularies.
_BLOCK_ELEMENTS = 1 << 24


@dataclass
class Histograms:
    heights: torch.Tensor  # [d_sae, bins] counts
    centres: torch.Tensor  # [d_sae, bins] bin midpoints, per feature


def _binned(values: torch.Tensor, low: torch.Tensor, high: torch.Tensor, bins: int) -> torch.Tensor:
    """Bin index [rows, features] of each value, per feature's [low, high]; the top edge joins the last bin."""
    width = (high - low).clamp_min(1e-12)
    return ((values - low) / width * bins).long().clamp_(0, bins - 1)


def _centres(low: torch.Tensor, high: torch.Tensor, bins: int) -> torch.Tensor:
    steps = (torch.arange(bins, dtype=torch.float32) + 0.5) / bins
    return low[:, None] + (high - low)[:, None] * steps


@torch.no_grad()
def activation_histograms(sae: SparseAutoencoder, batches: Sequence[torch.Tensor], bins: int = 50) -> Histograms:
    """Counts of each feature's nonzero activations in `bins` equal bins between its smallest and largest.

    Two passes over `batches` (raw activations [n, d_in], held in memory): the range, then the counts,
    so the bars span what the feature actually does, as SAEDashboard's histograms do.
    """
    device = sae.W_dec.device
    low = torch.full((sae.d_sae,), math.inf, device=device)
    high = torch.zeros(sae.d_sae, device=device)
    for x in batches:
        codes = sae.encode(x.to(device, torch.float32))
        high = torch.maximum(high, codes.max(0).values)
        low = torch.minimum(low, codes.masked_fill(codes <= 0, math.inf).min(0).values)
    low = torch.where(torch.isinf(low), torch.zeros_like(low), low)  # never fired: an empty [0, 0] range
    counts = torch.zeros(sae.d_sae * bins, dtype=torch.long, device=device)
    offsets = torch.arange(sae.d_sae, device=device) * bins
    for x in batches:
        codes = sae.encode(x.to(device, torch.float32))  # [n, d_sae]
        rows, features = codes.nonzero(as_tuple=True)
        index = _binned(codes[rows, features], low[features], high[features], bins) + offsets[features]
        counts += torch.bincount(index, minlength=counts.numel())
    return Histograms(heights=counts.view(sae.d_sae, bins).cpu(), centres=_centres(low.cpu(), high.cpu(), bins))


@dataclass
class OutputEffects:
    top_ids: torch.Tensor        # [d_sae, n] token ids promoted most, strongest first
    top_values: torch.Tensor     # [d_sae, n]
    bottom_ids: torch.Tensor     # [d_sae, n] token ids suppressed most, strongest first
    bottom_values: torch.Tensor  # [d_sae, n] (negative)
    histograms: Histograms       # of the effect over the whole vocabulary


@torch.no_grad()
def output_effects(w_dec: torch.Tensor, unembed: torch.Tensor, n: int = 10, bins: int = 40) -> OutputEffects:
    """The logit effect of each decoder row [d_sae, d] through the unembedding [vocab, d]."""
    if w_dec.shape[1] != unembed.shape[1]:
        raise ValueError(f"decoder rows have width {w_dec.shape[1]} but the unembedding has {unembed.shape[1]}; "
                         "output tokens need an SAE on a residual-width hook")
    vocab = unembed.shape[0]
    n = min(n, vocab)
    unembed = unembed.float()
    chunk = max(1, _BLOCK_ELEMENTS // vocab)
    parts: list[tuple[torch.Tensor, ...]] = []
    for start in range(0, w_dec.shape[0], chunk):
        # Features as rows [c, vocab]: topk and min/max then read contiguous memory (half the time of
        # [vocab, c] columns for 4,608 features over 49k tokens), and the binning below works in place.
        effect = w_dec[start:start + chunk].float().to(unembed.device) @ unembed.T
        up, down = effect.topk(n, dim=1), effect.topk(n, dim=1, largest=False)
        low, high = effect.aminmax(dim=1)
        scale = bins / (high - low).clamp_min(1e-12)
        index = effect.sub_(low[:, None]).mul_(scale[:, None]).to(torch.int64).clamp_(0, bins - 1)
        index += torch.arange(effect.shape[0], device=effect.device)[:, None] * bins
        heights = torch.bincount(index.flatten(), minlength=effect.shape[0] * bins).view(-1, bins)
        parts.append((up.indices, up.values, down.indices, down.values, heights,
                      _centres(low.cpu(), high.cpu(), bins)))
    top_ids, top_values, bottom_ids, bottom_values, heights, centres = (torch.cat([p[i].cpu() for p in parts])
                                                                       for i in range(6))
    return OutputEffects(top_ids, top_values, bottom_ids, bottom_values, Histograms(heights, centres))


def token_lists(ids: torch.Tensor, decode: Callable[[Sequence[int]], list[str]]) -> list[list[str]]:
    """[d_sae, n] token ids -> their texts, decoding each distinct id once."""
    distinct = sorted(set(ids.flatten().tolist()))
    text = dict(zip(distinct, decode(distinct)))
    return [[text[i] for i in row] for row in ids.tolist()]


@torch.no_grad()
def similar_features(w_dec: torch.Tensor, n: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    """(indices, cosines) [d_sae, n]: the other features whose decoder rows are most aligned with each."""
    d_sae = w_dec.shape[0]
    n = min(n, d_sae - 1)
    rows = torch.nn.functional.normalize(w_dec.float(), dim=1)
    chunk = max(1, _BLOCK_ELEMENTS // d_sae)
    indices, values = [], []
    for start in range(0, d_sae, chunk):
        cos = rows[start:start + chunk] @ rows.T  # [c, d_sae]
        cos[torch.arange(cos.shape[0]), torch.arange(start, start + cos.shape[0])] = -2.0  # not itself
        top = cos.topk(n, dim=1)
        indices.append(top.indices.cpu())
        values.append(top.values.cpu())
    return torch.cat(indices), torch.cat(values)


def _bins(hist: Histograms, i: int, digits: int = 5) -> dict:
    """One feature's bars as {"low", "high", "heights"}: the bins are equal, so two edges give them all."""
    centres = hist.centres[i].tolist()
    half = (centres[1] - centres[0]) / 2 if len(centres) > 1 else 0.0
    return {"low": round(centres[0] - half, digits), "high": round(centres[-1] + half, digits),
            "heights": [int(h) for h in hist.heights[i].tolist()]}


def profile_rows(d_sae: int, density: Histograms | None, outputs: OutputEffects | None,
                 output_tokens: tuple[list[list[str]], list[list[str]]] | None,
                 similar: tuple[torch.Tensor, torch.Tensor] | None) -> list[dict]:
    """Per feature, {"feature_index", "profile"}: what a dashboard shows besides examples, as plain JSON
    (the store's feature_profiles). Whatever was not measured (None) is left out of every profile."""
    rows = []
    for i in range(d_sae):
        profile: dict = {}
        if density is not None:
            profile["density"] = _bins(density, i)
        if outputs is not None and output_tokens is not None:
            profile["promoted"] = [[t, round(v, 4)] for t, v in zip(output_tokens[0][i], outputs.top_values[i].tolist())]
            profile["suppressed"] = [[t, round(v, 4)]
                                     for t, v in zip(output_tokens[1][i], outputs.bottom_values[i].tolist())]
            profile["logits"] = _bins(outputs.histograms, i, 4)
        if similar is not None:
            profile["similar"] = [[j, round(c, 4)] for j, c in zip(similar[0][i].tolist(), similar[1][i].tolist())]
        rows.append({"feature_index": i, "profile": profile})
    return rows
