"""`python -m midisc.analyze RUN`: analyse every feature of a recorded run again, and store the result.

    python -m midisc.analyze 3                    # the run's held-out texts, as at the end of training
    python -m midisc.analyze 3 --tokens 100000    # more tokens: held-out first, then training texts

Training already does this over the held-out texts; run it again for more tokens or other example
settings. It reloads the run's model and SAE, harvests activations exactly as the run did, and replaces
the run's feature statistics and examples in the database (`explore` then shows the new ones), and
makes the run's exports again from them (SAELens sparsity, Neuronpedia package, dashboards), so no file
in the run folder describes the analysis it replaced.
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from midisc.analysis.features import frequency_bins
from midisc.cli import UsageError, add_db_argument, db_hint, make_console, open_store, run_tool
from midisc.data import lm
from midisc.data.activations import ContextChunk
from midisc.training.finish import analyze_features, record_analysis, republish
from midisc.training.reopen import open_run


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m midisc.analyze", description=__doc__.split("\n")[0])
    parser.add_argument("run", type=int, help="run id (python -m midisc.explore list)")
    parser.add_argument("--tokens", type=int, default=None,
                        help="tokens to analyse (default: all held-out texts; more draws on training texts)")
    parser.add_argument("--n-top", type=int, default=None, help="strongest examples per feature (default: the run's)")
    parser.add_argument("--n-quantile", type=int, default=None, help="sampled examples per feature (default: the run's)")
    add_db_argument(parser)
    return parser.parse_args(argv)


def keeping_heldout(chunks: Iterator[ContextChunk], n_heldout: int, kept: list[torch.Tensor]) -> Iterator[ContextChunk]:
    """`chunks`, passed on, with the activations of the first `n_heldout` contexts (the held-out texts) kept."""
    for chunk in chunks:
        inside = min(len(chunk.tokens), n_heldout - chunk.first)
        if inside > 0:
            kept.append(chunk.acts[: int(chunk.keep[:inside].sum())])
        yield chunk


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.tokens is not None and args.tokens < 1:
        raise UsageError(f"--tokens={args.tokens} must be a positive number of tokens")
    console = make_console()
    started = time.time()
    with open_store(args.db) as store:
        run = open_run(store, args.run)
        options = dict(run.config.get("analysis") or {})
        for key, value in (("n_top", args.n_top), ("n_quantile", args.n_quantile)):
            if value is not None:
                options[key] = value
        try:
            source = run.recipe.open()
        except lm.ModelError as err:
            raise lm.ModelError(f"run {run.id} needs its model to be analysed again: {err}") from None
        train_texts, heldout_texts = run.recipe.texts()
        ctx = source.tokens.pack(heldout_texts)
        n_heldout = len(ctx)
        if args.tokens is not None:
            wanted = math.ceil(args.tokens / run.config["context_size"])
            if wanted > len(ctx):  # only then pay for tokenising the training texts
                ctx = torch.cat([ctx, source.tokens.pack(train_texts)])
            ctx = ctx[:wanted]
        known = store.features(run.id)
        # Dead means "no firing in training's last window" when training said so; else never fired here.
        dead = [f["is_dead"] for f in known] if len(known) == run.sae.d_sae else None
        heldout_acts: list[torch.Tensor] = []  # the exports' histograms reuse them: one forward fewer
        chunks = keeping_heldout(source.chunks(ctx, progress="feature analysis"), n_heldout, heldout_acts)
        try:
            analysed = analyze_features(run.sae, chunks, source.tokens.decode(), options, dead)
        except ValueError as err:  # bad example options: name them
            raise UsageError(str(err)) from None
        written = record_analysis(store, run.id, analysed)
        # The run's exports were made from the rows just replaced: make them again, or they would contradict them.
        exports = None
        if run.row["status"] == "completed" and Path(run.row["output_dir"]).is_dir():
            exports = republish(store, run, source, heldout_acts if len(ctx) >= n_heldout else None, neuronpedia=bool((run.config.get("export") or {})
                                                                     .get("neuronpedia", True)))
    result = analysed.analysis
    bins = frequency_bins(result.stats.frequency.tolist())
    console.print(f"run {run.id}: analysed {result.stats.n_tokens:,} tokens in {len(ctx)} contexts "
                  f"in {time.time() - started:.0f}s; stored {run.sae.d_sae:,} features and {written:,} examples")
    console.print("features by firing frequency: " + "  ".join(f"{k} {v}" for k, v in bins.items()))
    if exports is not None:
        console.print(f"exports made again from the new analysis: {exports.saelens}"
                      + "".join(f", {p}" for p in (exports.package, exports.dashboard) if p))
    console.print(f"next: python -m midisc.explore top {run.id}{db_hint(args)}")
    return 0


if __name__ == "__main__":
    run_tool(main)
