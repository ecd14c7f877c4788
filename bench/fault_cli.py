"""How bench/fault_fuzz*.py run `python -m midisc.train ARGS` and judge how it ended: in this process (runpy, with
sys.argv, the working folder and file descriptors 1 and 2 pointed at the example) or in a real subprocess, each
bounded by SIGALRM as Ctrl-C would; passed when refused in one line naming the key, or run, never a traceback
and never a run left `running`."""

from __future__ import annotations

import logging
import math
import os
import re
import runpy
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path


from fault_report import TRACEBACK

REPO = Path(__file__).resolve().parents[1]
# The fuzzed runs are a smaller tiny run: an accepted value then costs ~3 s, not ~17.
FAST = ["epochs=1", "max_samples=4", "data.holdout_texts=2", "evaluate.contexts=1"]


# ----- values as a user types them --------------------------------------------------------------------


class Typed(str):
    """An override value exactly as typed, not rendered: `1,2`, `[1,2`, nothing at all."""


def typed(value) -> str:
    """`value` as a user types it in a Hydra override: null, true, 1e+12, nan, [1,2], {a:1}, 'quoted text'."""
    if isinstance(value, Typed):
        return str(value)
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, list):
        return "[" + ",".join(typed(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{typed(v)}" for k, v in value.items()) + "}"
    # Hydra's quoted strings: \' is a quote, and backslashes are escaped only before a quote or the end.
    return "'" + re.sub(r"(\\*)('|$)", lambda m: m.group(1) * 2 + ("\\'" if m.group(2) else ""), value) + "'"


def shown(value) -> str:
    """`value` as a failure line shows it: typed, on one line, a huge one shortened."""
    text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in typed(value))
    return text if len(text) <= 60 else f"{text[:20]}…({len(text):,} chars)"


def key_of(override: str) -> str:
    return override.partition("=")[0].lstrip("+~")


# ----- running the command line ---------------------------------------------------------------------------


@dataclass
class Outcome:
    code: int
    stdout: str
    stderr: str
    seconds: float


def exit_status(code) -> int:
    """The process's exit status for sys.exit(code), as Python computes it."""
    if code is None:
        return 0
    return code if isinstance(code, int) else 1  # a message: printed, status 1


@contextmanager
def captured() -> Iterator[list[str]]:
    """File descriptors 1 and 2, and sys.stdout/stderr on them, into two files, so what C code writes is caught
    too; the list it yields holds their text once the block ends.

    stdout is strict UTF-8, as on a UTF-8 terminal or pipe: text that cannot be printed fails here as there."""
    texts: list[str] = []
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        streams = sys.stdout, sys.stderr
        for stream in streams:
            stream.flush()
        saved = os.dup(1), os.dup(2)
        os.dup2(out.fileno(), 1)
        os.dup2(err.fileno(), 2)
        # Python's own choices for a UTF-8 locale: stdout strict, stderr backslashreplace.
        sys.stdout = open(1, "w", encoding="utf-8", errors="strict", closefd=False, buffering=1)
        sys.stderr = open(2, "w", encoding="utf-8", errors="backslashreplace", closefd=False, buffering=1)
        files = (sys.stdout, sys.stderr)
        try:
            yield texts
        finally:
            for stream in files:
                if not stream.closed:  # (the run may close what it was given)
                    stream.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])
            sys.stdout, sys.stderr = streams
            for file in (out, err):
                file.seek(0)
                texts.append(file.read().decode("utf-8", errors="replace"))


@contextmanager
def bounded(seconds: float) -> Iterator[None]:
    """KeyboardInterrupt after `seconds`, as Ctrl-C raises it."""
    def interrupt(signum, frame):
        raise KeyboardInterrupt
    previous = signal.signal(signal.SIGALRM, interrupt)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@contextmanager
def process_state(argv: list[str], cwd: Path) -> Iterator[None]:
    """What a run changes in a process, put back afterwards: argv, the working folder, logging, warnings and
    Hydra's singletons (a later in-process run would otherwise see this one's Hydra config)."""
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig

    argv_before, cwd_before = sys.argv, os.getcwd()
    full_error = os.environ.pop("HYDRA_FULL_ERROR", None)  # it changes what Hydra prints; a user has it unset
    loggers = [logging.getLogger(), logging.getLogger("midisc.run_log.file")]
    handlers = [(lg, lg.handlers[:], lg.level) for lg in loggers]
    sys.argv = argv
    os.chdir(cwd)
    try:
        with warnings.catch_warnings():
            # The module is imported already (midisc.config imports it); running it as __main__ is the point.
            warnings.filterwarnings("ignore", message=".*found in sys.modules after import of package.*")
            yield
    finally:
        sys.argv = argv_before
        os.chdir(cwd_before)
        if full_error is not None:
            os.environ["HYDRA_FULL_ERROR"] = full_error
        logging.captureWarnings(False)
        for lg, before, level in handlers:
            for handler in lg.handlers[:]:
                if handler not in before:
                    lg.removeHandler(handler)
                    handler.close()
            lg.handlers[:] = before
            lg.setLevel(level)
        HydraConfig.instance().cfg = None
        GlobalHydra.instance().clear()


def run_in_process(args: list[str], cwd: Path, bound: float) -> Outcome:
    """`python -m midisc.train ARGS` in this process: its __main__ block, sys.exit and all."""
    started = time.perf_counter()
    with captured() as texts:
        with process_state([str(REPO / "midisc" / "train.py"), *args], cwd):
            try:
                with bounded(bound):
                    runpy.run_module("midisc.train", run_name="__main__", alter_sys=True)
                code = 0
            except SystemExit as stop:
                code = exit_status(stop.code)
                if isinstance(stop.code, str):
                    print(stop.code, file=sys.stderr)
            except BaseException:  # what Python does with an exception nothing caught
                traceback.print_exc()
                code = 1
    return Outcome(code, *texts, time.perf_counter() - started)


def run_subprocess(args: list[str], cwd: Path, bound: float) -> Outcome:
    """`python -m midisc.train ARGS` in a new process; SIGINT (Ctrl-C) after `bound` seconds."""
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    started = time.perf_counter()
    # A shell without job control starts commands with SIGINT ignored, and children inherit that.
    proc = subprocess.Popen([sys.executable, "-m", "midisc.train", *args], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        out, err = proc.communicate(timeout=bound)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate()
    return Outcome(proc.returncode, out.decode(errors="replace"), err.decode(errors="replace"),
                   time.perf_counter() - started)


# ----- judging an outcome ---------------------------------------------------------------------------------


def last_exception(text: str) -> str:
    """The line that names the exception at the end of the last traceback in `text`."""
    tail = text[text.rindex(TRACEBACK):].splitlines()
    found = [line for line in tail if re.match(r"^[\w.]+(Error|Exception|Interrupt|Exit)\b", line)]
    return (found[-1] if found else tail[-1]).strip()[:160]


def names(line: str, key: str) -> bool:
    """Whether an error line names `key`, or its last part as a word."""
    last = key.rpartition(".")[2]
    return key in line or re.search(rf"(?<!\w){re.escape(last)}(?!\w)", line) is not None


def running_runs(db: Path) -> set[int]:
    if not db.exists():
        return set()
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        try:
            return {row[0] for row in conn.execute("SELECT id FROM training_runs WHERE status = 'running'")}
        except sqlite3.OperationalError:  # no table yet
            return set()


class Judge:
    """Says what is wrong with an outcome ('' when nothing is); remembers the runs already left running."""

    def __init__(self, db: Path) -> None:
        self.db = db
        self.left_running: set[int] = set()

    def __call__(self, outcome: Outcome, name: str | None) -> str:
        problems = []
        both = outcome.stdout + outcome.stderr
        if TRACEBACK in both:
            problems.append(f"traceback: {last_exception(both)}")
        lines = outcome.stderr.strip().splitlines()
        if outcome.code == 2:
            if len(lines) != 1 or not lines[0].startswith("error:"):
                problems.append(f"refused with {len(lines)} lines on stderr: {(lines or [''])[0][:120]}")
            elif name and not names(lines[0], name):
                problems.append(f"error does not name {name}: {lines[0][:120]}")
        elif outcome.code not in (0, 130):
            first = next((line for line in lines if line.strip()), "")
            problems.append(f"exit {outcome.code} ({len(lines)} lines on stderr): {first[:120]}")
        running = running_runs(self.db) - self.left_running
        if running:
            self.left_running |= running
            problems.append(f"run {min(running)} left running")
        return "; ".join(problems)
