"""`python -m midisc.explore`: the runs in the database and the features they found.

    python -m midisc.explore list [--status completed] [--model NAME] [--sweep multirun/2026-11-24/10-00-00]
    python -m midisc.explore sweeps
    python -m midisc.explore compare SWEEP [--plot frontier.png]       # SWEEP: its folder, its tail, or latest
    python -m midisc.explore top RUN [--by frequency|max|mean] [--n 20]
    python -m midisc.explore analyze RUN
    python -m midisc.explore details RUN FEATURE [--no-model]
    python -m midisc.explore explanations RUN [--search TEXT]              # from python -m midisc.autointerp

Every command takes --json (for scripts) and --db URL. Everything shown comes from the database, so no
model is needed, except for a feature's output tokens in `details` (skipped with --no-model).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console
from rich.text import Text

from midisc.analysis import plots, sweeps
from midisc.cli import (UsageError, add_db_argument, db_hint, heat, make_console, make_table, number, open_store, percent, preview,
                        print_json, run_tool)
from midisc.analysis.features import frequency_bins, log_density_histogram
from midisc.analysis.overview import quality_notes, run_overview
from midisc.training.reopen import logit_effects

SORT_KEYS = {"frequency": "frequency", "max": "max_activation", "mean": "mean_activation"}


# ----- commands --------------------------------------------------------------------------------


def sweep_runs(store, name: str) -> tuple[str, list[dict]]:
    """(sweep id, its runs) for a sweep named as `sweeps.resolve` accepts."""
    try:
        sweep_id = sweeps.resolve(name, store.sweeps())
    except sweeps.SweepError as err:
        # Runs recorded before sweeps had ids are still found by their folder.
        folder = Path(name).expanduser().resolve()
        legacy = store.list_runs(output_under=str(folder) + "/") if folder.is_dir() else []
        if not legacy:
            raise UsageError(str(err)) from None
        return str(folder), legacy
    return sweep_id, store.list_runs(sweep_id=sweep_id)


def cmd_list(args: argparse.Namespace, console: Console) -> int:
    with open_store(args.db) as store:
        if args.sweep:
            _, runs = sweep_runs(store, args.sweep)
            runs = [r for r in runs if (args.status is None or r["status"] == args.status)
                    and (args.model is None or r["model"] == args.model)]
        else:
            runs = store.list_runs(status=args.status, model=args.model)
    rows = [{"id": r["id"], "started_at": r["started_at"].isoformat(timespec="seconds"), "status": r["status"],
             "model": r["model"], "hook": r["hook"], "architecture": r["architecture"], "width": r["d_sae"],
             "tokens": r["n_tokens"], "fvu": r["fvu"], "l0": r["l0"], "dead_frac": r["dead_frac"],
             "alive_features": (r["metrics"] or {}).get("alive_features"), "output_dir": r["output_dir"],
             "sweep_id": r.get("sweep_id"), "overrides": r.get("overrides")}
            for r in runs]
    if args.json:
        print_json(rows)
        return 0
    if not rows:
        console.print("no runs match" if (args.status or args.model or args.sweep) else
                      "no runs yet: train one with python -m midisc.train")
        return 0
    table = make_table(console, "id", "started (UTC)", "status", "model", "hook", "arch", "width", "tokens", "FVU",
                       "L0", "dead", "alive", right=("id", "width", "tokens", "FVU", "L0", "dead", "alive"))
    for r in rows:
        alive = r["alive_features"]
        table.add_row(str(r["id"]), r["started_at"][:16].replace("T", " "), r["status"], _short_model(r["model"]),
                      r["hook"], r["architecture"], number(r["width"]), number(r["tokens"]), number(r["fvu"]),
                      number(r["l0"]), percent(r["dead_frac"]), "-" if alive is None else f"{int(alive):,}")
    console.print(table)
    console.print(DEAD_IN_TABLES)
    return 0


def cmd_sweeps(args: argparse.Namespace, console: Console) -> int:
    with open_store(args.db) as store:
        rows = [{**s, "started_at": s["started_at"].isoformat(timespec="seconds")} for s in store.sweeps()]
    if args.json:
        print_json(rows)
        return 0
    if not rows:
        console.print("no sweeps yet: run one with python -m midisc.train -m sae.k=16,32,64")
        return 0
    table = make_table(console, "sweep", "runs", "started (UTC)", right=("runs",))
    for row in rows:
        table.add_row(row["sweep_id"], str(row["runs"]), row["started_at"][:16].replace("T", " "))
    console.print(table)
    return 0


def cmd_compare(args: argparse.Namespace, console: Console) -> int:
    with open_store(args.db) as store:
        sweep_id, runs = sweep_runs(store, args.sweep)
    rows = sweeps.comparison(runs)
    # Each point named by what set its job apart when that is short (sae.k=16), else by its run id.
    points = [(r["l0"], r["fvu"], r["job"] if len(r["job"]) <= 24 and r["job"] != "-" else f"run {r['id']}")
              for r in rows if r["l0"] is not None and r["fvu"] is not None]
    plot = Path(args.plot) if args.plot else _default_plot(sweep_id)
    if points:
        plots.frontier(points, plot, title=f"Sparsity–fidelity frontier: {Path(sweep_id).name}")
    if args.json:
        print_json({"sweep_id": sweep_id, "plot": str(plot) if points else None, "runs": rows})
        return 0
    console.print(f"sweep {sweep_id}: {len(rows)} runs, by L0", markup=False, highlight=False, soft_wrap=True)
    table = make_table(console, "id", "status", "job", "width", "L0", "FVU", "MSE", "dead", "CE rec.", "KL score",
                       "frontier", right=("id", "width", "L0", "FVU", "MSE", "dead", "CE rec.", "KL score"))
    for r in rows:
        table.add_row(str(r["id"]), r["status"], r["job"], number(r["width"]), number(r["l0"]), number(r["fvu"]),
                      number(r["mse"]), percent(r["dead_frac"]), number(r["ce_loss_score"]),
                      number(r["kl_div_score"]), "*" if r["frontier"] else "")
    console.print(table)
    console.print(DEAD_IN_TABLES)
    console.print(f"frontier plot (L0 vs FVU): {plot}" if points else "no finished runs yet: nothing to plot")
    return 0


def _default_plot(sweep_id: str) -> Path:
    folder = Path(sweep_id)
    return (folder if folder.is_dir() else Path.cwd()) / "frontier.png"


# "dead" means three things in three places; the tables say which (evaluate's is SAEBench's, on held-out tokens).
DEAD_IN_TABLES = "dead: features not fired in the run's last dead_window training tokens (its config's dead_window)"


def _short_model(name: str) -> str:
    return name if len(name) <= 40 else "…" + name[-39:]


def _features(store, run_id: int, db: str) -> list[dict]:
    features = store.features(run_id)
    if not features:
        run = store.get_run(run_id)
        raise UsageError(f"run {run_id} ({run['status']}) has no analysed features; "
                         f"completed runs have them, or run python -m midisc.analyze {run_id}{db}")
    return features


def cmd_top(args: argparse.Namespace, console: Console) -> int:
    if args.n < 1:
        raise UsageError(f"--n={args.n} must be at least 1")
    with open_store(args.db) as store:
        features = _features(store, args.run, db_hint(args))
        key = SORT_KEYS[args.by]
        ranked = sorted((f for f in features if f["frequency"]), key=lambda f: -(f[key] or 0.0))[: args.n]
        best = {e["feature_index"]: e for e in store.feature_examples(
            args.run, features=[f["feature_index"] for f in ranked], kind="top", max_rank=1)}
    rows = [{"feature": f["feature_index"], "frequency": f["frequency"], "mean_activation": f["mean_activation"],
             "max_activation": f["max_activation"], "is_dead": f["is_dead"],
             "example": best.get(f["feature_index"])} for f in ranked]
    if args.json:
        print_json(rows)
        return 0
    table = make_table(console, "feature", "freq", "mean", "max", "strongest example",
                       title=f"run {args.run}: top {len(rows)} of {len(features):,} features by {args.by}",
                       right=("feature", "freq", "mean", "max"))
    for r in rows:
        table.add_row(str(r["feature"]), percent(r["frequency"]), number(r["mean_activation"]),
                      number(r["max_activation"]), preview(r["example"], console) if r["example"] else "")
    console.print(table)
    return 0


def cmd_analyze(args: argparse.Namespace, console: Console) -> int:
    with open_store(args.db) as store:
        run = store.get_run(args.run)
        epochs = store.epoch_metrics(args.run)
        features = store.features(args.run)
    frequency = [f["frequency"] or 0.0 for f in features]
    bins = frequency_bins(frequency) if features else {}
    edges, counts, never = log_density_histogram(frequency) if features else ([], [], 0)
    report = {"run": run_overview(run), "metrics": run["metrics"] or {},
              "epochs": [{"epoch": e["epoch"], "step": e["step"], **e["metrics"]} for e in epochs],
              "frequency_bins": bins, "log10_density_histogram": {"edges": edges, "counts": counts, "never": never},
              "notes": quality_notes(run, features, db_hint(args))}
    if args.json:
        print_json(report)
        return 0
    overview = make_table(console, "setting", "value", title=f"run {args.run}")
    for name, value in report["run"].items():
        overview.add_row(name, str(value))
    console.print(overview)
    if report["metrics"]:
        metrics = make_table(console, *report["metrics"], title="final held-out metrics", right=tuple(report["metrics"]))
        metrics.add_row(*(number(v, 4) for v in report["metrics"].values()))
        console.print(metrics)
    if epochs:
        names = [n for n in ("train/loss", "train/fvu", "train/l0", "val/fvu", "val/l0", "sparsity/dead_frac")
                 if any(n in e["metrics"] for e in epochs)]
        curve = make_table(console, "epoch", "step", *names, title="by epoch", right=("epoch", "step", *names))
        for e in epochs:
            curve.add_row(str(e["epoch"]), str(e["step"]), *(number(e["metrics"].get(n), 4) for n in names))
        console.print(curve)
    if features:
        table = make_table(console, "firing frequency", "features", "share", title="features by firing frequency",
                           right=("features", "share"))
        for name, count in bins.items():
            table.add_row(name, f"{count:,}", percent(count / len(features)))
        console.print(table)
        console.print(_histogram_text(edges, counts, never))
    console.print("[bold]notes[/bold]" if console.is_terminal else "notes")
    for note in report["notes"]:
        console.print(f"  - {note}", markup=False)
    return 0


def _histogram_text(edges: list[float], counts: list[int], never: int) -> Text:
    text = Text("log10 firing frequency (features)\n")
    most = max(counts, default=0) or 1
    for low, high, count in zip(edges, edges[1:], counts):
        text.append(f"  [{low:6.2f}, {high:6.2f})  {'#' * round(40 * count / most):<40} {count}\n")
    if never:
        text.append(f"  never fired        {never}\n")
    return text


def cmd_explanations(args: argparse.Namespace, console: Console) -> int:
    with open_store(args.db) as store:
        rows = store.explanations(args.run, search=args.search)
    if args.json:
        print_json(rows)
        return 0
    if not rows:
        said = f" matching {args.search!r}" if args.search else ""
        console.print(f"run {args.run} has no explanations{said}; "
                      f"make them with python -m midisc.autointerp {args.run}{db_hint(args)}", markup=False)
        return 0
    table = make_table(console, "feature", "explanation", "detection", "fuzzing", "explainer",
                       title=f"run {args.run}: {len(rows)} explanations (balanced accuracy; shuffled baseline in "
                             "brackets, 0.5 is chance)", right=("feature", "detection", "fuzzing"))
    for r in rows:
        table.add_row(str(r["feature_index"]), r["explanation"],
                      f"{number(r['detection'], 2)} ({number(r['baseline_detection'], 2)})",
                      f"{number(r['fuzzing'], 2)} ({number(r['baseline_fuzzing'], 2)})",
                      f"{r['explainer']} {r['prompt_version']}")
    console.print(table)
    return 0


def cmd_details(args: argparse.Namespace, console: Console) -> int:
    with open_store(args.db) as store:
        features = _features(store, args.run, db_hint(args))
        if not 0 <= args.feature < len(features):
            raise UsageError(f"run {args.run} has no feature {args.feature}; its features are 0-{len(features) - 1}")
        feature = features[args.feature]
        examples = store.feature_examples(args.run, features=[args.feature])
        explained = store.explanations(args.run, features=[args.feature])
        effects = None if args.no_model else logit_effects(store, args.run, args.feature, args.n_tokens)
    by_freq = sorted(features, key=lambda f: -(f["frequency"] or 0.0))
    report = {"feature": args.feature, "frequency": feature["frequency"], "mean_activation": feature["mean_activation"],
              "max_activation": feature["max_activation"], "is_dead": feature["is_dead"],
              "frequency_rank": by_freq.index(feature) + 1, "examples": examples, "output_tokens": effects,
              "explanations": explained}
    if args.json:
        print_json(report)
        return 0
    console.print(f"run {args.run}, feature {args.feature}: fires on {percent(feature['frequency'])} of tokens "
                  f"(rank {report['frequency_rank']:,} of {len(features):,}), mean {number(feature['mean_activation'])}, "
                  f"max {number(feature['max_activation'])}" + (", dead in training" if feature["is_dead"] else ""),
                  markup=False)
    for e in explained:
        scores = (f"; detection {number(e['detection'], 2)} (shuffled {number(e['baseline_detection'], 2)}), fuzzing "
                  f"{number(e['fuzzing'], 2)} (shuffled {number(e['baseline_fuzzing'], 2)})") if e["scorer"] else ""
        console.print(f"explanation ({e['explainer']}, {e['prompt_version']}): {e['explanation']}{scores}", markup=False)
    if not examples:
        console.print("no examples: the feature never fired on the analysed tokens")
    for kind, title in (("top", "strongest examples"), ("quantile", "examples sampled from all its firing tokens")):
        chosen = [e for e in examples if e["kind"] == kind][: args.n]
        if chosen:
            table = make_table(console, "act", "context (colour: activation)", title=title, right=("act",))
            for e in chosen:
                table.add_row(number(e["activation"]), heat(e, console))
            console.print(table)
    if isinstance(effects, dict):
        table = make_table(console, "boosted", "logit", "suppressed", "logit", title="output tokens (W_dec row · W_U)",
                           right=("logit",))
        for (up, up_v), (down, down_v) in zip(effects["boosted"], effects["suppressed"]):
            table.add_row(repr(up), f"{up_v:+.3f}", repr(down), f"{down_v:+.3f}")
        console.print(table)
    elif isinstance(effects, str):
        console.print(f"output tokens: {effects}", markup=False)
    return 0


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m midisc.explore", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    def command(name: str, help_: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_, description=help_)
        sub.add_argument("--json", action="store_true", help="print JSON instead of tables")
        add_db_argument(sub)
        return sub

    listing = command("list", "every run, newest first")
    listing.add_argument("--status", choices=("running", "completed", "failed", "interrupted"))
    listing.add_argument("--model", help="only runs of this model name")
    listing.add_argument("--sweep", metavar="SWEEP",
                         help="only the runs of one Hydra multirun: its folder, the folder's tail, or 'latest'")
    command("sweeps", "every sweep (Hydra multirun) in the database, newest first")
    compare = command("compare", "the runs of one sweep side by side, and their L0-vs-FVU frontier as a PNG")
    compare.add_argument("sweep", help="the sweep folder (multirun/<date>/<time>), its tail, or 'latest'")
    compare.add_argument("--plot", metavar="PNG", help="where to write the plot (default: frontier.png in the "
                                                         "sweep folder)")
    top = command("top", "the top features of a run, with their strongest example")
    top.add_argument("run", type=int)
    top.add_argument("--by", choices=tuple(SORT_KEYS), default="frequency")
    top.add_argument("--n", type=int, default=20, help="how many features (default 20)")
    analysis = command("analyze", "a run's settings, metrics, epoch curve, frequency bins and quality notes")
    analysis.add_argument("run", type=int)
    details = command("details", "one feature: statistics, examples coloured by activation, output tokens")
    details.add_argument("run", type=int)
    details.add_argument("feature", type=int)
    details.add_argument("--n", type=int, default=10, help="examples of each kind to show (default 10)")
    details.add_argument("--n-tokens", type=int, default=10, help="boosted/suppressed output tokens (default 10)")
    details.add_argument("--no-model", action="store_true", help="skip the output tokens (they load the model)")
    explained = command("explanations", "a run's features explained in words (python -m midisc.autointerp)")
    explained.add_argument("run", type=int)
    explained.add_argument("--search", metavar="TEXT", help="only explanations containing TEXT (any case)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    handler = {"list": cmd_list, "sweeps": cmd_sweeps, "compare": cmd_compare, "top": cmd_top, "analyze": cmd_analyze,
               "details": cmd_details, "explanations": cmd_explanations}[args.command]
    return handler(args, make_console())


if __name__ == "__main__":
    run_tool(main)
