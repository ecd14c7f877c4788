"""bench/faults.py's fuzzing of every config key: edge values of each key's type and values Hypothesis draws, typed
as a user would, each run through the command line (fault_cli.py)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from hypothesis import HealthCheck, Phase, given, seed as hypothesis_seed, settings, strategies as st

from fault_cli import FAST, REPO, Judge, Outcome, Typed, key_of, run_in_process, run_subprocess, shown, typed
from fault_report import Section

# Longer than a file name (255) or a path (4096) may be. (Not longer: midisc.store.redaction's pattern takes
# time quadratic in a word's length, 0.2 s at 5,000 characters, 3.4 s at 20,000, in each of Hydra's files.)
HUGE = "x" * 5_000


# ----- values, and how a user types them ------------------------------------------------------------------


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


# ----- config keys ----------------------------------------------------------------------------------------


@dataclass
class Tried:
    value: object
    args: list[str]
    outcome: Outcome
    failure: str


class ConfigFuzz:
    """Runs config examples through the command line and records each in the section."""

    def __init__(self, work: Path, base: list[str], bound: float) -> None:
        self.db = work / "fuzz.db"
        self.cwd = work / "config"
        self.cwd.mkdir(parents=True, exist_ok=True)
        self.bound = bound
        self.settled = {key_of(o): o for o in [*base, f"storage.url=sqlite:///{self.db}", *FAST]}
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
