"""The database goes away while a run trains: are any of its rows lost once `python -m midisc.db sync` has run?

PostgreSQL: the run reaches the server through a TCP proxy on localhost (tests/proxy.py) that is cut at random
moments for a random while, as a restart or a dropped network looks to the client. SQLite: another process
holds the file's write lock, for a while shorter than the busy timeout (writers wait) and, in the full
campaign, longer (writes fail and wait in the run's journal). After the run, `db sync` sends what waited; the
run passes when it is `completed` with every row of its uninterrupted twin.
"""

from __future__ import annotations

import random
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

from sqlalchemy.engine import make_url

import fault_rows
from db_write import postgres_url
from fault_kills import REPO, SETTINGS, start
from fault_report import TRACEBACK, Section
from midisc.run_folder import PENDING_FILENAME
from midisc.store import Store
from midisc.store.engine import SQLITE_BUSY_TIMEOUT_S

sys.path.append(str(REPO / "tests"))  # the proxy the fault tests use, one copy of it
from proxy import Proxy  # noqa: E402


def _when_recorded(url: str, proc: subprocess.Popen, timeout: float = 120) -> bool:
    """Wait until the run's row exists (the cuts are for a run under way, not for its start)."""
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        try:
            if Store(url).list_runs():
                return True
        except Exception:  # the schema is not made yet
            pass
        time.sleep(0.2)
    return False


def _start(base: list[str], url: str, folder: Path) -> subprocess.Popen:
    return start([*base, *SETTINGS, f"storage.url='{url}'"], folder)


def _outcome(folder: Path, url: str, sync_url: str, proc: subprocess.Popen, twin: dict) -> tuple[str | None, int, bool]:
    """(what went wrong or None, rows lost, whether writes had waited in the journal for db sync)."""
    out, err = proc.communicate(timeout=600)
    if proc.returncode != 0 or TRACEBACK in err:
        return f"exit {proc.returncode}: {err.strip()[-600:]}", -1, False
    (run,) = Store(url).list_runs()
    waited = (Path(run["output_dir"]) / PENDING_FILENAME).exists()
    if waited:
        synced = subprocess.run([sys.executable, "-m", "midisc.db", "sync", run["output_dir"], "--db", sync_url],
                                cwd=folder, capture_output=True, text=True, timeout=300)
        if synced.returncode != 0:
            return f"db sync failed: {synced.stderr.strip()[-600:]}", -1, True
    run = Store(url).get_run(run["id"])
    rows = fault_rows.rows(url, run["id"])
    lost = fault_rows.lost_rows(rows, twin)
    said = ([] if run["status"] == "completed" else [f"status {run['status']}"]) + fault_rows.differences(rows, twin)
    return "; ".join(said) or None, lost, waited


def postgres_trial(folder: Path, base: list[str], server: str, twin: dict, rng: random.Random) -> tuple[str | None, int, bool, int]:
    """_outcome's figures and the cuts made, for a run on PostgreSQL behind a proxy cut one to three times."""
    folder.mkdir(parents=True)
    real = make_url(server)
    with postgres_url(server) as direct:
        proxy = Proxy(real.host, real.port or 5432).start()
        through = make_url(direct).set(port=proxy.port).render_as_string(hide_password=False)
        proc = _start(base, through, folder)
        cuts = 0
        try:
            if _when_recorded(direct, proc):
                for _ in range(rng.randint(1, 3)):
                    time.sleep(rng.uniform(0.2, 3.0))
                    if proc.poll() is not None:
                        break
                    proxy.stop()
                    cuts += 1
                    time.sleep(rng.uniform(0.5, 4.0))
                    proxy.start()
            proc.wait(timeout=600)
            proxy.start()
            wrong, lost, waited = _outcome(folder, direct, through, proc, twin)
        finally:
            proxy.stop()
            if proc.poll() is None:
                proc.kill()
    return wrong, lost, waited, cuts


def _hold_lock(path: Path, seconds: float) -> None:
    lock = sqlite3.connect(path, timeout=60, isolation_level=None)
    lock.execute("BEGIN EXCLUSIVE")
    time.sleep(seconds)
    lock.execute("ROLLBACK")
    lock.close()


def sqlite_trial(folder: Path, base: list[str], twin: dict, seconds: float, rng: random.Random) -> tuple[str | None, int, bool]:
    """_outcome's figures for a run whose SQLite file another process locks for `seconds`."""
    folder.mkdir(parents=True)
    path = folder / "runs.db"
    url = f"sqlite:///{path}"
    proc = _start(base, url, folder)
    try:
        if _when_recorded(url, proc):
            time.sleep(rng.uniform(0.2, 2.0))
            holder = threading.Thread(target=_hold_lock, args=(path, seconds))
            holder.start()
            holder.join()
        return _outcome(folder, url, url, proc, twin)
    finally:
        if proc.poll() is None:
            proc.kill()


def campaign(work: Path, base: list[str], twin_url: str, twin_id: int, server: str | None, postgres: int,
             sqlite_locks: tuple[float, ...], seed: int) -> Section:
    rng = random.Random(seed)
    section = Section("database outages", "completed after db sync, 0 rows lost")
    twin = fault_rows.rows(twin_url, twin_id)
    lost_total, cuts_total, journaled = 0, 0, 0
    for i in range(postgres if server else 0):
        wrong, lost, waited, cuts = postgres_trial(work / f"postgres{i}", base, server, twin, rng)
        lost_total, cuts_total, journaled = lost_total + max(lost, 0), cuts_total + cuts, journaled + waited
        section.record(wrong is None, f"postgres trial {i} ({cuts} cut(s)): {wrong}")
    for i, seconds in enumerate(sqlite_locks):
        wrong, lost, waited = sqlite_trial(work / f"sqlite{i}", base, twin, seconds, rng)
        lost_total, journaled = lost_total + max(lost, 0), journaled + waited
        section.record(wrong is None, f"sqlite lock of {seconds:g} s: {wrong}")
    section.figures = {"proxy_cuts": cuts_total, "sqlite_locks_s": list(sqlite_locks), "rows_lost": lost_total, "runs_synced": journaled,
                       "busy_timeout_s": SQLITE_BUSY_TIMEOUT_S, "postgres": bool(server)}
    return section
