"""`python -m midisc.train`, as bench/faults.py runs it: the same command, with the stages of a run marked so that
a kill -9 can land inside the one the campaign picked, and their times kept for the twin that sets the delays.

    python bench/fault_child.py ARGS...        # ARGS as for python -m midisc.train

The stages are marked by wrapping, from here, functions that midisc calls (nothing in midisc/ knows of it):
harvest (the activation generators), train (one SAE step), checkpoint (a save), analysis (the feature
analysis, the spliced-in evaluation), export (the SAELens and Neuronpedia files), db (every Store write).
Time inside a nested stage belongs to the inner one: a row written during the analysis is a db stage.

Environment, set by the campaign:
  FAULT_PLAN   STAGE:CALL:DELAY  kill -9 this process DELAY seconds into the CALL-th (0-based) entry of STAGE
  FAULT_NOTE   a file that receives, just before the kill, the stage the process is in at that moment
  FAULT_TIMES  a file that receives, at exit, {stage: [seconds of each entry]} as JSON
"""

from __future__ import annotations

import atexit
import functools
import json
import os
import runpy
import signal
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path

STORE_WRITES = ("update_run", "finish_run", "update_metrics", "reopen_run", "add_epoch_metrics",
                "add_features", "add_feature_examples", "add_sae_model", "add_evaluation")
PROMPT_S = 0.01  # a kill planned sooner than this into an entry comes at the entry itself
STAGES = ("harvest", "train", "checkpoint", "analysis", "export", "db")

_stack: list[str] = []
_entries: dict[str, int] = defaultdict(int)
_seconds: dict[str, list[float]] = defaultdict(list)


def _kill(note: str | None) -> None:
    if note:
        Path(note).write_text(_stack[-1] if _stack else "between stages")
    os.kill(os.getpid(), signal.SIGKILL)


def _enter(stage: str, plan: tuple[str, int, float] | None, note: str | None) -> None:
    due = plan and plan[0] == stage and _entries[stage] == plan[1]
    _entries[stage] += 1
    _stack.append(stage)
    if due and plan[2] < PROMPT_S:
        _kill(note)  # a timer would wake too late for an entry of a few milliseconds (one harvest batch)
    elif due:
        threading.Timer(plan[2], _kill, args=(note,)).start()  # it fires wherever the run has got to by then


def _exit(stage: str, started: float) -> None:
    _stack.pop()
    _seconds[stage].append(time.perf_counter() - started)


def marks_calls(stage: str, fn, plan, note):
    @functools.wraps(fn)
    def marked(*args, **kwargs):
        started = time.perf_counter()
        _enter(stage, plan, note)
        try:
            return fn(*args, **kwargs)
        finally:
            _exit(stage, started)
    return marked


def marks_items(stage: str, fn, plan, note):
    """A generator function whose every step is a stage entry (the consumer's work between steps is not)."""
    @functools.wraps(fn)
    def marked(*args, **kwargs):
        inner = fn(*args, **kwargs)
        try:
            while True:
                started = time.perf_counter()
                _enter(stage, plan, note)
                try:
                    item = next(inner)
                except StopIteration:
                    return
                finally:
                    _exit(stage, started)
                yield item
        finally:
            inner.close()
    return marked


def install(plan: tuple[str, int, float] | None, note: str | None) -> None:
    from midisc.data import recipe
    from midisc.store import Store
    from midisc.training import finish
    from midisc.training.checkpoints import Checkpointer
    from midisc.training.module import SAEModule

    for name in ("harvest", "harvest_contexts"):
        setattr(recipe, name, marks_items("harvest", getattr(recipe, name), plan, note))
    SAEModule.training_step = marks_calls("train", SAEModule.training_step, plan, note)
    Checkpointer.save = marks_calls("checkpoint", Checkpointer.save, plan, note)
    for name in ("analyze_features", "evaluate"):
        setattr(finish, name, marks_calls("analysis", getattr(finish, name), plan, note))
    finish.publish = marks_calls("export", finish.publish, plan, note)
    for name in STORE_WRITES:
        setattr(Store, name, marks_calls("db", getattr(Store, name), plan, note))


def parse_plan(text: str | None) -> tuple[str, int, float] | None:
    if not text:
        return None
    stage, call, delay = text.split(":")
    return stage, int(call), float(delay)


def main() -> None:
    times = os.environ.get("FAULT_TIMES")
    if times:
        atexit.register(lambda: Path(times).write_text(json.dumps(_seconds)))
    install(parse_plan(os.environ.get("FAULT_PLAN")), os.environ.get("FAULT_NOTE"))
    sys.argv = ["midisc.train", *sys.argv[1:]]
    runpy.run_module("midisc.train", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
