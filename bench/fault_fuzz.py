"""bench/faults.py's bad-input fuzzing: every config key given values of the wrong type, out of range, empty or
huge, and text folders of binary, mis-encoded, empty and huge files.

Each must be refused in one line that names the key or path (exit 2, `error: ...` on stderr), or run (exit 0),
cleaned with a logged warning where the input needed cleaning; never a traceback, never a run left `running`
in the database. `campaign()` returns the two sections, "config keys" and "text sources".

Values come from two places: a fixed list of edge values for each key's type (in the full campaign every key
meets all of them; in the quick one, one each, in turn) and Hypothesis, which draws arbitrary values, keys
and folders from a fixed seed. No example database and no shrinking: a failing example is recorded and the
campaign goes on, so one bug cannot hide the next.

A config example runs what `python -m midisc.train ARGS` runs: the module is run as `__main__` (runpy) in
this process, with sys.argv, the working folder and file descriptors 1 and 2 pointed at the example, so its
__main__ block, Hydra's parser and job logging, check_config and training meet the value as from a shell, in
~0.4 s for a refusal rather than the ~6 s a fresh Python spends importing torch. A few examples run again in
a real subprocess and must end the same way: that is what says the in-process harness tells the truth. A run
that is accepted is bounded (a huge `epochs` is legitimate): SIGALRM raises KeyboardInterrupt after `bound`
seconds, as Ctrl-C would, and midisc records the run as interrupted.

On 2 busy CPU cores: quick ~45 s (80 config examples, 44 text ones), full ~7 min (764 and 208).
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
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
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from hypothesis import HealthCheck, Phase, given, seed as hypothesis_seed, settings, strategies as st

import tiny
from fault_report import TRACEBACK, Section

REPO = Path(__file__).resolve().parents[1]
# Longer than a file name (255) or a path (4096) may be. (Not longer: midisc.store.redaction's pattern takes
# time quadratic in a word's length, 0.2 s at 5,000 characters, 3.4 s at 20,000, in each of Hydra's files.)
HUGE = "x" * 5_000
# The fuzzed runs are a smaller tiny run: an accepted value then costs ~3 s, not ~17.
FAST = ["epochs=1", "max_samples=4", "data.holdout_texts=2", "evaluate.contexts=1"]


# ----- values, and how a user types them ------------------------------------------------------------------


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


def edge_values(default) -> tuple[list, list]:
    """Wrong types, out-of-range, empty and huge values for a key whose default is `default`: those every key
    meets, and those that behave alike for most keys, of which each key meets one in turn."""
    nan, inf = float("nan"), float("inf")
    if isinstance(default, bool):
        every, some = [2, "maybe"], [0, 0.5]
    elif isinstance(default, int):
        every, some = [-1, 0, 10**12, 2**64, "abc"], [1.5, True]
    elif isinstance(default, float):
        every, some = [-1.0, 0.0, 1e12, nan, inf], ["abc", True, -inf]
    elif isinstance(default, str):
        every, some = [12, "/no/such/thing", "é☃\n\t"], [1.5, True]
    elif isinstance(default, list):
        every, some = [5, [1], [1, 2, 3], ["a", "b"], [-1, 2]], ["abc", [nan, 0.5]]
    else:  # null (an optional setting of any type) or a mapping
        every, some = ["abc", -1, 10**12], [0, 1.5, True]
    return every + ["", None, HUGE], some


# Blank containers and mistakes in the override's syntax (which Hydra's parser meets before any config does)
# behave alike for every key: each key meets one of each, in turn.
BLANKS = [" ", [], {}]
SYNTAX = [Typed(""), Typed("1,2"), Typed("[1,2"), Typed("'abc"), Typed("${nope}"), Typed("a b")]


def edges_for(index: int, default, quick: bool, seed: int) -> list:
    """The edge values the index-th key meets: all of its type's, or in --quick one, in turn."""
    turn = index + seed
    every, some = edge_values(default)
    values = every + [group[turn % len(group)] for group in (some, BLANKS, SYNTAX)]
    return [values[turn % len(values)]] if quick else values


def wild_values() -> st.SearchStrategy:
    """Arbitrary values Hypothesis draws: any scalar, short odd text, and lists and mappings of them."""
    # NUL cannot travel in a command line (execve refuses it); every other character can.
    text = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=40)
    scalars = st.one_of(st.none(), st.booleans(), st.integers(-3, 3), st.integers(), st.floats(), text)
    return st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
        st.from_regex(r"[a-z_]{1,8}", fullmatch=True), inner, max_size=2), max_leaves=4)


def leaf_keys(overrides: list[str]) -> dict[str, object]:
    """Every leaf key of the config those overrides compose (hydra.* aside), with its value."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    leaves = {}

    def walk(node, prefix: str) -> None:
        for key in node.keys():
            child = node._get_node(key)
            if OmegaConf.is_dict(child) and len(child):
                walk(child, f"{prefix}{key}.")
            else:
                value = OmegaConf.select(node, str(key), throw_on_resolution_failure=False)
                leaves[f"{prefix}{key}"] = OmegaConf.to_container(value) if OmegaConf.is_config(value) else value
    walk(cfg, "")
    return leaves


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


# ----- config keys ----------------------------------------------------------------------------------------


@dataclass
class Tried:
    value: object
    args: list[str]
    outcome: Outcome
    failure: str


def _key_of(override: str) -> str:
    return override.partition("=")[0].lstrip("+~")


class ConfigFuzz:
    """Runs config examples through the command line and records each in the section."""

    def __init__(self, work: Path, base: list[str], bound: float) -> None:
        self.db = work / "fuzz.db"
        self.cwd = work / "config"
        self.cwd.mkdir(parents=True, exist_ok=True)
        self.bound = bound
        self.settled = {_key_of(o): o for o in [*base, f"storage.url=sqlite:///{self.db}", *FAST]}
        self.judge = Judge(self.db)
        self.tried: list[Tried] = []
        self.section = Section("config keys", "a wrong value is refused in one line naming the key, or runs; "
                                              "0 tracebacks, no run left running")

    def args(self, key: str, value) -> list[str]:
        return [o for k, o in self.settled.items() if k != key] + [f"{key}={typed(value)}"]

    def attempt(self, key: str, value) -> None:
        args = self.args(key, value)
        outcome = run_in_process(args, self.cwd, self.bound)
        failure = self.judge(outcome, key)
        self.tried.append(Tried(value, args, outcome, failure))
        self.section.record(not failure, f"{key}={shown(value)} -> {failure}")

    def baseline(self) -> None:
        """The tiny run itself, unbounded: it must train (and it pays the imports before any bound runs)."""
        outcome = run_in_process(list(self.settled.values()), self.cwd, bound=300)
        failure = self.judge(outcome, None) or ("" if outcome.code == 0 else f"exit {outcome.code}")
        self.section.record(not failure, f"the tiny run itself -> {failure}")

    def subprocess_checks(self, n: int) -> int:
        """Some examples again in a real `python -m midisc.train`: one of each way of ending, a failure first.
        Each must end as it did in-process: the same exit status, and the same line for a refusal."""
        kinds = [lambda t: bool(t.failure), lambda t: t.outcome.code == 2 and not isinstance(t.value, Typed),
                 lambda t: t.outcome.code == 2 and isinstance(t.value, Typed), lambda t: t.outcome.code == 0,
                 lambda t: t.outcome.code == 130]
        picked = []
        for kind in kinds:
            found = next((t for t in self.tried if kind(t) and t not in picked), None)
            if found:
                picked.append(found)
        for t in picked[:n]:
            real = run_subprocess(t.args, self.cwd, self.bound + STARTUP)
            same = real.code == t.outcome.code and (real.code != 2 or real.stderr.strip() == t.outcome.stderr.strip())
            said = (real.stderr.strip().splitlines() or [""])[-1][:120]
            self.section.record(same and not self.judge(real, None),
                                f"{shown(Typed(t.args[-1]))} in a subprocess -> exit {real.code} (in-process "
                                f"{t.outcome.code}): {said}")
        return len(picked[:n])


# A fresh Python spends this long importing torch, transformers and Lightning before a run's bound starts.
STARTUP = 20


def config_keys(work: Path, base: list[str], quick: bool, seed: int, bound: float) -> Section:
    fuzz = ConfigFuzz(work, base, bound)
    fuzz.baseline()
    leaves = leaf_keys(list(fuzz.settled.values()))
    keys = list(leaves)
    for i, key in enumerate(keys):
        for value in edges_for(i, leaves[key], quick, seed):
            fuzz.attempt(key, value)
    edges = fuzz.section.trials - 1

    @settings(max_examples=5 if quick else 40, database=None, deadline=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @hypothesis_seed(seed)
    @given(key=st.sampled_from(sorted(leaves)), value=wild_values())
    def drawn(key, value) -> None:
        fuzz.attempt(key, value)
    drawn()
    drawn_n = fuzz.section.trials - 1 - edges

    checked = fuzz.subprocess_checks(1 if quick else 4)
    codes = [t.outcome.code for t in fuzz.tried]
    fuzz.section.figures.update(
        keys=len(leaves), keys_tried=len(keys), edge_examples=edges, drawn_examples=drawn_n,
        subprocess_checks=checked, refused=codes.count(2), accepted=codes.count(0), interrupted=codes.count(130),
        tracebacks=sum("traceback" in f for f in fuzz.section.failures),
        slowest_refusal_s=round(max((t.outcome.seconds for t in fuzz.tried if t.outcome.code == 2), default=0), 1))
    return fuzz.section


# ----- text sources ---------------------------------------------------------------------------------------

ACCENTED = " Café, naïve, über, señor."
QUOTED = " “Quoted” – 5 € ‘too’."
INVALID_UTF8 = (b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\xc0\xaf", b"\x80", b"\xf8\x88\x80\x80\x80")

# How a file's bytes come from a text: what a folder of hand-made data holds.
FILE_KINDS: dict[str, Callable[[str, random.Random], bytes]] = {
    "utf-8": lambda text, rnd: text.encode(),
    "utf-8 BOM": lambda text, rnd: b"\xef\xbb\xbf" + text.encode(),
    "latin-1": lambda text, rnd: (text + ACCENTED).encode("latin-1", "replace"),
    "cp1252": lambda text, rnd: (text + QUOTED).encode("cp1252", "replace"),
    "utf-16 BOM": lambda text, rnd: text.encode("utf-16"),
    "utf-16 no BOM": lambda text, rnd: text.encode("utf-16-le"),
    "invalid utf-8": lambda text, rnd: b"".join(
        word.encode() + (rnd.choice(INVALID_UTF8) if rnd.random() < 0.2 else b" ") for word in text.split(" ")),
    "binary": lambda text, rnd: rnd.randbytes(rnd.randint(1, 4096)),
    "NULs": lambda text, rnd: b"\0" * rnd.randint(1, 4096),
    "text with NULs": lambda text, rnd: text.replace(" ", "\0", 3).encode(),
    "empty": lambda text, rnd: b"",
    "whitespace": lambda text, rnd: b" \n\t\r\n  \n",
}
# Lines of a .jsonl file: good records and every way one goes wrong.
JSONL_LINES: dict[str, Callable[[str], str]] = {
    "record": lambda text: json.dumps({"text": text}),
    "other field": lambda text: json.dumps({"body": text}),
    "not a string": lambda text: json.dumps({"text": [text, None, 5]}),
    "not an object": lambda text: json.dumps([text]),
    "broken": lambda text: json.dumps({"text": text})[:-2],
    "blank": lambda text: "  ",
    "deep": lambda text: "[" * 100_000 + "]" * 100_000,  # past json's recursion limit
    "huge number": lambda text: '{"text": "a", "n": ' + "9" * 5000 + "}",  # past int()'s 4,300 digits
    "surrogate": lambda text: '{"text": "' + text.replace('"', "") + ' \\ud800"}',
    "NUL": lambda text: '{"text": "' + text.replace('"', "") + ' \\u0000"}',
}


# Kinds that leave nothing to train on when read as UTF-8 (latin-1 and the like are kept, their odd bytes as U+FFFD).
UNUSABLE = ("binary", "NULs", "empty", "whitespace", "utf-16 BOM", "utf-16 no BOM")


@dataclass
class TextFile:
    name: str      # relative to the folder
    kind: str      # a FILE_KINDS name, or "jsonl"
    data: bytes
    clean: list[str]  # the texts it holds that must come out as they are (a BOM aside)
    messy: bool    # whether reading it must skip or clean something


def _plain(text: str) -> bool:
    """Text no reader needs to touch: something besides spaces, no control character but tab and newlines,
    no BOM to strip, no U+FFFD (a text mostly of those is taken for undecodable bytes and skipped, with a
    warning: fair for a file an earlier conversion already mangled)."""
    return (bool(text.strip()) and not text.startswith("\ufeff") and "\ufffd" not in text
            and not any(ord(c) < 32 and c not in "\t\n\r" or c == "\x7f" for c in text))


def text_file(name: str, kind: str, text: str, rnd: random.Random) -> TextFile:
    data = FILE_KINDS[kind](text, rnd)
    try:
        decoded = data.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError:
        decoded = None
    # Control characters other than NUL may go either way (kept, or the file skipped as binary): no promise.
    messy = decoded is None or "\0" in decoded or not decoded.strip()
    return TextFile(name, kind, data, [decoded] if decoded is not None and _plain(decoded) else [], messy)


def jsonl_file(name: str, lines: list[tuple[str, str]]) -> TextFile:
    data = "\n".join(JSONL_LINES[kind](text) for kind, text in lines).encode()
    clean = [text for kind, text in lines if kind == "record" and _plain(text)]
    # (A blank line is skipped silently at the end of a file, and told elsewhere: no promise.)
    messy = any(kind not in ("record", "blank") or (kind == "record" and (not text.strip() or "\0" in text))
                for kind, text in lines)
    return TextFile(name, "jsonl", data, clean, messy)


def write_folder(folder: Path, files: list[TextFile]) -> Path:
    folder.mkdir(parents=True)
    for f in files:
        (folder / f.name).parent.mkdir(parents=True, exist_ok=True)
        (folder / f.name).write_bytes(f.data)
    return folder


class Warnings(logging.Handler):
    """The warnings midisc.data.corpus logs while a block runs."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())

    @contextmanager
    def caught(self) -> Iterator[Warnings]:
        logger = logging.getLogger("midisc.data.corpus")
        logger.addHandler(self)
        try:
            yield self
        finally:
            logger.removeHandler(self)


def judge_corpus(folder: Path, files: list[TextFile], source: str = "local") -> str:
    """What is wrong with how midisc.data.corpus.load_texts read `folder` ('' when nothing is)."""
    from midisc.data import corpus

    where = {"local": {"path": str(folder)}, "hf": {"name": str(folder)}}[source]
    with Warnings().caught() as warned:
        try:
            texts = corpus.load_texts(source, **where)
        except corpus.CorpusError as err:
            said = str(err)
            if "\n" in said or str(folder) not in said:  # the folder, or a file in it
                named = "names the folder" if str(folder) in said else "names no path"
                return f"refused in {len(said.splitlines())} line(s) that {named}: {said[:120]}"
            return ""
        except Exception as err:
            return f"traceback: {type(err).__name__}: {str(err).splitlines()[0][:120] if str(err) else ''}"
    problems = []
    for text in texts:
        if not isinstance(text, str) or not text.strip() or "\0" in text or text.startswith("\ufeff"):
            problems.append(f"kept an unclean text {text[:30]!r}")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            problems.append("kept a text UTF-8 cannot encode (a lone surrogate)")
    kept = set(texts)
    lost = [f.name for f in files if f.name.endswith((".txt", ".jsonl")) and any(t not in kept for t in f.clean)]
    if lost and source == "local":
        problems.append(f"lost the clean text of {', '.join(lost[:3])}")
    messy = [f.name for f in files if f.messy and f.name.endswith((".txt", ".jsonl"))]
    if messy and not warned.lines and source == "local":
        problems.append(f"cleaned {', '.join(messy[:3])} without a warning")
    if any("\n" in line for line in warned.lines):
        problems.append("a warning of several lines")
    return "; ".join(problems)


def folder_strategy() -> st.SearchStrategy:
    """A folder of up to 6 files: each a text file of some kind, a .jsonl of mixed lines, or another suffix."""
    text = st.one_of(st.sampled_from(tiny.make_texts(8)),
                     st.text(st.characters(blacklist_categories=("Cs",)), max_size=200))
    txt = st.tuples(st.just("txt"), st.sampled_from(sorted(FILE_KINDS)), text, st.randoms(use_true_random=False))
    jsonl = st.tuples(st.just("jsonl"), st.lists(st.tuples(st.sampled_from(sorted(JSONL_LINES)), text),
                                                min_size=1, max_size=5))
    other = st.tuples(st.just("md"), st.sampled_from(sorted(FILE_KINDS)), text, st.randoms(use_true_random=False))
    return st.tuples(st.lists(st.one_of(txt, jsonl, other), max_size=6), st.booleans())


def build_files(drawn) -> list[TextFile]:
    entries, nested = drawn
    files = []
    for i, entry in enumerate(entries):
        name = f"{'sub/' if nested and i % 2 else ''}f{i}.{entry[0]}"
        if entry[0] == "jsonl":
            files.append(jsonl_file(name, entry[1]))
        else:
            files.append(text_file(name, entry[1], entry[2], entry[3]))
    return files


def huge_files(quick: bool) -> list[TextFile]:
    """Tens of megabytes of words in one line, and in many lines (a few in --quick)."""
    size = 5_000_000 if quick else 30_000_000
    words = " ".join(tiny.WORDS)
    one_line = (words + " ") * (size // (len(words) + 1))
    many_lines = (words + "\n") * (size // (len(words) + 1))
    return [TextFile("huge one line.txt", "utf-8", one_line.encode(), [one_line], False),
            TextFile("huge many lines.txt", "utf-8", many_lines.encode(), [many_lines], False)]


# What a whole run on a folder must do: train and warn of what it skipped, train, or be refused.
WARNS, TRAINS, REFUSED = "warns", "trains", "refused"


def cli_folders(quick: bool) -> dict[str, tuple[list[TextFile], str]]:
    """Folders for whole runs: name -> (files, what the run must do)."""
    good = [text_file(f"good{i}.txt", "utf-8", t, random.Random(i)) for i, t in enumerate(tiny.make_texts(10, 3))]
    rnd = random.Random(0)
    bad = [text_file(f"bad {kind}.txt", kind, tiny.make_texts(1, 9)[0], rnd) for kind in FILE_KINDS
           if kind != "utf-8"]
    jsonl = jsonl_file("records.jsonl", [(kind, "A record of a few words.") for kind in JSONL_LINES])
    # Empty, and first in its kind's count: the warning names it, and the console must print that name.
    odd = TextFile(os.fsdecode(b"a \xff\xfe name that is not UTF-8.txt"), "empty", b"", [], True)
    folders = {"every kind of bad file among good ones": (good + bad + [jsonl, odd], WARNS),
               "nothing usable": ([f for f in bad if f.kind in UNUSABLE], REFUSED)}
    if not quick:
        folders["huge files among good ones"] = (good + huge_files(False), TRAINS)
        folders["no .txt or .jsonl at all"] = ([TextFile("notes.md", "utf-8", b"# notes", [], False)], REFUSED)
    return folders


def text_sources(work: Path, base: list[str], quick: bool, seed: int, bound: float) -> Section:
    section = Section("text sources", "bad files refused in one line naming the path, or skipped/cleaned with a "
                                      "warning; 0 tracebacks")
    counter = iter(range(10**9))

    @settings(max_examples=40 if quick else 200, database=None, deadline=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @hypothesis_seed(seed)
    @given(folder_strategy())
    def read(drawn) -> None:
        files = build_files(drawn)
        folder = write_folder(work / "texts" / f"{next(counter):04d}", files)
        failure = judge_corpus(folder, files)
        kinds = sorted({f.kind for f in files}) or ["empty folder"]
        section.record(not failure, f"texts [{', '.join(kinds)}] -> {failure}")
    read()
    direct = section.trials

    big = huge_files(quick)
    folder = write_folder(work / "texts" / "huge", big)
    started = time.perf_counter()
    failure = judge_corpus(folder, big)
    section.record(not failure, f"texts [{len(big[0].data) / 1e6:.0f} MB in one line, and in many] -> {failure}")
    section.figures["huge_read_s"] = round(time.perf_counter() - started, 1)

    for kinds in (["binary", "utf-8"], ["latin-1"], ["utf-16 BOM", "utf-16 no BOM"])[: 1 if quick else 3]:
        files = [text_file(f"{i}.txt", kind, t, random.Random(i)) for i, (kind, t) in
                 enumerate(zip(kinds * 4, tiny.make_texts(4 * len(kinds), 5)))]
        folder = write_folder(work / "texts" / f"hf {'+'.join(kinds)}", files)
        failure = judge_corpus(folder, files, source="hf")
        section.record(not failure, f"data=hf, texts [{', '.join(kinds)}] -> {failure}")
    checked = section.trials - direct - 1

    db = work / "fuzz.db"
    judge = Judge(db)
    (work / "config").mkdir(parents=True, exist_ok=True)
    settled = {_key_of(o): o for o in [*base, f"storage.url=sqlite:///{db}", *FAST]}
    for name, (files, expect) in cli_folders(quick).items():
        folder = write_folder(work / "texts" / name, files)
        args = [*(o for k, o in settled.items() if k != "data.path"), f"data.path={typed(str(folder))}"]
        outcome = run_in_process(args, work / "config", bound + 30)  # a huge file takes a while to read
        failure = judge(outcome, "data.path")
        if expect == REFUSED and outcome.code != 2:
            failure = failure or f"exit {outcome.code}, expected a refusal"
        elif expect != REFUSED and outcome.code not in (0, 130):
            failure = failure or f"exit {outcome.code}, expected it to train"
        elif expect == WARNS and f"warning: data.path={folder}: kept" not in outcome.stdout:
            failure = failure or "trained without a warning about the files it skipped or cleaned"
        section.record(not failure, f"texts [{name}], a whole run -> {failure}")
    section.figures.update(drawn_folders=direct, hf_folders=checked, runs=len(cli_folders(quick)),
                           tracebacks=sum("traceback" in f for f in section.failures))
    return section


def campaign(work: Path, base: list[str], quick: bool, seed: int) -> list[Section]:
    """Bad-input fuzzing: the config-keys and text-sources sections. `work` is an empty folder to write in;
    `base` the overrides of a tiny run (tiny.run_overrides), without storage."""
    bound = 5 if quick else 8  # an accepted tiny run takes ~3 s; a longer one is cut, as Ctrl-C would
    sections = []
    for fuzz in (config_keys, text_sources):
        started = time.perf_counter()
        section = fuzz(work, base, quick, seed, bound)
        section.figures["seconds"] = round(time.perf_counter() - started, 1)
        sections.append(section)
    return sections
