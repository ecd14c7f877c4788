"""Sweeps: the jobs of one Hydra multirun, found by a name a person can type, compared side by side.

Each job records its sweep folder (absolute) as `sweep_id` and its overrides. A sweep can be named by
that folder in any form (`multirun/2026-11-24/10-22-33`, an absolute path, or its tail `10-22-33`), or
as `latest`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

LATEST = "latest"


class SweepError(LookupError):
    """No sweep, or more than one, matches the name given; the message lists the sweeps there are."""


def _known(sweeps: Sequence[dict], limit: int = 5) -> str:
    names = ", ".join(s["sweep_id"] for s in sweeps[:limit])
    more = f" (newest {limit} of {len(sweeps)})" if len(sweeps) > limit else ""
    return f"sweeps in the database{more}: {names}" if sweeps else "the database has no sweeps yet"


def resolve(name: str, sweeps: Sequence[dict]) -> str:
    """The sweep_id that `name` means among `sweeps` (newest first, as `Store.sweeps` gives them)."""
    if name == LATEST:
        if not sweeps:
            raise SweepError("no sweep to show: the database has no sweeps yet (python -m midisc.train -m ...)")
        return sweeps[0]["sweep_id"]
    ids = [s["sweep_id"] for s in sweeps]
    absolute = str(Path(name).expanduser().resolve())
    for candidate in (name, absolute):
        if candidate in ids:
            return candidate
    tail = "/" + name.strip("/")
    matches = [sweep for sweep in ids if sweep.endswith(tail)]
    if len(matches) == 1:
        return matches[0]
    if len(matches) > 1:
        raise SweepError(f"sweep {name!r} is ambiguous; it matches {', '.join(matches)}")
    raise SweepError(f"no sweep {name!r}; {_known(sweeps)}")


def varying(overrides: Sequence[Sequence[str] | None]) -> list[list[str]]:
    """Each job's overrides minus those every job shares (paths, the database): what tells the jobs apart."""
    lists = [list(o or []) for o in overrides]
    shared = set.intersection(*(set(o) for o in lists)) if len(lists) > 1 else set()
    return [[o for o in job if o not in shared] for job in lists]


def pareto(points: Sequence[tuple[float, float]]) -> list[bool]:
    """For (l0, fvu) points: True where no other point has both lower-or-equal L0 and FVU, one strictly."""
    def dominated(i: int) -> bool:
        l0, fvu = points[i]
        return any(o_l0 <= l0 and o_fvu <= fvu and (o_l0, o_fvu) != (l0, fvu) for o_l0, o_fvu in points)

    return [not dominated(i) for i in range(len(points))]


def comparison(runs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per run of a sweep, by L0: what varied, the headline metrics, and whether it is on the frontier."""
    labels = varying([r.get("overrides") for r in runs])
    rows = [{"id": r["id"], "status": r["status"], "job": " ".join(label) or "-", "width": r["d_sae"],
             "l0": r["l0"], "fvu": r["fvu"], "mse": r["mse"], "dead_frac": r["dead_frac"],
             # The spliced-in scores of the end-of-training evaluation, where it ran (evaluate.contexts > 0).
             "ce_loss_score": (r.get("metrics") or {}).get("ce_loss_score"),
             "kl_div_score": (r.get("metrics") or {}).get("kl_div_score"),
             "tokens": r["n_tokens"], "output_dir": r["output_dir"]}
            for r, label in zip(runs, labels)]
    scored = [i for i, row in enumerate(rows) if row["l0"] is not None and row["fvu"] is not None]
    front = pareto([(rows[i]["l0"], rows[i]["fvu"]) for i in scored])
    for row in rows:
        row["frontier"] = False
    for i, on in zip(scored, front):
        rows[i]["frontier"] = on
    return sorted(rows, key=lambda row: (row["l0"] is None, row["l0"] or 0.0, row["id"]))
