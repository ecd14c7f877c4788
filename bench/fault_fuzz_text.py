"""bench/faults.py's fuzzing of text sources: folders of binary, mis-encoded, empty and huge files, read by the
corpus directly and, for a few, by a whole run."""

from __future__ import annotations

import json
import logging
import os
import random
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from hypothesis import HealthCheck, Phase, given, seed as hypothesis_seed, settings, strategies as st

import tiny
from fault_cli import FAST, Judge, key_of, run_in_process, typed
from fault_report import Section


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
    settled = {key_of(o): o for o in [*base, f"storage.url=sqlite:///{db}", *FAST]}
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
