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
from pathlib import Path

from midisc.cli import UsageError, add_db_argument, make_console, make_table, open_store, print_json, run_tool
from midisc.store import Store
from midisc.training.finish import evaluate, evaluation_config, record_evaluation
from midisc.training.reopen import open_run


def evaluate_run(store: Store, run_id: int, n_contexts: int = 64, progress: bool = True) -> dict:
    """Evaluate the run's SAE on its held-out texts as training does, record the result, and return it."""
    run = open_run(store, run_id)
    source = run.recipe.open()
    heldout = list(source.chunks(source.heldout_contexts(), progress="held-out activations" if progress else None))
    config = evaluation_config(run.row["hook"], run.row["model"], run.row["layer"], run.config["context_size"], run_id)
    report = evaluate(run.sae, source, heldout, n_contexts, config, progress)
    record_evaluation(store, run_id, Path(run.row["output_dir"]), report)
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
    tokens = report["eval_result_metrics"]["token_stats"]["total_tokens_eval_sparsity_variance"]
    console.print(f"dead_frac: features that never fired on the {tokens:,} held-out tokens evaluated (training's dead, "
                  "not fired in its last dead_window tokens, is in python -m midisc.explore list)")
    return 0


if __name__ == "__main__":
    run_tool(main)
