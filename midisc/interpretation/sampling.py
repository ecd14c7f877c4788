"""Which of a feature's recorded examples explain it and which score the explanation, as delphi does it.

The examples come from the analysis (feature_examples): its strongest windows ("top", by rank) and windows
sampled uniformly from every token it fires on ("quantile"). Both kinds go to both sides, alternating by
rank, so the explainer sees strong and typical activations and the scorer is tested across the range; no
window is on both sides.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class Chosen:
    explain: list[dict[str, Any]]
    detect: list[dict[str, Any]]   # activating windows the scorer must tell from non-activating ones
    fuzz: list[dict[str, Any]]     # activating windows shown with marked tokens

    def ids(self) -> dict[str, list[list[Any]]]:
        """Which examples went where, as (kind, rank) pairs: what the explanation row records."""
        return {name: [[e["kind"], e["rank"]] for e in getattr(self, name)] for name in ("explain", "detect", "fuzz")}


def _interleave(*lists: list[dict]) -> list[dict]:
    out = []
    for i in range(max(map(len, lists), default=0)):
        out.extend(items[i] for items in lists if i < len(items))
    return out


def choose(examples: list[dict[str, Any]], n_explain: int, n_detect: int, n_fuzz: int) -> Chosen:
    """Split one feature's examples: even ranks (top and quantile, interleaved) explain, odd ranks score."""
    top = sorted((e for e in examples if e["kind"] == "top"), key=lambda e: e["rank"])
    sampled = sorted((e for e in examples if e["kind"] == "quantile"), key=lambda e: e["rank"])
    explain = _interleave(top[0::2], sampled[0::2])[:n_explain]
    held = _interleave(top[1::2], sampled[1::2])
    detect = held[:n_detect]
    # Fuzzing takes the held-out windows after detection's, and detection's again when there are too few.
    fuzz = (held[n_detect:] + held[:n_detect])[:n_fuzz]
    return Chosen(explain, detect, fuzz)
