"""How every benchmark reports: a table for people, then one JSON object as the very last stdout line for tools."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence


def add_overrides(parser: argparse.ArgumentParser, example: str) -> None:
    """--set KEY=VALUE (repeatable): Hydra overrides for every run a benchmark starts."""
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help=f"an override for every run, e.g. --set {example} (repeatable)")


def add_device(parser: argparse.ArgumentParser) -> None:
    """--device cpu|cuda, cuda when this torch sees a GPU; refused when it does not."""
    import torch

    def device(name: str) -> str:
        if name == "cuda" and not torch.cuda.is_available():
            raise argparse.ArgumentTypeError("cuda: this torch sees no CUDA GPU")
        if name not in ("cpu", "cuda"):
            raise argparse.ArgumentTypeError(f"{name!r}: choose cpu or cuda")
        return name
    parser.add_argument("--device", type=device, default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cpu or cuda (default: cuda when available)")


def cell(value) -> str:
    if isinstance(value, bool):
        return "PASS" if value else "FAIL"
    if isinstance(value, float):
        return f"{value:,.3g}" if abs(value) < 100 else f"{value:,.0f}"
    return "" if value is None else f"{value:,}" if isinstance(value, int) else str(value)


def table(title: str, columns: Sequence[str], rows: Sequence[Sequence]) -> None:
    """Print rows under columns, with rich when it is installed (booleans show as PASS/FAIL)."""
    cells = [[cell(v) for v in row] for row in rows]
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
        print(title)
        for row in (list(columns), *cells):
            print("  ".join(v.rjust(w) for v, w in zip(row, widths)))
        return
    grid = Table()
    for name in columns:
        grid.add_column(name, justify="right")
    for row in cells:
        grid.add_row(*row)
    # Off a terminal rich assumes 80 columns and would wrap the table; a log file has room.
    console = Console(width=None if sys.stdout.isatty() else 200, highlight=False)
    console.print(title, markup=False)  # above, not as the table's title, which rich wraps to the table's width
    console.print(grid)


def result(data: dict) -> None:
    """The machine-readable figures: one JSON object, the last line of stdout."""
    sys.stdout.flush()
    print(json.dumps(data, default=float), flush=True)
