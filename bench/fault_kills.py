"""kill -9 at random moments of a run, then `resume=RUN`: does every run end as its uninterrupted twin did?

A twin runs first, through bench/fault_child.py with its stage times kept. Each trial then picks a stage (in
turn, so every stage is hit), one of the twin's entries into it and a moment within that entry's duration,
and starts the same run with that kill planned; a third of the resumes are planned to be killed again. The
run is resumed until it ends (every other trial on PostgreSQL, the others on SQLite), and passes when it is `completed` with bitwise the twin's SAE weights and the
twin's rows in every table, no journal of unsent writes and no checkpoints left in its folder.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from collections import Counter
from contextlib import nullcontext
from pathlib import Path

import fault_rows
from db_write import postgres_url
from fault_child import STAGES
from fault_report import TRACEBACK, Section
from midisc.run_folder import CHECKPOINT_DIR, LOCK_FILENAME, PENDING_FILENAME
from midisc.store import Store

CHILD = Path(__file__).with_name("fault_child.py")
REPO = CHILD.parents[1]
SETTINGS = ["epochs=3", "checkpoint_every=4"]  # a checkpoint every few steps: most kills land between two
MAX_ATTEMPTS = 4  # resumes per trial; a run that needs more is a failure


def start(args: list[str], cwd: Path, **env: str) -> subprocess.Popen:
    """fault_child.py (`python -m midisc.train ARGS`) started in `cwd`, its output kept; `env` adds to the environment."""
    return subprocess.Popen([sys.executable, str(CHILD), *args], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **env})


def child(args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess:
    """The same, waited for."""
    proc = start(args, cwd, **env)
    out, err = proc.communicate(timeout=600)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def twin(folder: Path, base: list[str]) -> tuple[str, int, dict[str, list[float]]]:
    """The uninterrupted run, in `folder`: (its database URL, its run id, {stage: seconds of each entry})."""
    folder.mkdir(parents=True)
    url = f"sqlite:///{folder / 'runs.db'}"
    done = child([*base, *SETTINGS, f"storage.url={url}"], folder, FAULT_TIMES=str(folder / "times.json"))
    if done.returncode != 0:
        raise RuntimeError(f"the twin run failed:\n{done.stderr[-3000:]}")
    (run,) = Store(url).list_runs()
    return url, run["id"], json.loads((folder / "times.json").read_text())


def plan(rng: random.Random, stage: str, times: dict[str, list[float]]) -> str:
    entries = times[stage]
    call = rng.randrange(len(entries))
    return f"{stage}:{call}:{rng.uniform(0, entries[call]):.4f}"


def trial(folder: Path, url: str, base: list[str], times: dict[str, list[float]], stage: str,
          rng: random.Random) -> tuple[list[str], str | None, int | None]:
    """(the stages the kills landed in, what went wrong or None, the run id) of one run killed in `stage`."""
    folder.mkdir(parents=True)
    note = folder / "killed_in"
    landed: list[str] = []
    args = [*base, *SETTINGS, f"storage.url='{url}'"]
    run_id = None
    for attempt in range(MAX_ATTEMPTS + 1):
        if attempt == 0:
            planned = plan(rng, stage, times)
        else:  # a third of the resumes are killed again, in a stage a resume goes through
            planned = plan(rng, rng.choice(STAGES[1:]), times) if attempt == 1 and rng.random() < 1 / 3 else ""
        note.unlink(missing_ok=True)
        done = child(args, folder, FAULT_PLAN=planned, FAULT_NOTE=str(note))
        if TRACEBACK in done.stderr:
            return landed, f"a traceback after {len(landed)} kill(s):\n{done.stderr[-1500:]}", run_id
        if done.returncode == -9:
            landed.append(note.read_text() if note.exists() else "?")
        elif done.returncode != 0:
            return landed, f"exit {done.returncode} after {len(landed)} kill(s): {done.stderr.strip()[-600:]}", run_id
        runs = Store(url).list_runs()
        if not runs:
            return landed, "killed before the run was recorded", None
        run_id = runs[0]["id"]
        if done.returncode == 0:
            return landed, None, run_id
        args = [f"resume={run_id}", f"storage.url='{url}'"]
    return landed, f"not completed after {MAX_ATTEMPTS} resumes", run_id


def check(url: str, run_id: int, twin_url: str, twin_id: int) -> str | None:
    run = Store(url).get_run(run_id)
    if run["status"] != "completed":
        return f"status {run['status']}"
    twin_run = Store(twin_url).get_run(twin_id)
    apart = fault_rows.weight_difference(fault_rows.weights(run["output_dir"]), fault_rows.weights(twin_run["output_dir"]))
    said = fault_rows.differences(fault_rows.rows(url, run_id), fault_rows.rows(twin_url, twin_id))
    if apart:
        said.insert(0, f"weights differ by up to {apart:.3g}")
    left = [name for name in (PENDING_FILENAME, LOCK_FILENAME, CHECKPOINT_DIR) if (Path(run["output_dir"]) / name).exists()]
    if left:
        said.append(f"left in the run folder: {', '.join(left)}")
    return "; ".join(said) or None


def campaign(work: Path, base: list[str], the_twin: tuple[str, int, dict[str, list[float]]], kills: int,
             seed: int, server: str | None = None) -> Section:
    """Trials until `kills` kills have landed; every other one on PostgreSQL (a fresh schema) when `server`."""
    rng = random.Random(seed)
    section = Section("kill -9, then resume", "completed, bitwise the twin's weights and rows")
    twin_url, twin_id, times = the_twin
    stages = [s for s in STAGES if times.get(s)]
    landed: Counter = Counter()
    number = 0
    while sum(landed.values()) < kills:
        stage = stages[number % len(stages)]
        folder = work / f"trial{number:02d}"
        number += 1
        on_postgres = server is not None and number % 2 == 0
        with postgres_url(server) if on_postgres else nullcontext(f"sqlite:///{folder / 'runs.db'}") as url:
            hits, wrong, run_id = trial(folder, url, base, times, stage, rng)
            if not hits:  # the run ended before the planned moment: no kill to count, try another
                continue
            landed.update(hits)
            if wrong is None:
                wrong = check(url, run_id, twin_url, twin_id)
        backend = "postgres" if on_postgres else "sqlite"
        section.record(wrong is None, f"trial {number - 1} ({backend}, killed in {', '.join(hits)}): {wrong}")
    section.figures = {"kills": sum(landed.values()), "kills_by_stage": dict(landed)}
    return section
