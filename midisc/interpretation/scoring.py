"""Scores of an explanation from the scorer's answers, as the field reports them (delphi, OpenAI 2023).

Each answer is the scorer's probability that a context is one the explanation describes (detection: an
activating context, not a non-activating one; fuzzing: tokens marked where the feature fires, not at
random). Balanced accuracy thresholds it at 0.5; AUROC uses it whole (ties count half).
"""

from __future__ import annotations

import random
from collections.abc import Sequence


def balanced_accuracy(p_yes: Sequence[float], truth: Sequence[bool]) -> float | None:
    """Mean of the hit rate on true cases and the correct-rejection rate on false ones; None without both."""
    positives = [p >= 0.5 for p, t in zip(p_yes, truth) if t]
    negatives = [p < 0.5 for p, t in zip(p_yes, truth) if not t]
    if not positives or not negatives:
        return None
    return (sum(positives) / len(positives) + sum(negatives) / len(negatives)) / 2


def auroc(p_yes: Sequence[float], truth: Sequence[bool]) -> float | None:
    """The chance a random true case gets a higher probability than a random false one."""
    positives = [p for p, t in zip(p_yes, truth) if t]
    negatives = [p for p, t in zip(p_yes, truth) if not t]
    if not positives or not negatives:
        return None
    wins = sum((p > n) + 0.5 * (p == n) for p in positives for n in negatives)
    return wins / (len(positives) * len(negatives))


def yes_from_text(answer: str) -> float:
    """A chat model's written answer as a probability: 1 for yes, 0 for no or anything else."""
    word = answer.strip().lstrip("*\"' ").lower()
    return 1.0 if word.startswith("yes") else 0.0


def derangement(items: Sequence[int], seed: int) -> dict[int, int]:
    """Each item paired with another one (never itself): whose explanation a feature's baseline borrows."""
    order = list(items)
    if len(order) < 2:
        return {}
    random.Random(seed).shuffle(order)
    return {a: b for a, b in zip(order, order[1:] + order[:1])}
