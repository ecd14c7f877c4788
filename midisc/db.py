"""`python -m midisc.db`: create, upgrade and check the midisc tables of a database.

    python -m midisc.db init [--db URL]      create the tables in an empty database
    python -m midisc.db upgrade [--db URL]   apply the schema revisions the database lacks, keeping its rows
    python -m midisc.db check [--db URL]     the database's revision, the newest one, and whether the tables
                                             match the models; exit status 0 when all is current, else 1
    python -m midisc.db sync [PATH ...]      send what runs kept while the database was unreachable
                                             (pending_db_writes.jsonl in their folders) to the database
                                             each journal names, and only into its own run

Every command takes --json (for scripts) and --db URL (default: $MIDISC_DB_URL, else
sqlite:///outputs/midisc.db; `--db postgres` builds the URL from $POSTGRES_*, as storage=postgres does). Opening a
database from training or any other tool upgrades it as well; these commands do it on purpose, or ahead
of a sweep whose jobs would otherwise all arrive at once.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from rich.console import Console
from sqlalchemy import Engine

from midisc.cli import Command, UsageError, add_db_argument, make_console, parse_subcommands, print_json, run_tool
from midisc.store import Store
from midisc.store.engine import (
    StoreError,
    connect,
    database_identity,
    postgres_url_from_env,
    redact_url,
    resolve_db_url,
)
from midisc.store.journal import PENDING_FILENAME, Header, JournalError, read, replay
from midisc.store.schema import (
    UNVERSIONED,
    current_revision,
    describe_revision,
    head_revision,
    known_revisions,
    refuse_unknown,
    schema_differences,
    upgrade,
)


@contextmanager
def opened(args: argparse.Namespace) -> Iterator[tuple[Engine, str]]:
    """A connected engine for --db (or the default URL), and that URL with its password hidden."""
    url = resolve_db_url(args.db)
    engine = connect(url)
    try:
        yield engine, redact_url(url)
    finally:
        engine.dispose()


def suggest(args: argparse.Namespace, command: str, shown: str) -> str:
    """The command line that would fix things; --db only when the user gave one (its password shown as ***)."""
    return f"python -m midisc.db {command}" + (f" --db {shown}" if args.db else "")


def say(args: argparse.Namespace, console: Console, line: str, data: dict) -> None:
    if args.json:
        print_json(data)
    else:
        console.print(line, markup=False, highlight=False, soft_wrap=True)


def cmd_init(args: argparse.Namespace, console: Console) -> int:
    with opened(args) as (engine, shown):
        found = current_revision(engine)
        refuse_unknown(found, shown, engine)
        head = head_revision()
        if found is None:
            migration = upgrade(engine, shown)
            line = f"created the midisc tables in {shown} at revision {migration.after}"
            if migration.before is not None:  # another process made them while this one waited for the lock
                line = f"{shown} is already at revision {describe_revision(migration.before)}"
            say(args, console, line, {"database": shown, "before": migration.before, "after": migration.after})
            return 0
        line = f"{shown} is already at revision {describe_revision(found)}"
        if found != head:
            line += f" (head is {head}: run {suggest(args, 'upgrade', shown)})"
        say(args, console, line, {"database": shown, "before": found, "after": found})
        return 0


def cmd_upgrade(args: argparse.Namespace, console: Console) -> int:
    with opened(args) as (engine, shown):
        migration = upgrade(engine, shown)
    if not migration.changed:
        line = f"{shown} is already at head {migration.after}"
    elif migration.before is None:
        line = f"created the midisc tables in {shown} at revision {migration.after}"
    else:
        line = f"upgraded {shown} from {describe_revision(migration.before)} to {migration.after}"
    say(args, console, line, {"database": shown, "before": migration.before, "after": migration.after})
    return 0


def cmd_check(args: argparse.Namespace, console: Console) -> int:
    with opened(args) as (engine, shown):
        found, head = current_revision(engine), head_revision()
        # An empty database would list every table as missing; the revision already says what is wrong.
        differences = schema_differences(engine) if found is not None else []
    reason = None
    if found is None:
        reason = f"{shown} has no midisc tables: run {suggest(args, 'init', shown)}"
    elif found != UNVERSIONED and found not in known_revisions():
        try:
            refuse_unknown(found, shown, engine)
        except StoreError as error:
            reason = str(error)
    elif found != head:
        reason = f"database at {describe_revision(found)}, head is {head}: run {suggest(args, 'upgrade', shown)}"
    elif differences:
        reason = (f"database at head {head}, but its tables differ from the models in {len(differences)} "
                  f"place(s): {'; '.join(differences)}")
    if args.json:
        print_json({"database": shown, "revision": found, "head": head, "current": found == head,
                    "matches": found is not None and not differences, "differences": differences, "reason": reason})
    else:
        for line in (f"database: {shown}", f"revision: {describe_revision(found)}", f"head:     {head}",
                     f"tables:   {'none' if found is None else 'differ' if differences else 'match the models'}",
                     *(f"  {difference}" for difference in differences)):
            console.print(line, markup=False, highlight=False, soft_wrap=True)
    if reason:
        print(reason, file=sys.stderr)
    return 0 if reason is None else 1


def pending_files(paths: list[str]) -> list[Path]:
    """The journal files under `paths` (files or folders); by default the run folders under the working folder."""
    roots = [Path(p) for p in paths] or [Path("outputs"), Path("multirun")]
    found: list[Path] = []
    for root in roots:
        if root.is_file():
            found.append(root)
        elif root.is_dir():
            found += sorted(root.rglob(PENDING_FILENAME))
        elif paths:
            raise UsageError(f"{root} is neither a {PENDING_FILENAME} file nor a folder holding run folders")
    return found


def journal_target(path: Path, header: Header | None, given: str | None) -> str:
    """The URL to send journal `path` to: the database its header names, with the password from --db or the
    environment; JournalError (one line) when --db names another database or the password is nowhere."""
    if header is None:  # written before journals named their database
        if given is None:
            raise JournalError(f"{path} does not say which database it belongs to (an older midisc wrote it): "
                               "name it with --db URL")
        return resolve_db_url(given)
    if given is not None:
        url = resolve_db_url(given)
        if database_identity(url) != header.database:
            raise JournalError(f"{path} holds writes of run {header.run_id} of {header.database}, but --db names "
                               f"{database_identity(url)}: nothing sent, journal kept")
        return url
    if not header.password_hidden:
        return header.database
    for candidate in (lambda: os.environ.get("MIDISC_DB_URL"), postgres_url_from_env):
        try:
            url = candidate()
            if url and database_identity(url) == header.database:
                return url
        except StoreError:  # a malformed $MIDISC_DB_URL or $POSTGRES_PORT is simply not this database
            continue
    raise JournalError(f"{path} belongs to {header.database}, whose password is not kept: run python -m midisc.db "
                       f"sync {path} --db 'URL' with that URL and its password (or set MIDISC_DB_URL)")


def sync_file(path: Path, given: str | None, recreate: bool) -> dict:
    """Send one journal where it belongs: {file, database, written, left, error}."""
    result = {"file": str(path), "database": None, "written": 0, "left": 0, "error": None}
    try:
        header, lines = read(path)
        result["left"] = len(lines)
        url = journal_target(path, header, given)
        result["database"] = header.database if header else database_identity(url)
        with Store(url) as store:
            result["written"], result["left"] = replay(store, path, recreate=recreate)
    except StoreError as error:  # JournalError too: nothing was sent into a database the journal does not fit
        result["error"] = str(error)
    return result


def cmd_sync(args: argparse.Namespace, console: Console) -> int:
    files = pending_files(args.paths)
    if not files:
        say(args, console, "nothing to sync: no run kept writes for an unreachable database", {"files": []})
        return 0
    results = [sync_file(path, args.db, args.recreate) for path in files]
    if args.json:
        print_json({"files": results})
    else:
        for r in results:
            if r["error"]:
                print(f"error: {r['error']}", file=sys.stderr)
                continue
            state = "all sent, file removed" if not r["left"] else f"{r['left']} still waiting (database unreachable)"
            console.print(f"{r['file']}: {r['written']} write(s) sent to {r['database']}; {state}", markup=False,
                          highlight=False, soft_wrap=True)
    return 0 if all(r["left"] == 0 and not r["error"] for r in results) else 1


def _sync_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("paths", nargs="*", metavar="PATH",
                        help=f"{PENDING_FILENAME} files or folders to search (default: ./outputs and ./multirun)")
    parser.add_argument("--recreate", action="store_true",
                        help="record a run again from its journal when its database no longer has it (the file "
                             "was deleted or replaced while the run trained)")


COMMANDS: dict[str, Command] = {
    "init": Command("create the midisc tables in an empty database", cmd_init),
    "upgrade": Command("apply the schema revisions the database lacks, keeping its rows", cmd_upgrade),
    "check": Command("the database's schema revision and whether its tables match the models "
                     "(exit status 1 if not)", cmd_check),
    "sync": Command("send the writes that runs kept while the database was unreachable (exit status 1 while "
                    "some still wait)", cmd_sync, _sync_arguments),
}


def parse(argv: list[str] | None) -> argparse.Namespace:
    return parse_subcommands("python -m midisc.db", __doc__.split("\n")[0], COMMANDS, argv, common=add_db_argument)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    return COMMANDS[args.command].run(args, make_console())


if __name__ == "__main__":
    run_tool(main)
