"""What the pages show, shaped from store rows: pure functions, no requests, no database.

Each takes the plain dicts `Store` returns and gives the plain values a template or a JSON answer needs,
so what a page says can be tested without a server.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from midisc.analysis.features import frequency_bins, log_density_histogram
from midisc.analysis.sweeps import pareto, varying

# The epoch metrics a run's curves draw, with the label a reader knows them by.
CURVES = {"train/loss": "loss", "train/fvu": "FVU (train)", "val/fvu": "FVU (held-out)", "train/l0": "L0",
          "val/l0": "L0 (held-out)", "sparsity/dead_frac": "dead fraction"}
# What a live row shows of a running run's newest epoch.
LIVE = {"loss": "train/loss", "fvu": "val/fvu", "l0": "val/l0", "dead_frac": "sparsity/dead_frac"}
QUANTILE_BANDS = 4  # SAEDashboard-style groups of the sampled examples, by activation over the feature's max


def short_hook(hook: str) -> str:
    return hook.replace("model.layers.", "L").replace("model.", "")


def curves(epochs: Sequence[dict]) -> dict[str, Any]:
    """{"steps": [...], "series": {label: [value or None per epoch]}} of the metrics any epoch has."""
    names = [name for name in CURVES if any(name in e["metrics"] for e in epochs)]
    return {"steps": [e["step"] for e in epochs],
            "series": {CURVES[name]: [e["metrics"].get(name) for e in epochs] for name in names}}


def live(run: dict, newest: dict | None) -> dict[str, Any]:
    """A run's progress as a live row shows it: its status and its newest epoch's step and metrics."""
    metrics = newest["metrics"] if newest else {}
    return {"id": run["id"], "status": run["status"], "epoch": newest["epoch"] if newest else None,
            "step": newest["step"] if newest else None,
            **{key: metrics.get(name, metrics.get(name.replace("val/", "train/"))) for key, name in LIVE.items()}}


def frequency_histogram(frequencies: Sequence[float | None]) -> dict[str, Any]:
    """Features by log10 firing frequency (the bars), the never-fired count and the named bins."""
    frequency = [f or 0.0 for f in frequencies]
    edges, counts, never = log_density_histogram(frequency) if frequency else ([], [], 0)
    return {"edges": edges, "counts": counts, "never": never, "bins": frequency_bins(frequency) if frequency else {}}


def core_figures(evaluations: Sequence[dict]) -> dict[str, dict[str, float]] | None:
    """SAEBench core's figures of the newest core evaluation, {group: {name: value}}, numbers only."""
    core = [e for e in evaluations if e["eval_type"] == "core"]
    if not core:
        return None
    metrics = core[-1]["result"].get("eval_result_metrics", {})
    return {group: {name: value for name, value in values.items()
                    if isinstance(value, (int, float)) and not isinstance(value, bool)}
            for group, values in metrics.items() if isinstance(values, dict)}


def colour_tokens(tokens: Sequence[str], values: Sequence[float], peak: float | None) -> list[dict[str, Any]]:
    """Each token with its activation and its shade (0..1 of `peak`, the feature's max), the max token marked."""
    top = max(values, default=0.0)
    scale = peak if peak and peak > 0 else (top or 1.0)
    marked = values.index(top) if values and top > 0 else -1
    return [{"text": text, "value": value, "shade": round(min(1.0, max(0.0, value / scale)), 3), "max": i == marked}
            for i, (text, value) in enumerate(zip(tokens, values))]


def example_view(example: dict, peak: float | None) -> dict[str, Any]:
    return {"activation": example["activation"], "context": example["context_index"],
            "tokens": colour_tokens(example["tokens"], example["values"], peak)}


def quantile_groups(examples: Sequence[dict], peak: float | None, bands: int = QUANTILE_BANDS) -> list[dict]:
    """The sampled examples grouped by activation into equal bands of the feature's max, strongest band first,
    as SAEDashboard groups them ("interval 0.75-1.00 of max, 3 examples")."""
    if not peak or peak <= 0 or not examples:
        return []
    groups = []
    for band in reversed(range(bands)):
        low, high = band / bands, (band + 1) / bands
        chosen = [e for e in examples if low <= e["activation"] / peak < high or (band == bands - 1 and
                                                                                    e["activation"] >= peak)]
        if chosen:
            groups.append({"low": low, "high": high, "examples": [example_view(e, peak) for e in chosen]})
    return groups


def bars(binned: dict | None) -> dict[str, Any] | None:
    """A stored {"low", "high", "heights"} as bar centres and heights, for a chart."""
    if not binned or not binned.get("heights"):
        return None
    n = len(binned["heights"])
    width = (binned["high"] - binned["low"]) / n
    return {"centres": [round(binned["low"] + (i + 0.5) * width, 5) for i in range(n)], "heights": binned["heights"]}


def neighbours(index: int, width: int) -> dict[str, int | None]:
    return {"previous": index - 1 if index > 0 else None, "next": index + 1 if index + 1 < width else None}


def frontier(runs: Sequence[dict]) -> list[dict[str, Any]]:
    """A sweep's jobs as (L0, FVU) points with what sets each apart, the Pareto-optimal ones marked."""
    done = [r for r in runs if r.get("l0") is not None and r.get("fvu") is not None
            and math.isfinite(r["l0"]) and math.isfinite(r["fvu"])]
    labels = varying([r.get("overrides") for r in done])
    best = pareto([(r["l0"], r["fvu"]) for r in done])
    return [{"id": r["id"], "l0": r["l0"], "fvu": r["fvu"], "overrides": " ".join(label) or f"run {r['id']}",
             "pareto": optimal} for r, label, optimal in zip(done, labels, best)]


def run_title(run: dict) -> str:
    width = f"{run['d_sae']:,} features" if run.get("d_sae") else "width not yet known"
    return f"run {run['id']}: {run['architecture']} SAE, {width}, {run['model']} {short_hook(run['hook'])}"
