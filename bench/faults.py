"""Reliability as figures: a bounded fault campaign on the tiny model that prints one table and a JSON line.

Why: midisc's fault handling was tested one case at a time; this tries many, at random moments, and counts.
- kill -9 in every stage of a run (harvest, training, checkpoint save, analysis, export, database writes), then
  `resume=RUN` until it ends: completed with bitwise the weights and the rows of an uninterrupted twin
  (fault_kills.py);
- the database away: PostgreSQL behind a TCP proxy cut at random moments, SQLite locked by another process;
  0 rows lost after `python -m midisc.db sync` (fault_outages.py);
- concurrent writers: runs launched together from one folder into one PostgreSQL schema and one SQLite file;
  none lost, none twice, no "database is locked", a folder each (fault_writers.py);
- bad input: every config key and every kind of text file, property-based with Hypothesis; one line naming the
  key and what is valid, or cleaned with a warning; no traceback, no run left `running` (fault_fuzz.py);
- secrets: a password in the URL, in `.env` and in a sweep, in no file, row or output (fault_secrets.py).
Targets: every trial passes: 100 % of kills resumed exactly, 0 rows lost, 0 tracebacks.

PostgreSQL is `$MIDISC_TEST_POSTGRES_URL`, else postgresql+psycopg2://postgres@127.0.0.1:5432/test, each part in
a fresh schema dropped afterwards; when it is unreachable, its parts are skipped with a note. Every run is a
real `python -m midisc.train` process (bench/fault_child.py marks its stages). The full campaign takes about
16 minutes on 2 CPU cores; `--quick` (3 kills, one outage, 4 writers, a short fuzz) about 2.5.

    python bench/faults.py [--quick] [--kills N] [--writers N] [--seed N]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import fault_fuzz
import fault_kills
import fault_outages
import fault_secrets
import fault_writers
import tiny
from db_write import DEFAULT_PG, reachable
from fault_report import Section
from output import result, table

TEXTS = 60  # documents of the tiny corpus: 3 epochs of about 70 steps, a run of seconds


def summary(section: Section) -> str:
    shown = {k: v for k, v in section.figures.items() if not isinstance(v, (list, dict)) or k == "kills_by_stage"}
    return "  ".join(f"{k} {v}" for k, v in shown.items())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 kills, one outage, 4 writers, a short fuzz (for CI)")
    parser.add_argument("--kills", type=int, help="kill -9s to land (default 20; 3 with --quick)")
    parser.add_argument("--writers", type=int, help="runs at once per database (default 8; 2 with --quick)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    kills = args.kills or (3 if args.quick else 20)
    writers = args.writers or (2 if args.quick else 8)
    server = os.environ.get("MIDISC_TEST_POSTGRES_URL", DEFAULT_PG)
    why_not = reachable(server)
    if why_not:
        print(f"note: PostgreSQL at {server} is unreachable ({why_not}); its parts are skipped", file=sys.stderr)
        server = None
    started = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        base = tiny.run_overrides(work, TEXTS)
        twin = fault_kills.twin(work / "twin", base)  # the uninterrupted run every faulted one is set beside
        twin_url, twin_id, _ = twin
        kill_section = fault_kills.campaign(work / "kills", base, twin, kills, args.seed, server)
        locks = (3.0,) if args.quick and not server else () if args.quick else (5.0, 35.0)
        sections = [
            kill_section,
            fault_outages.campaign(work / "outages", base, twin_url, twin_id, server, 1 if args.quick else 4, locks,
                                   args.seed),
            fault_writers.campaign(work / "writers", base, twin_url, twin_id, server, writers),
            *fault_fuzz.campaign(work / "fuzz", base, args.quick, args.seed),
            fault_secrets.campaign(work / "secrets", base, server,
                                   ("url", ".env") if args.quick else ("url", ".env", "sweep")),
        ]
    seconds = time.time() - started
    table(f"fault campaign{' (--quick)' if args.quick else ''}: {seconds / 60:.1f} min",
          ["fault", "trials", "passed", "target", "figures", "met"],
          [[s.name, s.trials, s.passed, s.target, summary(s), s.met] for s in sections])
    for s in sections:
        for failure in s.failures:
            print(f"FAIL {s.name}: {failure}")
    failures = [f for s in sections for f in s.failures]
    result({"rows": [{"fault": s.name, **s.as_json()} for s in sections],
            "kills_resumed_exactly": f"{kill_section.passed}/{kill_section.trials}",
            "rows_lost": sum(s.figures.get("rows_lost", 0) for s in sections),
            "tracebacks": sum("traceback" in f.lower() for f in failures),
            "postgres": server is not None, "seconds": seconds,
            "targets_met": all(s.met for s in sections if s.trials) and not failures})


if __name__ == "__main__":
    main()
