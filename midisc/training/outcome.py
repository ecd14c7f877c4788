"""What a training run gives back, and the closing lines that say it: where everything is, the held-out
figures, what dead counts, and the command that explores the run."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from midisc.store import db_argument, redact_url


@dataclass
class Result:
    run_id: int | None
    output_dir: Path
    sae_dir: Path
    metrics: dict[str, float]
    seconds: float
    sae: torch.nn.Module
    frequency_bins: dict[str, int]  # features per firing-frequency bin, over the held-out tokens
    dead_window: int = 0            # training tokens without firing after which a feature counts as dead
    texts: int = 0                  # training texts
    duplicates: int = 0             # texts dropped before the split, their content repeating an earlier one


def summary(result: Result, db_url: str | None) -> str:
    m = result.metrics
    minutes, seconds = divmod(int(result.seconds), 60)
    head = f"run {result.run_id} completed" if result.run_id is not None else "run completed (storage=none)"
    lines = [f"{head} in {minutes}m{seconds:02d}s",
             f"  run folder: {result.output_dir}",
             f"  SAE:        {result.sae_dir}",
             f"  database:   {redact_url(db_url) if db_url else 'none'}",
             f"  held-out:   MSE {m['mse']:.4g}  FVU {m['fvu']:.3f}  L0 {m['l0']:.1f}",
             f"  dead:       {100 * m['dead_frac']:.2f}% of features not fired in the last {result.dead_window:,} "
             f"training tokens ({int(m['alive_features']):,} alive); {result.frequency_bins['never']:,} never fired "
             f"on the {int(m['analysed_tokens']):,} held-out tokens",
             f"  trained on: {int(m['n_tokens']):,} activation vectors per epoch, from {result.texts:,} texts "
             f"({result.duplicates} duplicate texts dropped before the split)",
             *([f"  spliced in: CE loss recovered {m['ce_loss_score']:.3f}  KL score {m['kl_div_score']:.3f} "
                "(SAEBench core, evaluation_core.json)"] if "ce_loss_score" in m and "kl_div_score" in m else []),
             "  features by firing frequency (held-out tokens): "
             + "  ".join(f"{name} {count}" for name, count in result.frequency_bins.items())]
    if result.run_id is not None:
        lines.append(f"  explore:    python -m midisc.explore top {result.run_id}{db_argument(db_url)}")
    return "\n".join(lines)
