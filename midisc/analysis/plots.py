"""Publication-quality PNG figures for a trained sparse autoencoder.

The four figures are the ones SAE papers show to argue a dictionary is healthy: the feature-density
histogram (dead and dense features at a glance), training curves (loss, FVU, L0, dead fraction against
step, with held-out points), frequency against max activation (rare features that fire weakly are
often noise), and the sparsity–fidelity frontier that compares runs at equal L0.

Functions take plain Python values, so they can draw from the store, a JSON file or a notebook. They use
matplotlib's Figure object with the Agg canvas and never pyplot: importing this module opens no window
and leaves matplotlib's global backend and state as it found them. Non-finite values are dropped, never
fatal, and counted on the figure so a reader knows something was left out.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import LogFormatter

DPI = 150
DENSE_THRESHOLD = 0.1  # features firing on more than 10 % of tokens are usually called dense

# Applied only inside `_style()`; rc_context restores the caller's settings afterwards.
_RC = {
    "font.size": 10, "axes.titlesize": 11, "axes.labelsize": 10, "figure.titlesize": 12,
    "xtick.labelsize": 9, "ytick.labelsize": 9, "legend.fontsize": 9,
    "axes.spines.top": False, "axes.spines.right": False,
}

@contextmanager
def _style() -> Iterator[None]:
    with matplotlib.rc_context(_RC):
        yield


def _save(fig: Figure, path: str | Path) -> Path:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)  # attaches itself to fig; no pyplot figure manager keeps it alive
    fig.savefig(out, dpi=DPI, format="png")
    fig.clear()
    return out


def _as_floats(values: Sequence[float | None]) -> np.ndarray:
    """None becomes NaN so callers can treat missing and non-finite alike."""
    return np.array([math.nan if v is None else float(v) for v in values], dtype=float)


def _count(ax: Axes, text: str) -> None:
    """A legend line with no marker: counts of what could not be drawn sit beside what was."""
    ax.plot([], [], " ", label=text)


def _no_data(ax: Axes) -> None:
    ax.text(0.5, 0.5, "no data", transform=ax.transAxes, ha="center", va="center", fontsize=11, color="0.5")


def density_histogram(
    frequencies: Sequence[float | None], path: str | Path, *, title: str = "Feature density"
) -> Path:
    """Histogram of log10 firing frequency over the features that fired; the rest are counted in the legend."""
    freq = _as_floats(frequencies)
    never = int(np.sum((freq == 0) | np.array([v is None for v in frequencies], dtype=bool)))
    fired = freq[np.isfinite(freq) & (freq > 0)]
    dropped = len(freq) - never - len(fired)  # NaN, inf or negative: not a frequency at all
    with _style():
        fig = Figure(figsize=(6, 4), layout="constrained")
        ax = fig.add_subplot()
        if len(fired):
            ax.hist(np.log10(fired), bins=50, color="#3b6ea8", label=f"{len(fired)} fired")
        else:
            ax.set(xlim=(-6, 0.5), ylim=(0, 1))  # an empty axis still shows where rare and dense would sit
            _no_data(ax)
        ax.axvline(math.log10(DENSE_THRESHOLD), color="#c0392b", linestyle="--", label="10 % (dense)")
        _count(ax, f"{never} never fired")
        if dropped:
            _count(ax, f"{dropped} non-finite dropped")
        ax.legend(loc="upper left", frameon=False)
        ax.set_xlabel("log10 firing frequency (fraction of tokens)")
        ax.set_ylabel("features")
        ax.set_title(title)
        return _save(fig, path)


_PANELS = (  # metric key, y label, scale to show it in
    ("train/loss", "loss", 1.0),
    ("train/fvu", "FVU (fraction of variance unexplained)", 1.0),
    ("train/l0", "L0 (active features per token)", 1.0),
    ("sparsity/dead_frac", "dead features (%)", 100.0),
)
_HELD_OUT = {"train/fvu": "val/fvu", "train/l0": "val/l0"}


def _series(rows: Sequence[Mapping[str, float]], key: str | None, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """(step, value) pairs for one metric, sorted by step; rows missing either or non-finite are skipped."""
    rows_as_floats = (_as_floats([row.get("step"), row.get(key)]) for row in rows)
    pairs = sorted((step, value * scale) for step, value in rows_as_floats if math.isfinite(step + value))
    return np.array([p[0] for p in pairs]), np.array([p[1] for p in pairs])


def training_curves(
    steps: Sequence[Mapping[str, float]],
    path: str | Path,
    *,
    epochs: Sequence[Mapping[str, float]] = (),
    title: str = "Training curves",
) -> Path:
    """Loss, FVU, L0 and dead fraction against step in a 2×2 grid, with held-out FVU and L0 as markers."""
    with _style():
        fig = Figure(figsize=(9, 6.5), layout="constrained")
        for ax, (key, ylabel, scale) in zip(fig.subplots(2, 2).flat, _PANELS):
            x, y = _series(steps, key, scale)
            vx, vy = _series(epochs, _HELD_OUT.get(key), scale)  # no held-out key: row.get(None) finds nothing
            if len(x):
                ax.plot(x, y, color="#3b6ea8", linewidth=1.2, label="train")
            if len(vx):
                ax.plot(vx, vy, "o", color="#c0392b", markersize=5, label="held-out")
            if len(x) and len(vx):
                ax.legend(frameon=False)
            if not len(x) and not len(vx):
                _no_data(ax)
            elif key == "train/loss" and np.all(y > 0):
                ax.set_yscale("log")
            ax.set_xlabel("step")
            ax.set_ylabel(ylabel)
            ax.set_title(key)
        fig.suptitle(title)
        return _save(fig, path)


def frequency_vs_max(
    frequencies: Sequence[float | None],
    max_activations: Sequence[float | None],
    path: str | Path,
    *,
    title: str = "Feature frequency vs max activation",
) -> Path:
    """Scatter of firing frequency (log x) against max activation, one point per feature that fired."""
    if len(frequencies) != len(max_activations):
        raise ValueError(
            f"frequencies has {len(frequencies)} values but max_activations has {len(max_activations)};"
            " give one of each per feature"
        )
    freq, peak = _as_floats(frequencies), _as_floats(max_activations)
    missing = [f is None or m is None for f, m in zip(frequencies, max_activations)]
    never = (freq == 0) | np.array(missing, dtype=bool)
    keep = np.isfinite(freq) & np.isfinite(peak) & (freq > 0)
    dropped = int(np.sum(~keep & ~never))
    with _style():
        fig = Figure(figsize=(6, 4.5), layout="constrained")
        ax = fig.add_subplot()
        # Small, translucent, edge-less markers so 20k+ features read as a density rather than a blob.
        ax.scatter(freq[keep], peak[keep], s=4, alpha=0.35, linewidths=0, color="#3b6ea8", rasterized=True)
        ax.set_xscale("log")
        if not keep.any():
            ax.set_xlim(1e-6, 1)
            _no_data(ax)
        ax.axvline(DENSE_THRESHOLD, color="#c0392b", linestyle="--", linewidth=1, label="10 % (dense)")
        _count(ax, f"{int(keep.sum())} shown, {int(never.sum())} never fired")
        if dropped:
            _count(ax, f"{dropped} non-finite dropped")
        ax.legend(loc="upper left", frameon=False)
        ax.set_xlabel("firing frequency (fraction of tokens, log scale)")
        ax.set_ylabel("max activation (SAE code value)")
        ax.set_title(title)
        return _save(fig, path)


def _pareto(points: list[tuple[float, float, str]]) -> list[tuple[float, float, str]]:
    """Points that no other point beats: walking up in L0, keep each that lowers the best FVU so far."""
    front, best = [], math.inf
    for point in sorted(points, key=lambda p: (p[0], p[1])):
        if point[1] < best:
            front.append(point)
            best = point[1]
    return front


def frontier(
    points: Sequence[tuple[float, float, str]], path: str | Path, *, title: str = "Sparsity–fidelity frontier"
) -> Path:
    """FVU against L0 (log x) for several runs, each labelled, with the Pareto-optimal ones joined."""
    if len(points) == 0:
        raise ValueError("frontier needs at least one (l0, fvu, label) point, got an empty sequence")
    numbers = [(_as_floats([l0, fvu]), str(label)) for l0, fvu, label in points]
    # L0 must be positive for the log axis; anything else cannot be placed and is counted instead.
    good = [(float(xy[0]), float(xy[1]), label) for xy, label in numbers if np.isfinite(xy).all() and xy[0] > 0]
    with _style():
        fig = Figure(figsize=(6, 4.5), layout="constrained")
        ax = fig.add_subplot()
        ax.set_xscale("log")
        if good:
            l0s, fvus, _ = zip(*good)
            ax.scatter(l0s, fvus, s=30, color="#3b6ea8", zorder=3, label="run")
            front_l0s, front_fvus, _ = zip(*_pareto(good))
            ax.plot(front_l0s, front_fvus, color="#c0392b", linewidth=1.2, label="Pareto frontier")
            for l0, fvu, label in good:
                ax.annotate(label, (l0, fvu), xytext=(4, 4), textcoords="offset points", fontsize=9)
            ax.margins(0.12)  # room for the labels of the outermost points
        else:
            ax.set_xlim(1, 1000)
            _no_data(ax)
        if len(good) < len(points):
            _count(ax, f"{len(points) - len(good)} non-finite or L0 ≤ 0 dropped")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="lower left", frameon=False)
        # Plain numbers (20, 30, 100) rather than 2×10¹: L0 values are counts people quote as such.
        ax.xaxis.set_major_formatter(LogFormatter())
        ax.xaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False))
        ax.set_xlabel("L0 (active features per token)")
        ax.set_ylabel("FVU (fraction of variance unexplained)")
        ax.set_title(title)
        return _save(fig, path)
