"""A run in plain words: its settings at a glance and what its numbers say about its quality.

Pure functions over database rows, so `explore analyze` needs neither the model nor the SAE.
"""

from __future__ import annotations

from typing import Any

# Thresholds for the notes: the usual rules of thumb in SAE papers and dashboards.
DEAD_WARN = 0.10      # more dead features than this is a training problem
DENSE_FREQUENCY = 0.10  # a feature firing on more than 10 % of tokens is "dense"
DENSE_WARN = 0.01     # more dense features than this share of the width deserves a look
FVU_POOR, FVU_GOOD = 0.5, 0.2


def run_overview(run: dict[str, Any]) -> dict[str, Any]:
    """The settings a researcher checks first, from a training_runs row."""
    config = run.get("config") or {}
    sae, optimizer = config.get("sae", {}), config.get("optimizer", {})
    ended = run.get("ended_at")
    overview = {
        "id": run["id"], "status": run["status"], "started (UTC)": run["started_at"].isoformat(timespec="seconds"),
        "duration": _duration((ended - run["started_at"]).total_seconds()) if ended else "-",
        "model": run["model"], "hook": run["hook"], "layer": run["layer"], "architecture": run["architecture"],
        "d_in": run["d_in"], "width": run["d_sae"], "expansion": sae.get("expansion"),
    }
    for key in ("k", "l1_coef"):
        if key in sae:
            overview[key] = sae[key]
    overview.update({"lr": optimizer.get("lr"), "epochs": config.get("epochs"), "batch_size": config.get("batch_size"),
                     "context_size": config.get("context_size"), "tokens per epoch": run["n_tokens"],
                     "output_dir": run["output_dir"]})
    if run.get("error"):
        overview["error"] = run["error"].strip().splitlines()[-1]
    return overview


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes}m{secs:02d}s"


def quality_notes(run: dict[str, Any], features: list[dict[str, Any]], db: str = "") -> list[str]:
    """What the numbers mean, each note one sentence a researcher can act on; `db` ends a command it suggests
    (the ` --db …` that reads this run's database)."""
    notes = []
    if run["status"] != "completed":
        reason = (run.get("error") or "").strip().splitlines()
        notes.append(f"the run is {run['status']}" + (f": {reason[-1]}" if reason else "") +
                     "; its metrics, if any, are partial")
    fvu, dead, l0 = run.get("fvu"), run.get("dead_frac"), run.get("l0")
    if fvu is not None:
        if fvu > FVU_POOR:
            notes.append(f"poor reconstruction: FVU {fvu:.3f} means the SAE leaves over half the variance unexplained")
        elif fvu < FVU_GOOD:
            notes.append(f"good reconstruction: FVU {fvu:.3f} (explains {100 * (1 - fvu):.0f}% of the variance)")
        else:
            notes.append(f"moderate reconstruction: FVU {fvu:.3f} (explains {100 * (1 - fvu):.0f}% of the variance)")
    if dead is not None:
        window = (run.get("config") or {}).get("dead_window")
        meaning = f"not fired in the last {window:,} training tokens" if window else "not fired in training's last window"
        if dead > DEAD_WARN:
            notes.append(f"{100 * dead:.1f}% of features are dead ({meaning}): try a lower learning rate, a smaller "
                         "width, or an auxiliary loss for dead features")
        elif dead == 0:
            notes.append(f"no dead features (none {meaning})")
        else:
            notes.append(f"{100 * dead:.2f}% of features are dead ({meaning}), within the usual range")
    d_in = run.get("d_in")
    if l0 is not None and d_in and run["architecture"] in ("standard", "gated") and l0 > d_in / 4:
        notes.append(f"L0 {l0:.0f} is high for a sparse code of a {d_in}-dimensional input: raise sae.l1_coef")
    if features:
        n = len(features)
        dense = sum(1 for f in features if (f["frequency"] or 0) > DENSE_FREQUENCY)
        if dense > DENSE_WARN * n:
            notes.append(f"{dense} features ({100 * dense / n:.1f}%) fire on more than 10% of tokens: dense features "
                         "often absorb the mean or a position signal rather than a concept")
        elif dense:
            notes.append(f"{dense} dense feature(s) fire on more than 10% of tokens")
        silent = sum(1 for f in features if not f["frequency"] and not f["is_dead"])
        if silent:
            notes.append(f"{silent} features fired in training but never on the analysed tokens: rare features; "
                         f"analyse more tokens with python -m midisc.analyze {run['id']} --tokens 200000{db}")
    return notes
