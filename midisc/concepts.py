"""`python -m midisc.concepts RUN`: which features of a run detect a concept?

    python -m midisc.concepts 3 --concepts emotions,formal     # modules from concept_modules/
    python -m midisc.concepts 3 --all                          # every module, best feature of each
    python -m midisc.concepts 3 --custom-texts mine.txt --top-features 10
    python -m midisc.concepts 3 --custom-texts mine.txt --name sarcasm    # stored under that name

Runs the run's model and SAE on the concept texts and on contrast texts (the other modules and a sample
of held-out corpus sentences), ranks features by AUROC of their per-text max activation (see
`concepts.py`), stores the ranking in the database (concept_scores) and prints it.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from rich.console import Console

from midisc.cli import (UsageError, add_db_argument, make_console, make_table, number, open_store, percent, preview,
                        print_json, run_tool)
from midisc.analysis.concepts import (concept_dir, corpus_sample, load_modules, ranked, read_texts,
                             selectivity, text_maxima)
from midisc.training.reopen import open_run


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m midisc.concepts", description=__doc__.split("\n")[0])
    parser.add_argument("run", type=int, help="run id (python -m midisc.explore list)")
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--concepts", help="comma-separated module names, e.g. emotions,formal")
    which.add_argument("--all", action="store_true", help="test every module and show the best feature of each")
    which.add_argument("--custom-texts", type=Path, metavar="FILE",
                       help="your own concept: one text per line, # for comments; named after the file unless --name")
    parser.add_argument("--name", default=None, help="the concept's name for --custom-texts (default: the file's stem)")
    parser.add_argument("--top-features", type=int, default=10, help="features to rank and store per concept")
    parser.add_argument("--corpus-sample", type=int, default=200, help="held-out corpus sentences among the contrast")
    parser.add_argument("--modules", type=Path, default=None, help=f"folder of concept modules (default {concept_dir()})")
    parser.add_argument("--json", action="store_true", help="print JSON instead of tables")
    add_db_argument(parser)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.top_features < 1 or args.corpus_sample < 0:
        raise UsageError(f"--top-features={args.top_features} must be >= 1 and --corpus-sample={args.corpus_sample} >= 0")
    console = make_console()
    folder = args.modules or concept_dir()
    modules = load_modules(folder)
    if args.name is not None and not args.custom_texts:
        raise UsageError("--name names a --custom-texts concept; give --custom-texts FILE too")
    if args.name is not None and not args.name.strip():
        raise UsageError(f"--name={args.name!r} must be a non-empty concept name")
    if args.custom_texts:
        targets = [args.name.strip() if args.name else args.custom_texts.stem]
        if targets[0] in modules:  # the file replaces the module of that name rather than competing with it
            del modules[targets[0]]
        modules[targets[0]] = read_texts(args.custom_texts)
    elif args.all:
        targets = list(modules)
    else:
        targets = [name.strip() for name in args.concepts.split(",") if name.strip()]
        load_modules(folder, targets)  # names are checked against the folder, with the valid ones listed
    started = time.time()
    with open_store(args.db) as store:
        run = open_run(store, args.run)
        source = run.recipe.open()
        sample = corpus_sample(run.recipe.texts()[1], args.corpus_sample, seed=run.config["seed"])
        texts = [t for name in modules for t in modules[name]] + sample
        owner = [name for name in modules for _ in modules[name]] + ["(corpus)"] * len(sample)
        tokens = source.tokens
        maxima = text_maxima(run.sae, source.model, source.module, tokens.tokenizer, texts,
                             prefix=tokens.bos if tokens.bos is not None else tokens.separator, special=tokens.special,
                             context_size=run.config["context_size"], outlier_factor=source.recipe.outlier_factor,
                             transcode=source.recipe.transcode)
        results = {}
        for name in targets:
            mine = torch.tensor([o == name for o in owner])
            scores = selectivity(maxima[mine], maxima[~mine])
            rows = ranked(scores, args.top_features)
            store.add_concept_scores(run.id, name, rows)
            results[name] = {"scores": scores, "rows": rows}
        features = sorted({r["feature_index"] for res in results.values() for r in res["rows"]})
        best = {e["feature_index"]: e for e in store.feature_examples(run.id, features=features, kind="top", max_rank=1)}
    if args.json:
        print_json({"run": run.id, "texts": len(texts), "corpus_sample": len(sample),
                    "concepts": {name: {"n_concept": res["scores"].n_concept, "n_contrast": res["scores"].n_contrast,
                                        "features": res["rows"]} for name, res in results.items()}})
        return 0
    console.print(f"run {run.id}: {len(texts)} texts ({len(sample)} corpus sentences) through {run.row['hook']} "
                  f"in {time.time() - started:.0f}s; score = AUROC of per-text max activation, concept vs contrast "
                  "(0.5 = chance)", markup=False)
    if args.all:
        _summary(console, results, best)
    else:
        for name, res in results.items():
            _ranking(console, name, res, best)
    if len(results) > 1:
        _matrix(console, results)
    return 0


def _ranking(console: Console, name: str, res: dict, best: dict) -> None:
    scores = res["scores"]
    table = make_table(console, "rank", "feature", "AUROC", "fires (concept)", "fires (contrast)", "mean (concept)",
                       "mean (contrast)", "strongest corpus example",
                       title=f"{name}: {scores.n_concept} concept vs {scores.n_contrast} contrast texts",
                       right=("rank", "feature", "AUROC", "fires (concept)", "fires (contrast)", "mean (concept)",
                              "mean (contrast)"))
    for r in res["rows"]:
        example = best.get(r["feature_index"])
        table.add_row(str(r["rank"] + 1), str(r["feature_index"]), f"{r['score']:.3f}", percent(r["fire_rate_concept"]),
                      percent(r["fire_rate_contrast"]), number(r["mean_concept"]), number(r["mean_contrast"]),
                      preview(example, console, 50) if example else "")
    console.print(table)


def _summary(console: Console, results: dict, best: dict) -> None:
    table = make_table(console, "concept", "best feature", "AUROC", "fires (concept)", "fires (contrast)",
                       "strongest corpus example", title="best feature per concept",
                       right=("best feature", "AUROC", "fires (concept)", "fires (contrast)"))
    for name, res in results.items():
        r = res["rows"][0]
        example = best.get(r["feature_index"])
        table.add_row(name, str(r["feature_index"]), f"{r['score']:.3f}", percent(r["fire_rate_concept"]),
                      percent(r["fire_rate_contrast"]), preview(example, console, 50) if example else "")
    console.print(table)


def _matrix(console: Console, results: dict) -> None:
    """Concept × feature: each concept's best feature scored against every concept, to show overlap."""
    columns = list(dict.fromkeys(res["rows"][0]["feature_index"] for res in results.values()))
    table = make_table(console, "concept", *(f"f{f}" for f in columns), title="AUROC of each concept's best feature",
                       right=tuple(f"f{f}" for f in columns))
    for name, res in results.items():
        table.add_row(name, *(f"{float(res['scores'].auroc[f]):.2f}" for f in columns))
    console.print(table)


if __name__ == "__main__":
    run_tool(main)
