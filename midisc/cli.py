"""What the command-line tools share: the --db option, one-line errors, and output for people or scripts.

Output is a Rich console: tables and colour in a terminal; borderless, colourless columns when piped
(so grep and awk work), and `--json` for scripts.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from pathlib import Path

from dotenv import load_dotenv
from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text
from sqlalchemy.exc import InterfaceError, OperationalError

from midisc.store import Store
from midisc.store.engine import db_argument, driver_message, require_existing, resolve_db_url



class UsageError(ValueError):
    """A bad argument (unknown feature, concept, file…); the message says what would be valid."""


# Every error whose message is meant for a person (one line, the bad value, what would be valid): a command
# prints it and exits 2, training records it without a traceback. Named, not imported: an error of a module
# the command never loaded cannot have been raised, and `python -m midisc.db` need not import torch.
USER_ERRORS = (("midisc.cli", "UsageError"), ("midisc.config", "ConfigError"), ("midisc.data.lm", "ModelError"),
               ("midisc.data.corpus", "CorpusError"), ("midisc.data.cache", "CacheError"),
               ("midisc.data.shards", "ShardError"), ("midisc.analysis.concepts", "ConceptError"),
               ("midisc.store.engine", "StoreError"), ("midisc.store.records", "UnknownRunError"),
               ("midisc.training.reopen", "RunError"), ("midisc.training.module", "NonFiniteLossError"),
               ("midisc.training.checkpoints", "CheckpointError"), ("midisc.interpretation.backends", "BackendError"),
               ("midisc.training.ranks", "RankFailed"))


def user_errors() -> tuple[type[BaseException], ...]:
    """The USER_ERRORS of the modules loaded so far, as classes for `except` and `isinstance`."""
    return tuple(getattr(sys.modules[module], name) for module, name in USER_ERRORS if module in sys.modules)


@dataclass(frozen=True)
class Command:
    """One subcommand of a tool with several (db, cache): what it does (for --help), its function, and the
    arguments it adds."""

    help: str
    run: Callable[[argparse.Namespace, Console], int]
    arguments: Callable[[argparse.ArgumentParser], None] = field(default=lambda _parser: None)


def parse_subcommands(prog: str, description: str, commands: dict[str, Command], argv: list[str] | None,
                      common: Callable[[argparse.ArgumentParser], None] = lambda _parser: None) -> argparse.Namespace:
    """The arguments of `prog COMMAND …`: each subcommand takes --json, what `common` adds, and its own."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name, command in commands.items():
        sub = subparsers.add_parser(name, help=command.help, description=command.help)
        sub.add_argument("--json", action="store_true", help="print JSON instead of text")
        common(sub)
        command.arguments(sub)
    return parser.parse_args(argv)


def add_db_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--db", metavar="URL", default=None,
                        help="database URL, or 'postgres' for the one $POSTGRES_* describe "
                             "(default: $MIDISC_DB_URL or sqlite:///outputs/midisc.db)")


def open_store(url: str | None) -> Store:
    """The store a tool reads runs from; a SQLite file that does not exist is refused, never created."""
    resolved = resolve_db_url(url)
    require_existing(resolved)
    return Store(resolved)


def db_hint(args: argparse.Namespace) -> str:
    """The ` --db …` a printed next command needs to read the database this one read ("" for the default)."""
    return db_argument(resolve_db_url(args.db))


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
    except user_errors() as err:
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


# ----- what the commands print of features and numbers ----------------------------------------


def shown(token: str) -> str:
    """A token as it can be printed on one line."""
    return token.replace("\n", "⏎").replace("\r", "").replace("\t", "→")


def preview(example: dict, console: Console, width: int = 70) -> Text:
    """One line around the example's max token, the token highlighted ([[like this]] when piped)."""
    tokens, peak = [shown(t) for t in example["tokens"]], example["max_token_index"]
    left = "".join(tokens[:peak])[-(width - 20):]
    right = "".join(tokens[peak + 1:])[:15]
    line = Text(left)
    if console.is_terminal:
        line.append(tokens[peak], style="bold black on yellow")
    else:
        line.append(f"[[{tokens[peak]}]]")
    return line.append(right)


def heat(example: dict, console: Console) -> Text:
    """The window with each token's activation as colour intensity (value in brackets when piped)."""
    top = max(example["values"]) or 1.0
    line = Text()
    for i, (token, value) in enumerate(zip(example["tokens"], example["values"])):
        token = shown(token)
        if console.is_terminal:
            level = max(0.0, value) / top
            shade = int(255 - 200 * level)
            style = f"black on rgb(255,{shade},{shade})" if value > 0 else ""
            line.append(token, style=style + (" bold underline" if i == example["max_token_index"] else ""))
        else:
            line.append(f"{token}({value:.2f})" if value > 0 else token)
    return line


def percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.3g}%"


def number(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:.{digits}g}"
