"""`python -m midisc.evaluate RUN`: SAEBench's core evaluation of a run's SAE, stored and written as JSON.

    python -m midisc.evaluate 3                  # held-out articles of run 3; 64 contexts spliced
    python -m midisc.evaluate 3 --contexts 256 --json

Reconstruction and sparsity are measured over all the run's held-out vectors; the spliced-model numbers
(CE loss recovered, KL) over the first `--contexts` held-out contexts, three forwards each. The result
replaces the run's earlier core evaluation in the database (table `evaluations`) and is written to
`evaluation_core.json` in the run folder, in SAEBench's layout (see evaluation.py).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from midisc.run_folder import EVALUATION_FILENAME
from midisc.cli import UsageError, add_db_argument, make_console, make_table, open_store, print_json, run_tool
from midisc.analysis.saebench import EVAL_TYPE, core_report, reconstruction
from midisc.training.reopen import contexts, harvest_run, open_model, open_run, run_texts
from midisc.analysis.splice import splice_totals

SPLICE_BATCH = 8  # contexts per forward: three vocab-wide logit tensors of this many contexts are held at once


def evaluate_run(store, run_id: int, n_contexts: int = 64, progress: bool = True) -> dict:
    """Evaluate the run's SAE on its held-out texts, record the result, and return it."""
    run = open_run(store, run_id)
    model = open_model(run)
    heldout = contexts(run, model, run_texts(run)[1])
    chunks = harvest_run(run, model, heldout, progress="held-out activations" if progress else None)
    recon = reconstruction(run.sae, (chunk.acts for chunk in chunks))
    spliced = heldout[:n_contexts]
    totals = splice_totals(model.loaded.model, model.module, run.sae, spliced.split(SPLICE_BATCH),
                           special_ids=model.special, outlier_factor=run.config["activations"]["outlier_factor"],
                           progress="spliced forwards" if progress else None)
    config = {"model_name": run.row["model"], "hook_name": run.row["hook"], "layer": run.row["layer"],
              "context_size": run.config["context_size"], "n_contexts_spliced": len(spliced),
              "dataset": "held-out texts of the run", "exclude_special_tokens_from_reconstruction": True,
              "run_id": run_id}
    report = core_report(recon, totals.scores(), totals.tokens, config)
    store.add_evaluation(run_id, EVAL_TYPE, totals.tokens, report)
    folder = Path(run.row["output_dir"])
    if folder.is_dir():
        (folder / EVALUATION_FILENAME).write_text(json.dumps(report, indent=2, allow_nan=False))
    return report


def _cell(value: float | None, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}g}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m midisc.evaluate", description=__doc__.split("\n")[0])
    parser.add_argument("run", type=int, help="the run id (python -m midisc.explore list)")
    parser.add_argument("--contexts", type=int, default=64,
                        help="held-out contexts to run with the SAE spliced in (default 64)")
    parser.add_argument("--json", action="store_true", help="print the whole result as JSON")
    add_db_argument(parser)
    args = parser.parse_args(argv)
    if args.contexts < 1:
        raise UsageError(f"--contexts must be at least 1, got {args.contexts}")
    with open_store(args.db) as store:
        report = evaluate_run(store, args.run, args.contexts, progress=not args.json)
    if args.json:
        print_json(report)
        return 0
    console = make_console()
    table = make_table(console, "group", "metric", "value", right=("value",),
                       title=f"run {args.run}: SAEBench core evaluation")
    for group, values in report["eval_result_metrics"].items():
        for name, value in values.items():
            table.add_row(group, name, _cell(value))
    for name, value in report["midisc"].items():
        table.add_row("midisc", name, _cell(value))
    console.print(table)
    return 0


if __name__ == "__main__":
    run_tool(main)
