"""A database password, given in the URL, in a `.env` file and to a sweep: does it reach any file the run writes,
any row, or anything printed?

The local PostgreSQL trusts every login, so a made-up password travels without breaking it. Each case trains
through `python -m midisc.train` into a fresh schema, then reads the run back with `explore list`; every file
under the working folder (but the user's own `.env`), every column of every row, and everything the commands
printed are searched for the password.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from sqlalchemy import MetaData, select
from sqlalchemy.engine import make_url

from db_write import postgres_url
from fault_kills import CHILD, REPO
from fault_report import Section
from midisc.store import Store

SECRET = "Fa-ult-S3cret"


def _run(args: list[str], cwd: Path, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **env})


def _rows_holding(url: str) -> list[str]:
    with Store(url) as store:
        tables = MetaData()
        tables.reflect(store._engine)
        with store._engine.connect() as connection:
            return [name for name, table in tables.tables.items()
                    if any(SECRET in str(tuple(row)) for row in connection.execute(select(table)))]


def _files_holding(folder: Path) -> list[str]:
    return [str(p.relative_to(folder)) for p in folder.rglob("*")
            if p.is_file() and p.name != ".env" and SECRET.encode() in p.read_bytes()]


def case(folder: Path, base: list[str], server: str, how: str) -> str | None:
    """Train (and read back) with the password given `how`; what holds it, or None."""
    folder.mkdir(parents=True)
    with postgres_url(server) as direct:
        # postgresql://, as hosted databases spell it: no driver named.
        secret_url = make_url(direct).set(drivername="postgresql", password=SECRET).render_as_string(hide_password=False)
        env: dict = {}
        if how == "url":
            train = [*base, f"storage.url='{secret_url}'"]
        elif how == ".env":
            (folder / ".env").write_text(f"MIDISC_DB_URL={secret_url}\n")
            train = list(base)  # storage=sqlite, the default, trains into $MIDISC_DB_URL
        else:  # a sweep of two jobs: Hydra writes each job's overrides, the URL among them
            train = ["-m", *base, "seed=1,2", f"storage.url='{secret_url}'"]
        trained = _run([sys.executable, str(CHILD), *train, "epochs=1"], folder, env)
        printed = trained.stdout + trained.stderr
        if trained.returncode != 0:
            return f"the run failed: {trained.stderr.strip()[-400:]}"
        db = [] if how == ".env" else ["--db", secret_url]
        listed = _run([sys.executable, "-m", "midisc.explore", "list", *db], folder, env)
        printed += listed.stdout + listed.stderr
        said = [] if Store(direct).list_runs() else ["nowhere: no run reached the database, nothing was tested"]
        if listed.returncode != 0:
            said.append(f"explore list failed: {listed.stderr.strip()[-300:]}")
        if SECRET in printed:
            said.append("printed")
        said += [f"file {name}" for name in _files_holding(folder)]
        said += [f"table {name}" for name in _rows_holding(direct)]
        return ", ".join(said) or None


def campaign(work: Path, base: list[str], server: str | None, cases: tuple[str, ...]) -> Section:
    section = Section("secrets", "the password in no file, row or output")
    for how in cases if server else ():
        wrong = case(work / f"secret-{how.strip('.')}", base, server, how)
        section.record(wrong is None, f"password in the {how}: found in {wrong}")
    section.figures = {"cases": list(cases) if server else []}
    return section
