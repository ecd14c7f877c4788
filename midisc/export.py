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
from midisc.publish.publication import FeatureTable, Publication, run_info
from midisc.store import Store
from midisc.training.finish import publish
from midisc.training.reopen import OpenedRun, open_run


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


def feature_table(store: Store, run: OpenedRun, db: str) -> FeatureTable:
    rows = store.features(run.id)
    if len(rows) != run.sae.d_sae:
        raise UsageError(f"run {run.id} has {len(rows)} feature rows for {run.sae.d_sae} features; "
                         f"run python -m midisc.analyze {run.id}{db} first")
    analysed = (run.row.get("metrics") or {}).get("analysed_tokens")
    return FeatureTable.of([r["frequency"] for r in rows], [r["mean_activation"] for r in rows],
                           [r["max_activation"] for r in rows], [r["is_dead"] for r in rows], int(analysed or 0))


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    console = make_console()
    started = time.time()
    with open_store(args.db) as store:
        run = open_run(store, args.run)
        if run.row["status"] != "completed":
            raise UsageError(f"run {run.id} is {run.row['status']}; only completed runs are exported")
        export = {"neuronpedia": True, "set_name": None, "features_per_batch": 128, "output_tokens": 10,
                  **(run.config.get("export") or {})}
        set_name = args.set_name or export["set_name"]
        per_batch = args.features_per_batch or export["features_per_batch"]
        if per_batch < 1:
            raise UsageError(f"--features-per-batch={per_batch} must be at least 1")
        source = None
        if not args.no_model:
            try:
                source = run.recipe.open()
            except lm.ModelError as err:
                raise lm.ModelError(f"{err}; with --no-model the dashboards are skipped") from None
        n_layers = source.n_layers() if source else 0
        pub = Publication(sae=run.sae, run_id=run.id, metrics=run.row.get("metrics") or {},
                          features=feature_table(store, run, db_hint(args)), examples=store.feature_examples(run.id),
                          set_name=set_name, **run_info(run.config, run.row["hook"], n_layers))
    acts = []
    if source is not None:
        acts = [chunk.acts for chunk in source.chunks(source.heldout_contexts(), progress="activation histograms")]
    out = Path(args.out or run.row["output_dir"])
    # Into the run's own folder the recorded weights stay untouched (their checksum is on record).
    same = (out / "sae").resolve() == run.sae_dir.resolve()
    written = publish(pub, out, acts, source, neuronpedia=True, features_per_batch=per_batch,
                      output_tokens=export["output_tokens"], weights=not same)
    console.print(f"run {run.id} exported in {time.time() - started:.0f}s")
    console.print(f"  SAELens folder:      {written.saelens}")
    console.print(f"  Neuronpedia package: {written.package}")
    console.print(f"  dashboard files:     {written.dashboard or 'skipped (--no-model)'}")
    console.print(f"next: python -m midisc.verify {run.id}{db_hint(args)}")
    return 0


if __name__ == "__main__":
    run_tool(main)
