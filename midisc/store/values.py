"""Make Python/numpy values safe to store: plain JSON types, and never NaN or infinity.

PostgreSQL rejects NaN inside JSON, SQLite would store it as text that later parses differently,
and a NaN in a float column poisons every ORDER BY and AVG. So non-finite numbers become absent:
dropped from JSON objects, null inside JSON lists (to keep positions), NULL in columns. Where a value
may not be absent (an example's activations), `finite_float` and `finite_float_list` refuse it instead.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any


def _as_python(value: Any) -> Any:
    # numpy (and torch) scalars and arrays, without importing either.
    if hasattr(value, "tolist") and callable(value.tolist):
        return value.tolist()
    return value


def _is_nonfinite(value: Any) -> bool:
    return isinstance(value, float) and not math.isfinite(value)


def finite_json(value: Any, where: str = "value") -> Any:
    """A copy of `value` made of dict/list/str/int/float/bool/None only, with non-finite floats removed.

    `where` names the value in the error raised for a type JSON cannot hold.
    """
    value = _as_python(value)
    if value is None or isinstance(value, (str, bool, int)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        out = {}
        for key, item in value.items():
            item = _as_python(item)
            if _is_nonfinite(item):
                continue
            out[str(key)] = finite_json(item, f"{where}.{key}")
        return out
    if isinstance(value, (list, tuple)):
        return [finite_json(item, f"{where}[{i}]") for i, item in enumerate(value)]
    raise ValueError(
        f"{where} is a {type(value).__name__} ({value!r}), which JSON cannot hold; "
        "use str, int, float, bool, None, list or dict"
    )


def finite_or_none(value: Any, name: str) -> float | None:
    """`value` as a float, or None when it is missing, NaN or infinite."""
    if value is None:
        return None
    value = _as_python(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number, got {value!r} ({type(value).__name__})")
    value = float(value)
    return value if math.isfinite(value) else None


def finite_floats(values: Any, name: str) -> list[float | None]:
    """A sequence (list or array) of numbers as floats, with NaN/inf as None."""
    out: list[float | None] = []
    for v in _as_python(values):
        # Fast path: the common case is already a Python float from .tolist().
        if type(v) is float:
            out.append(v if math.isfinite(v) else None)
        else:
            out.append(finite_or_none(v, name))
    return out


def finite_float(value: Any, name: str) -> float:
    """`value` as a float; ValueError naming it when it is not a number, or is NaN or infinite."""
    value = _as_python(value)
    if type(value) is not float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{name} must be a number, got {value!r} ({type(value).__name__})")
        value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} is {value}; it must be a finite number")
    return value


def finite_float_list(values: Any, name: str) -> list[float]:
    """A sequence (list or array) of numbers as a list of floats; ValueError at the first non-finite one.

    A list that is already all finite Python floats comes back as itself, not a copy.
    """
    values = _as_python(values)
    if not isinstance(values, list):
        values = list(values)  # a tuple, or a one-shot iterator the checks below would otherwise consume
    # Fast path for the common case, a list of Python floats from .tolist(): two passes in C, no Python loop.
    if set(map(type, values)) <= {float} and all(map(math.isfinite, values)):
        return values
    return [finite_float(v, f"{name}[{i}]") for i, v in enumerate(values)]
