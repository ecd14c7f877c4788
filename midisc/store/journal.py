"""Writes that survive a database outage: while the server is away they wait in a local file, in order.

Training must not stop because PostgreSQL restarted or the network dropped: a run's records are a few
writes per epoch and a few at the end. `Journal` wraps a `Store`; a write that fails because the database
cannot be reached is appended to `pending_db_writes.jsonl` in the run folder, and every later write first
replays that file. What is still there when the run ends is written by `python -m midisc.db sync`.

Replaying twice is harmless: every journaled write replaces what it writes (epoch rows by epoch, features
and examples per run, the saved SAE by path), so a write that reached the server just before the
connection broke can safely be sent again.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from sqlalchemy.exc import InterfaceError, OperationalError

from midisc.store.engine import driver_message
from midisc.store.records import Store

PENDING_FILENAME = "pending_db_writes.jsonl"
# The errors of a database that cannot be reached (refused, dropped, restarting, locked), as opposed to a
# write the database rejects, which is a bug and must stay loud.
OUTAGE_ERRORS = (OperationalError, InterfaceError)
WRITES = frozenset({"reopen_run", "update_run", "finish_run", "add_epoch_metrics", "add_features",
                    "add_feature_examples", "add_sae_model", "add_evaluation"})


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


def pending(path: Path) -> int:
    """Writes waiting in a journal file."""
    try:
        with open(path) as f:
            return sum(1 for line in f if line.strip())
    except FileNotFoundError:
        return 0


def replay(store: Store, path: Path) -> tuple[int, int]:
    """Send a journal file's writes to `store` in order: (written, left). The file is removed once empty.

    Stops at the first outage error and keeps the rest, so order is never broken.
    """
    path = Path(path)
    if not path.is_file():
        return 0, 0
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    done = 0
    for line in lines:
        entry = json.loads(line)
        try:
            getattr(store, entry["method"])(*entry["args"], **entry["kwargs"])
        except OUTAGE_ERRORS:
            break
        done += 1
    left = lines[done:]
    if left:
        tmp = path.with_name(path.name + ".partial")
        tmp.write_text("".join(line + "\n" for line in left))
        tmp.replace(path)
    else:
        path.unlink()
    return done, len(left)


class Journal:
    """A `Store` whose writes wait in `path` while the database is unreachable; reads go straight through."""

    def __init__(self, store: Store, path: Path, warn: Callable[[str], None] = _warn) -> None:
        self.store = store
        self.path = Path(path)
        self.warn = warn
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
        """Send the waiting writes; True when none are left."""
        written, left = replay(self.store, self.path)
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
        with open(self.path, "a") as f:
            f.write(json.dumps({"method": method, "args": list(args), "kwargs": kwargs}) + "\n")
            f.flush()
