"""`python -m midisc.serve`: the feature browser, a local web page over the run database.

    python -m midisc.serve                          # http://127.0.0.1:8000, the default database
    python -m midisc.serve --db postgres --port 8080
    python -m midisc.serve --no-model               # no "try a text": the language model is never loaded
    python -m midisc.serve --host 0.0.0.0 --public  # reachable from other machines: read the README first

It binds to this machine only (127.0.0.1) unless `--public` is given with another `--host`: the pages show
every run's config, examples and folders, and "try a text" runs the model for anyone who can reach it.
"""

from __future__ import annotations

import argparse
import ipaddress
import socket
import sys
import threading
import webbrowser

from midisc.cli import UsageError, add_db_argument, run_tool
from midisc.store.engine import redact_url, resolve_db_url
from midisc.training.reopen import RunError, open_run
from midisc.web.tryit import Opened, TextProbe, TryError

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m midisc.serve", description=__doc__.split("\n")[0])
    add_db_argument(parser)
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    parser.add_argument("--public", action="store_true",
                        help="allow a --host other than this machine's loopback: anyone who reaches it sees every run")
    parser.add_argument("--no-model", action="store_true", help="turn 'try a text' off: never load a language model")
    parser.add_argument("--no-browser", action="store_true", help="do not open a browser tab")
    return parser.parse_args(argv)


def check_address(host: str, port: int, public: bool) -> None:
    """Refuse, in one line, an address that would expose the browser without --public, or that is taken."""
    if not 0 < port < 65536:
        raise UsageError(f"--port={port} must be between 1 and 65535")
    if host not in LOOPBACK:
        try:
            loopback = ipaddress.ip_address(host).is_loopback
        except ValueError:
            loopback = False
        if not loopback and not public:
            raise UsageError(f"--host={host} makes every run's pages and 'try a text' reachable from other machines; "
                             "add --public to do that on purpose, or leave --host out (127.0.0.1)")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as error:
            raise UsageError(f"cannot listen on {host}:{port} ({error.strerror}); is another server there? "
                             "Pass another --port") from None


def opener(url: str):
    """How "try a text" reopens a run: its SAE and recipe, with a failure as a one-line TryError."""
    from midisc.store import Store

    def open_for_text(run_id: int) -> Opened:
        with Store(url) as store:
            try:
                run = open_run(store, run_id)
            except RunError as error:
                raise TryError(str(error)) from None
        return Opened(sae=run.sae, recipe=run.recipe)

    return open_for_text


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    import uvicorn

    from midisc.web.app import create_app

    url = resolve_db_url(args.db)
    check_address(args.host, args.port, args.public)
    app = create_app(url, None if args.no_model else TextProbe(opener(url)))
    if app.state.db.get() is None:  # a StoreError (server down, old schema) ends here in one line
        print(f"note: no database at {redact_url(url)} yet; the page says what to run, and shows runs once there are",
              file=sys.stderr)
    shown_host = f"[{args.host}]" if ":" in args.host else args.host
    address = f"http://{shown_host}:{args.port}/"
    print(f"midisc feature browser on {address} (database {redact_url(url)}); Ctrl-C stops it", flush=True)
    if not args.no_browser and sys.stdout.isatty():
        threading.Timer(1.0, webbrowser.open, args=(address,)).start()
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


if __name__ == "__main__":
    run_tool(main)
