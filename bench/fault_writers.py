"""Several runs at once, launched from one folder as a script with `&` would, into one database: PostgreSQL (a
fresh schema) and one SQLite file. Each run passes when it completes with its own run folder, a run id of its
own, and exactly its uninterrupted twin's rows: none lost, none twice, no "database is locked".
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import fault_rows
from db_write import postgres_url
from fault_kills import SETTINGS, start
from fault_report import TRACEBACK, Section
from midisc.store import Store

LOCKED = "database is locked"


def together(folder: Path, base: list[str], url: str, writers: int) -> list[tuple[int, str, str]]:
    """Start `writers` runs within milliseconds of each other in `folder`; their (exit status, stdout, stderr)."""
    procs = [start([*base, *SETTINGS, f"storage.url='{url}'"], folder) for _ in range(writers)]
    ended = []
    for proc in procs:
        out, err = proc.communicate(timeout=900)
        ended.append((proc.returncode, out, err))
    return ended


def judge(section: Section, backend: str, url: str, ended: list[tuple[int, str, str]], twin: dict) -> int:
    """Record one trial per writer (its exit, then its run's row, folder and rows); the rows lost over all."""
    runs = {run["id"]: run for run in Store(url).list_runs()}
    folders = Counter(run["output_dir"] for run in runs.values())
    lost = 0
    for i, (code, out, err) in enumerate(ended):
        said = [f"exit {code}: {err.strip()[-300:]}"] if code != 0 or TRACEBACK in err else []
        said += [LOCKED] if LOCKED in err else []
        found = re.search(r"^run (\d+) completed", out, flags=re.M)
        run = runs.get(int(found.group(1))) if found else None
        if run is None:
            said.append("no run of its own in the database")
        else:
            rows = fault_rows.rows(url, run["id"])
            lost += fault_rows.lost_rows(rows, twin)
            said += fault_rows.differences(rows, twin)
            said += [f"status {run['status']}"] if run["status"] != "completed" else []
            said += ["shares its run folder"] if folders[run["output_dir"]] > 1 else []
        section.record(not said, f"{backend} writer {i}: {'; '.join(said)}")
    if len(runs) != len(ended):
        section.record(False, f"{backend}: {len(ended)} runs launched, {len(runs)} recorded")
    return lost


def campaign(work: Path, base: list[str], twin_url: str, twin_id: int, server: str | None, writers: int) -> Section:
    section = Section("concurrent writers", "each completed, own id and folder, the twin's rows")
    twin = fault_rows.rows(twin_url, twin_id)
    lost = 0
    backends = [("sqlite", None)] + ([("postgres", server)] if server else [])
    for backend, target in backends:
        folder = work / f"writers-{backend}"
        folder.mkdir(parents=True)
        if target is None:
            url = f"sqlite:///{folder / 'runs.db'}"
            lost += judge(section, backend, url, together(folder, base, url, writers), twin)
        else:
            with postgres_url(target) as url:
                lost += judge(section, backend, url, together(folder, base, url, writers), twin)
    section.figures = {"writers_per_database": writers, "databases": [b for b, _ in backends], "rows_lost": lost}
    return section
