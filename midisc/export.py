"""`python -m midisc.export RUN`: write a recorded run's SAELens folder, Neuronpedia package and dashboards again.

    python -m midisc.export 3                     # into the run's own folder, as training did
    python -m midisc.export 3 --out publish/      # somewhere else (the SAE weights are copied there)
    python -m midisc.export 3 --set-name res-32k  # another Neuronpedia source-set name
    python -m midisc.export 3 --no-model          # no model at hand: SAELens folder and package only

Training writes all of this at its end; run it again after `midisc.analyze` (new statistics and
examples), to rename the source set, or for runs trained before an export existed. Statistics and
examples come from the database; the dashboards' activation histograms and output tokens need the
run's model, which is reloaded and run over the run's held-out texts.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from midisc.cli import UsageError, add_db_argument, db_hint, make_console, open_store, run_tool
from midisc.data import lm
from midisc.training.finish import republish
from midisc.training.reopen import open_run


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m midisc.export", description=__doc__.split("\n")[0])
    parser.add_argument("run", type=int, help="run id (python -m midisc.explore list)")
    parser.add_argument("--out", type=Path, default=None, help="folder to write into (default: the run's folder)")
    parser.add_argument("--set-name", default=None, help="Neuronpedia source-set name (default: the run's)")
    parser.add_argument("--features-per-batch", type=int, default=None, help="features per dashboard batch file")
    parser.add_argument("--no-model", action="store_true",
                        help="do not load the model: no dashboard files (they need histograms and output tokens)")
    add_db_argument(parser)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    console = make_console()
    started = time.time()
    if args.features_per_batch is not None and args.features_per_batch < 1:
        raise UsageError(f"--features-per-batch={args.features_per_batch} must be at least 1")
    with open_store(args.db) as store:
        run = open_run(store, args.run)
        if run.row["status"] != "completed":
            raise UsageError(f"run {run.id} is {run.row['status']}; only completed runs are exported")
        source = None
        if not args.no_model:
            try:
                source = run.recipe.open()
            except lm.ModelError as err:
                raise lm.ModelError(f"{err}; with --no-model the dashboards are skipped") from None
        written = republish(store, run, source, out=args.out, set_name=args.set_name,
                            features_per_batch=args.features_per_batch, db=db_hint(args))
    console.print(f"run {run.id} exported in {time.time() - started:.0f}s")
    console.print(f"  SAELens folder:      {written.saelens}")
    console.print(f"  Neuronpedia package: {written.package}")
    console.print(f"  dashboard files:     {written.dashboard or 'skipped (--no-model)'}")
    console.print(f"next: python -m midisc.verify {run.id}{db_hint(args)}")
    return 0


if __name__ == "__main__":
    run_tool(main)
