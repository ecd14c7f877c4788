"""The rules for a setting's value, each in one place, each failing with one line that names the value and
the valid range. The SAE constructors check their hyperparameters with them; `midisc.config` checks the
rest of the config with the same functions, so a rule and its wording never exist twice.
"""

from __future__ import annotations

import math
from typing import Any


def integer(name: str, value: Any, low: int, high: int | None = None) -> int:
    """`value` as an int in low..high (high None: no upper bound); bool is a mistake, not a number."""
    valid = f">= {low}" if high is None else f"in {low}..{high}"
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer {valid}, got {value!r}")
    if value < low:
        raise ValueError(f"{name}={value} is too small; it must be {valid}")
    if high is not None and value > high:
        raise ValueError(f"{name}={value} is too large; it must be {valid}")
    return value


def number(name: str, value: Any, low: float, *, strict: bool = False, high: float | None = None) -> float:
    """`value` as a finite float >= low (> low when `strict`), and <= high when given."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < low or (strict and value == low) or (high is not None and value > high):
        bound = f"> {low:g}" if strict else f">= {low:g}"
        if high is not None:
            bound = f"in ({low:g}, {high:g}]" if strict else f"in [{low:g}, {high:g}]"
        raise ValueError(f"{name} must be a finite number {bound}, got {value!r}")
    return float(value)


def width_bounded(name: str, value: Any, d_sae: int, d_in: int, expansion: int) -> int:
    """An integer 1..d_sae (the k of TopK and BatchTopK), said in terms of how the width was chosen."""
    value = integer(name, value, 1)
    if value > d_sae:
        width = f"expansion {expansion} x d_in {d_in}" if d_sae == expansion * d_in else "d_sae given directly"
        raise ValueError(f"{name}={value} is larger than the SAE width {d_sae} ({width}); choose 1 <= {name} <= {d_sae}")
    return value
