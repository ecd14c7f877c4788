"""End to end: where the default run's time goes, and what the disk activation cache saves a 6-job sweep.

Why: the README promises about 6 minutes for the default run on 2 cores, and that a sweep on one layer runs
the language model once. This shows which phase to work on, and whether the cache pays for itself.

Runs go through `midisc.train.train(cfg, folder)`, in this process, with the real config composed as the CLI
composes it (SQLite and the activation cache in a temporary folder). The phases are timed by wrapping, from
here, the functions train.py calls, so nothing in midisc/ changes; time inside a nested phase counts only
for the inner one (the first epoch's harvest runs inside `Trainer.fit`, for instance):
- load: reading the texts, checking the hook (a meta-device model), loading the weights, tokenising;
- harvest: inside the activation generators of data/recipe.py (`harvest_contexts` for the held-out texts,
  `harvest` for training);
- train: `Trainer.fit` (SAE steps, validation, checkpoints) minus everything nested in it;
- analysis: the feature analysis and SAEBench's evaluation (`analyze_features` and `evaluate` of training/finish.py);
- export: the SAELens folder, the Neuronpedia package and dashboard files (`publish` of training/finish.py);
- database: every `Store` call (opening it, runs, epoch metrics, features, examples);
- other: the rest (config checks, Lightning's set-up, the summary).

The sweep runs its jobs one after another in this process, as Hydra's basic launcher does for
`python -m midisc.train -m sae.k=...`: once with `activations.cache=disk` (the first job harvests, the others
read the cache) and once with `activations.cache=memory` (every job harvests).

    python bench/pipeline.py [--quick] [--set KEY=VALUE ...]   # --set: extra overrides for every run
"""

from __future__ import annotations

import argparse
import functools
import tempfile
import time
from collections import defaultdict
from contextlib import ExitStack, contextmanager
from pathlib import Path
from unittest import mock

import lightning as L
from hydra import compose, initialize_config_dir

import midisc.train
from midisc.data import lm, packing, recipe
from midisc.training import finish
from midisc.store import Store

import tiny
from output import add_overrides, result, table

REPO = Path(__file__).resolve().parents[1]
PHASES = ("load", "harvest", "train", "analysis", "export", "database", "other")
SWEEP_K, QUICK_SWEEP_K = (16, 24, 32, 48, 64, 96), (4, 8)
STORE_CALLS = ("__init__", "close", "start_run", "update_run", "finish_run", "reopen_run", "add_epoch_metrics",
               "add_features", "add_sae_model", "add_evaluation", "add_feature_examples")
_END = object()


class PhaseClock:
    """Wall time per phase, exclusive: while a nested phase runs, only the inner one's clock moves."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.stack: list[str] = []
        self.mark = time.perf_counter()

    @contextmanager
    def phase(self, name: str):
        self._switch(lambda: self.stack.append(name))
        try:
            yield
        finally:
            self._switch(self.stack.pop)

    def _switch(self, change) -> None:
        now = time.perf_counter()
        if self.stack:
            self.seconds[self.stack[-1]] += now - self.mark
        self.mark = now
        change()

    def calls(self, name: str, fn):
        @functools.wraps(fn)
        def timed(*args, **kwargs):
            with self.phase(name):
                return fn(*args, **kwargs)
        return timed

    def items(self, name: str, fn):
        """A generator function whose every step is timed as `name` (the consumer's work between steps is not)."""
        @functools.wraps(fn)
        def timed(*args, **kwargs):
            inner = fn(*args, **kwargs)
            try:
                while True:
                    with self.phase(name):
                        item = next(inner, _END)
                    if item is _END:
                        return
                    yield item
            finally:
                inner.close()
        return timed


def timed_run(overrides: list[str], folder: Path) -> dict[str, float]:
    """Seconds per phase of one training run (and its total), with the phases wrapped as the docstring says."""
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    clock = PhaseClock()
    wraps = [(midisc.train, "load_corpus", "load"), (lm, "load_config", "load"), (lm, "resolve_hook", "load"),
             (lm, "load_model", "load"), (packing, "pack", "load"), (L.Trainer, "fit", "train"),
             (finish, "analyze_features", "analysis"), (finish, "evaluate", "analysis"), (finish, "publish", "export"),
             *((Store, name, "database") for name in STORE_CALLS)]
    with ExitStack() as patches:
        for owner, name, phase in wraps:
            patches.enter_context(mock.patch.object(owner, name, clock.calls(phase, getattr(owner, name))))
        for name in ("harvest", "harvest_contexts"):
            patches.enter_context(mock.patch.object(recipe, name, clock.items("harvest", getattr(recipe, name))))
        with clock.phase("other"):
            midisc.train.train(cfg, folder)
    return {**{p: clock.seconds[p] for p in PHASES}, "total": sum(clock.seconds.values())}


def sweep(base: list[str], ks: tuple[int, ...], cache: str, folder: Path) -> dict:
    jobs = [timed_run([*base, f"sae.k={k}", f"activations.cache={cache}", f"activations.cache_dir={folder / 'cache'}"],
                      folder / f"k{k}") for k in ks]
    return {"cache": cache, "jobs": len(jobs), "seconds": sum(j["total"] for j in jobs),
            "harvest_s": sum(j["harvest"] for j in jobs), "load_s": sum(j["load"] for j in jobs),
            "job_seconds": [j["total"] for j in jobs]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the tiny random Llama, a 2-job sweep (for tests)")
    add_overrides(parser, "epochs=1")
    args = parser.parse_args()
    midisc.train.quiet_lightning()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        base = [f"storage.url=sqlite:///{tmp / 'runs.db'}", "trainer.enable_progress_bar=false"]
        if args.quick:
            base += tiny.run_overrides(tmp, 60)
        base += args.set
        ks = QUICK_SWEEP_K if args.quick else SWEEP_K
        default = timed_run([*base, f"activations.cache_dir={tmp / 'cache'}"], tmp / "default")
        sweeps = [sweep(base, ks, cache, tmp / cache) for cache in ("disk", "memory")]
    table(f"the default run{' (tiny random Llama)' if args.quick else ''}: {default['total']:.1f} s",
          ["phase", "seconds", "share"], [[p, default[p], f"{default[p] / default['total']:.0%}"] for p in PHASES])
    disk, memory = sweeps
    table(f"a {len(ks)}-job sweep on one layer (sae.k={','.join(map(str, ks))})",
          ["activations.cache", "jobs", "seconds", "of which harvest", "of which load", "per job"],
          [[s["cache"], s["jobs"], s["seconds"], s["harvest_s"], s["load_s"],
            " ".join(f"{t:.1f}" for t in s["job_seconds"])] for s in sweeps])
    print(f"the disk cache makes the sweep {memory['seconds'] / disk['seconds']:.2f}x as fast as harvesting in every job")
    result({"default_run": default, "sweep": {"disk": disk, "memory": memory,
                                              "speedup": memory["seconds"] / disk["seconds"]}})


if __name__ == "__main__":
    main()
