"""What the command-line tools share: the --db option, one-line errors, and output for people or scripts.

Output is a Rich console: tables and colour in a terminal; borderless, colourless columns when piped
(so grep and awk work), and `--json` for scripts.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

from dotenv import load_dotenv
from rich import box
from rich.console import Console
from rich.table import Table
from sqlalchemy.exc import InterfaceError, OperationalError

from midisc.concepts import ConceptError
from midisc.data.corpus import CorpusError
from midisc.data.lm import ModelError
from midisc.runs import RunError
from midisc.store import Store, StoreError, UnknownRunError
from midisc.store.engine import driver_message, resolve_db_url



class UsageError(ValueError):
    """A bad argument (unknown feature, concept, file…); the message says what would be valid."""


USER_ERRORS = (UnknownRunError, RunError, StoreError, ModelError, CorpusError, ConceptError, UsageError)


def add_db_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--db", metavar="URL", default=None,
                        help="database URL, or 'postgres' for the one $POSTGRES_* describe "
                             "(default: $MIDISC_DB_URL or sqlite:///outputs/midisc.db)")


def open_store(url: str | None) -> Store:
    return Store(resolve_db_url(url))


def make_console() -> Console:
    console = Console()
    if not console.is_terminal:  # piped: plain text, wide enough that rows stay on one line
        console = Console(no_color=True, highlight=False, width=200, emoji=False)
    return console


def make_table(console: Console, *columns: str, title: str | None = None, right: tuple[str, ...] = ()) -> Table:
    table = Table(title=title, box=box.SIMPLE_HEAD if console.is_terminal else None,
                  title_justify="left", pad_edge=False, show_edge=False)
    for name in columns:
        table.add_column(name, justify="right" if name in right else "left", overflow="fold")
    return table


def print_json(data: object) -> None:
    json.dump(data, sys.stdout, indent=2, default=str, allow_nan=False)
    sys.stdout.write("\n")


def run_tool(main: Callable[[list[str] | None], int | None], argv: list[str] | None = None) -> None:
    """Run a tool's main; mistakes a user can fix end in one line on stderr and exit status 2."""
    load_dotenv(Path.cwd() / ".env")  # MIDISC_DB_URL and POSTGRES_* may live in a .env file
    try:
        code = main(argv)
    except USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except (OperationalError, InterfaceError) as err:  # the database went away under the command
        print(f"error: the database stopped working during the command ({driver_message(err)}): was its file deleted "
              "or replaced, or its server stopped? What the command had not written yet is not stored",
              file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code or 0)
