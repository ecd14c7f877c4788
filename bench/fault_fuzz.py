"""bench/faults.py's bad-input fuzzing: every config key given values of the wrong type, out of range, empty or
huge, and text folders of binary, mis-encoded, empty and huge files.

Each must be refused in one line that names the key or path (exit 2, `error: ...` on stderr), or run (exit 0),
cleaned with a logged warning where the input needed cleaning; never a traceback, never a run left `running`
in the database. `campaign()` returns the two sections, "config keys" and "text sources".

Values come from two places: a fixed list of edge values for each key's type (in the full campaign every key
meets all of them; in the quick one, one each, in turn) and Hypothesis, which draws arbitrary values, keys
and folders from a fixed seed. No example database and no shrinking: a failing example is recorded and the
campaign goes on, so one bug cannot hide the next.

The parts: fault_cli.py runs the command line and judges how it ended; fault_fuzz_config.py draws the config
values, fault_fuzz_text.py the text folders. A config example runs what `python -m midisc.train ARGS` runs: the module is run as `__main__` (runpy) in
this process, with sys.argv, the working folder and file descriptors 1 and 2 pointed at the example, so its
__main__ block, Hydra's parser and job logging, check_config and training meet the value as from a shell, in
~0.4 s for a refusal rather than the ~6 s a fresh Python spends importing torch. A few examples run again in
a real subprocess and must end the same way: that is what says the in-process harness tells the truth. A run
that is accepted is bounded (a huge `epochs` is legitimate): SIGALRM raises KeyboardInterrupt after `bound`
seconds, as Ctrl-C would, and midisc records the run as interrupted.

On 2 busy CPU cores: quick ~45 s (80 config examples, 44 text ones), full ~7 min (764 and 208).
"""

from __future__ import annotations

import time
from pathlib import Path

from hypothesis.configuration import set_hypothesis_home_dir

from fault_fuzz_config import config_keys
from fault_fuzz_text import text_sources
from fault_report import Section


def campaign(work: Path, base: list[str], quick: bool, seed: int) -> list[Section]:
    """Bad-input fuzzing: the config-keys and text-sources sections. `work` is an empty folder to write in;
    `base` the overrides of a tiny run (tiny.run_overrides), without storage."""
    # Hypothesis caches its unicode tables under ./.hypothesis even with database=None; the campaign's own
    # folder keeps the user's working folder clean.
    set_hypothesis_home_dir(work / ".hypothesis")
    bound = 5 if quick else 8  # an accepted tiny run takes ~3 s; a longer one is cut, as Ctrl-C would
    sections = []
    for fuzz in (config_keys, text_sources):
        started = time.perf_counter()
        section = fuzz(work, base, quick, seed, bound)
        section.figures["seconds"] = round(time.perf_counter() - started, 1)
        sections.append(section)
    return sections
