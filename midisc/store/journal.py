"""Writes that survive a database outage: while the server is away they wait in a local file, in order.

Training must not stop because PostgreSQL restarted or the network dropped: a run's records are a few
writes per epoch and a few at the end. `Journal` wraps a `Store`; a write that fails because the database
cannot be reached is appended to `pending_db_writes.jsonl` in the run folder, and every later write first
replays that file. What is still there when the run ends is written by `python -m midisc.db sync`.

The file's first line says whose writes these are: the database (URL without password, SQLite path
absolute), the run's id and UUID, and the run's own record. A run id alone is no identity: run 1 of a
PostgreSQL server and run 1 of a SQLite file in the working folder are different runs, and a journal
replayed into the wrong one overwrote it. So a replay first finds the journal's run by its UUID and
refuses (one line, file kept) a database that does not have it; `recreate=True` records the run again
from the journal's copy, for a database that was emptied or replaced while the run trained.

Replaying twice is harmless: every journaled write replaces what it writes (epoch rows by epoch, features
and examples per run, the saved SAE by path), so a write that reached the server just before the
connection broke can safely be sent again. A journal is removed only once every write in it went through.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import Any

from sqlalchemy.engine import make_url
from sqlalchemy.exc import InterfaceError, OperationalError

from midisc.store.engine import StoreError, driver_message
from midisc.store.records import Store, UnknownRunError

PENDING_FILENAME = "pending_db_writes.jsonl"
# The errors of a database that cannot be reached (refused, dropped, restarting, locked), as opposed to a
# write the database rejects, which is a bug and must stay loud.
OUTAGE_ERRORS = (OperationalError, InterfaceError)
# Every one takes the run id as its first argument, which a replay into a recreated run rewrites.
WRITES = frozenset({"reopen_run", "update_run", "update_metrics", "finish_run", "add_epoch_metrics", "add_features",
                    "add_feature_examples", "add_feature_profiles", "add_sae_model", "add_evaluation"})
# What `recreate` needs to record the run again: Store.start_run's arguments.
RUN_FIELDS = ("model", "hook", "layer", "architecture", "config", "output_dir", "d_in", "d_sae", "sweep_id",
              "overrides")


class JournalError(StoreError):
    """A journal that cannot be sent where it was asked to go; nothing was sent and the file is kept."""


@dataclass(frozen=True)
class Header:
    """The first line of a journal: whose writes follow."""

    database: str     # store.Store.database: URL without password, SQLite path absolute
    run_id: int       # the run's id in that database
    run_uuid: str     # the run's identity in any database
    run: dict         # RUN_FIELDS and started_at (ISO 8601), to record the run again

    @property
    def password_hidden(self) -> bool:
        """Whether the database's URL had a password, which the journal does not keep (it shows as ***)."""
        return make_url(self.database).password is not None

    @classmethod
    def of_run(cls, store: Store, run_id: int) -> Header:
        row = store.get_run(run_id)
        record = {name: row[name] for name in RUN_FIELDS} | {"started_at": row["started_at"].isoformat()}
        return cls(store.database, run_id, row["run_uuid"], record)


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


def read(path: Path) -> tuple[Header | None, list[str]]:
    """A journal's header (None in one written before journals had one) and its write lines, in order."""
    lines = [line for line in Path(path).read_text().splitlines() if line.strip()]
    if lines and "journal" in (first := json.loads(lines[0])):
        return Header(**first["journal"]), lines[1:]
    return None, lines


def pending(path: Path) -> int:
    """Writes waiting in a journal file."""
    try:
        return len(read(path)[1])
    except FileNotFoundError:
        return 0


def run_in(store: Store, header: Header, path: Path, *, recreate: bool = False) -> int:
    """The id that the journal's run has in `store`; JournalError (one line) if `store` lacks that run.

    With `recreate`, a run missing from `store` is recorded again from the header, status running.
    """
    found = store.run_with_uuid(header.run_uuid)
    if found is not None:
        return found
    if recreate:
        started = datetime.fromisoformat(header.run["started_at"])
        return store.start_run(**{name: header.run[name] for name in RUN_FIELDS}, run_uuid=header.run_uuid,
                               started_at=started)
    try:
        other = store.get_run(header.run_id)
    except UnknownRunError:
        other = None
    what = (f"run {header.run_id} of {store.database} is another run ({other['output_dir']})" if other
            else f"{store.database} has no run {header.run_id}")
    raise JournalError(f"{path} holds writes of run {header.run_id} ({header.run_uuid}) of {header.database}, and "
                       f"{what}: nothing sent, journal kept. If that database was emptied or replaced, record the run "
                       f"again from the journal with: python -m midisc.db sync {path} --recreate")


def replay(store: Store, path: Path, *, recreate: bool = False) -> tuple[int, int]:
    """Send a journal file's writes to `store` in order: (written, left). The file is removed once empty.

    Refuses (JournalError, nothing sent) a store that does not hold the journal's run (see `run_in`).
    Stops at the first outage error and keeps the rest, so order is never broken. A journal without a
    header comes from an older midisc; the caller has checked where it goes.
    """
    path = Path(path)
    if not path.is_file():
        return 0, 0
    header, lines = read(path)
    try:
        run_id = run_in(store, header, path, recreate=recreate) if header else None
    except OUTAGE_ERRORS:
        return 0, len(lines)
    done = 0
    for line in lines:
        entry = json.loads(line)
        args = entry["args"]
        if run_id is not None:
            args = [run_id, *args[1:]]
        try:
            getattr(store, entry["method"])(*args, **entry["kwargs"])
        except OUTAGE_ERRORS:
            break
        done += 1
    left = lines[done:]
    if left:
        kept = ([json.dumps({"journal": asdict(header)})] if header else []) + left
        tmp = path.with_name(path.name + ".partial")
        tmp.write_text("".join(line + "\n" for line in kept))
        tmp.replace(path)
    else:
        path.unlink()
    return done, len(left)


class Journal:
    """A `Store` whose writes for run `run_id` wait in `path` while the database is unreachable.

    Reads go straight through. The run's record is read once here, while the database is reachable, for
    the journal's header.
    """

    def __init__(self, store: Store, path: Path, run_id: int, warn: Callable[[str], None] = _warn) -> None:
        self.store = store
        self.path = Path(path)
        self.warn = warn
        self.header = Header.of_run(store, run_id)
        self._down = False
        if self.path.is_file():  # left by an earlier attempt of this run (resume): send it first
            self.flush()

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self.store, name)
        return partial(self._write, name) if name in WRITES else attribute

    @property
    def pending(self) -> int:
        return pending(self.path)

    def flush(self) -> bool:
        """Send the waiting writes; True when none are left.

        A database that no longer holds the run (its file deleted, say) is like one that is away: training
        goes on and keeps writing here, and `db sync --recreate` records the run again afterwards.
        """
        try:
            written, left = replay(self.store, self.path)
        except JournalError as error:
            if not self._down:
                self.warn(str(error))
            self._down = True
            return False
        if written and not left and self._down:
            self.warn(f"the database {self.store.url} is back: {written} kept write(s) sent")
            self._down = False
        return left == 0

    def _write(self, method: str, *args: Any, **kwargs: Any) -> Any:
        if self.path.is_file() and not self.flush():
            self._keep(method, args, kwargs)
            return None
        try:
            return getattr(self.store, method)(*args, **kwargs)
        except OUTAGE_ERRORS as error:
            if not self._down:
                self.warn(f"the database {self.store.url} cannot be reached ({driver_message(error)}); training "
                          f"goes on and its records wait in {self.path} until it is back")
            self._down = True
            self._keep(method, args, kwargs)
            return None

    def _keep(self, method: str, args: tuple, kwargs: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        new = not self.path.is_file()
        with open(self.path, "a") as f:
            if new:
                f.write(json.dumps({"journal": asdict(self.header)}) + "\n")
            f.write(json.dumps({"method": method, "args": list(args), "kwargs": kwargs}) + "\n")
            f.flush()
