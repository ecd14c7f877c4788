"""Contexts where a feature does not fire: the negatives that detection needs beside its activating examples.

The store keeps only windows where each feature fires, so the run's model and SAE are run again over a
sample of its held-out contexts (the same contexts the analysis read), cut into windows, and each window's
peak activation of every feature to be explained is kept. Position 0 and separators are never analysed
(their norms are outliers), so they are left out of the windows' peaks, as the analysis leaves them out.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from midisc.data.recipe import Source
from midisc.sae import SparseAutoencoder


@dataclass
class Pool:
    windows: list[list[str]]        # token texts of each window
    origin: list[tuple[int, int]]   # (held-out context, first position) of each window
    peaks: torch.Tensor             # [n_windows, n_features] peak activation of each explained feature
    columns: dict[int, int]         # feature index -> column of `peaks`

    def quiet(self, feature: int, n: int, seed: int) -> list[int]:
        """Up to `n` windows where `feature` never fires, drawn with `seed`."""
        silent = (self.peaks[:, self.columns[feature]] <= 0).nonzero().flatten().tolist()
        return sorted(random.Random(seed * 1_000_003 + feature).sample(silent, min(n, len(silent))))


@torch.inference_mode()
def build(sae: SparseAutoencoder, source: Source, features: list[int], n_contexts: int, window: int,
          batch: int = 8) -> Pool:
    contexts = source.heldout_contexts()[:n_contexts]
    decode = source.tokens.decode()
    special = torch.tensor(sorted(set(source.tokens.special)), dtype=torch.long)
    wanted = torch.tensor(features, dtype=torch.long)
    windows, origin, peaks = [], [], []
    for first in range(0, len(contexts), batch):
        ids = contexts[first:first + batch]
        acts = source.capture(ids)  # [b, T, d]
        codes = sae.encode(acts.to(sae.W_dec.device, torch.float32))[..., wanted.to(sae.W_dec.device)].cpu()
        codes[torch.isin(ids, special)] = 0.0
        codes[:, 0] = 0.0
        for row in range(len(ids)):
            for start in range(1, ids.shape[1] - window + 1, window):
                windows.append(decode(ids[row, start:start + window].tolist()))
                origin.append((first + row, start))
                peaks.append(codes[row, start:start + window].max(0).values)
    stacked = torch.stack(peaks) if peaks else torch.zeros(0, len(features))
    return Pool(windows, origin, stacked, {f: i for i, f in enumerate(features)})
