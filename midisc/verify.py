"""`python -m midisc.verify RUN_OR_FOLDER`: check a run's published files before anyone else sees them.

    python -m midisc.verify 3                       # run 3 of the database: its folder and its records
    python -m midisc.verify outputs/2026-11-24/10-02-11 [--db URL]
    python -m midisc.verify 3 --visualize           # also plots/*.png for a paper or a report
    python -m midisc.verify 3 --package             # also one .tar.gz to upload, written only if all pass

Each named check prints PASS, FAIL or SKIP with its reason (see `checks.py`); the exit status is 1 if any
check fails. The report is also written to verification.json in the run folder.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import tarfile
import time
from dataclasses import asdict
from pathlib import Path


from midisc.analysis import plots
from midisc.data import lm
from midisc.publish.check_target import FAIL, PASS, SKIP, Skipped, Target
from midisc.publish.checks import run_checks
from midisc.cli import UsageError, add_db_argument, db_hint, make_console, make_table, open_store, print_json, run_tool
from midisc.analysis.metrics import reconstruction_metrics
from midisc.training.reopen import RunError, open_run
from midisc.store import Store, StoreError
from midisc.run_folder import (ANALYSIS_FILENAME, CFG_FILENAME, CURVES_FILENAME, EXPORTS_FOLDER, PACKAGE_SUFFIX,
                               PROBE_FILENAME, REPORT_FILENAME, SAE_FOLDER)

PLOTS_FOLDER = "plots"


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m midisc.verify", description=__doc__.split("\n")[0])
    parser.add_argument("target", help="run id, run folder, or SAELens folder (with cfg.json)")
    parser.add_argument("--visualize", action="store_true", help="write PNG plots to <run folder>/plots/")
    parser.add_argument("--package", action="store_true", help="write <run>_publish.tar.gz if every check passes")
    parser.add_argument("--no-model", action="store_true", help="skip the check that reloads the model")
    parser.add_argument("--tokens", type=int, default=8192, help="fresh tokens for the reconstruction check")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    add_db_argument(parser)
    return parser.parse_args(argv)


def _find_record(store: Store | None, output_dir: Path) -> dict | None:
    if store is None:
        return None
    wanted = output_dir.resolve()
    return next((run for run in store.list_runs() if Path(run["output_dir"]).resolve() == wanted), None)


def _one(folder: Path, pattern: str) -> Path | None:
    found = sorted(p for p in folder.glob(pattern) if p.is_dir())
    return found[0] if len(found) == 1 else None


def _dashboard(output_dir: Path, sae_dir: Path) -> Path | None:
    """The dashboard folder the SAE's cfg.json names (the latest export), else the only one there is."""
    try:
        named = json.loads((sae_dir / CFG_FILENAME).read_text())["metadata"]["neuronpedia_id"]
    except (OSError, ValueError, KeyError, TypeError):
        named = None
    if named and (output_dir / EXPORTS_FOLDER / named).is_dir():
        return output_dir / EXPORTS_FOLDER / named
    return _one(output_dir, f"{EXPORTS_FOLDER}/*/*")


def make_target(args: argparse.Namespace, store: Store | None) -> tuple[Target, dict | None]:
    run = None
    if args.target.isdigit():
        if store is None:
            raise UsageError(f"run {args.target}: no database to look it up in (pass --db URL)")
        run = store.get_run(int(args.target))
        output_dir = Path(run["output_dir"])
    else:
        path = Path(args.target)
        if not path.exists():
            raise UsageError(f"{path} does not exist; give a run id, a run folder or a SAELens folder")
        output_dir = path.parent if (path / CFG_FILENAME).is_file() else path
        run = _find_record(store, output_dir)
    saved = (store.sae_models(run["id"]) or [None])[-1] if run else None
    sae_dir = Path(saved["path"]) if saved else output_dir / SAE_FOLDER
    if not sae_dir.is_dir():
        raise UsageError(f"no SAE folder at {sae_dir}; is {output_dir} a midisc run folder?")
    export = ((run or {}).get("config") or {}).get("export") or {}
    target = Target(output_dir=output_dir, sae_dir=sae_dir, package_dir=_one(output_dir, f"*{PACKAGE_SUFFIX}"),
                    dashboard_dir=_dashboard(output_dir, sae_dir),
                    expect_neuronpedia=export.get("neuronpedia", True), run=run, saved=saved,
                    features=store.features(run["id"]) if run else None, db=db_hint(args))
    return target, run


def fresh_fvu(store: Store, run_id: int, tokens: int):
    """A measurement for the fresh-reconstruction check: FVU over held-out texts harvested again now."""
    def measure() -> tuple[float, int]:
        try:
            run = open_run(store, run_id)
            source = run.recipe.open()
        except (lm.ModelError, RunError) as err:
            raise Skipped(f"the run's model does not load: {err}") from None
        ctx = source.heldout_contexts()
        ctx = ctx[: max(1, math.ceil(tokens / run.config["context_size"]))]
        acts = [chunk.acts for chunk in source.chunks(ctx, progress="fresh activations")]
        return reconstruction_metrics(run.sae, acts)["fvu"], sum(len(a) for a in acts)
    return measure


def visualize(target: Target, store: Store | None) -> list[Path]:
    folder = target.output_dir / PLOTS_FOLDER
    if target.features is not None:
        frequency = [f["frequency"] for f in target.features]
        peaks = [f["max_activation"] if f["frequency"] else None for f in target.features]
    else:
        rows = json.loads((target.package_file(ANALYSIS_FILENAME)).read_text())["features"]
        frequency, peaks = [r["frequency"] for r in rows], [r["max_activation"] for r in rows]
    title = f"run {target.run['id']}" if target.run else target.output_dir.name
    written = [plots.density_histogram(frequency, folder / "feature_density.png", title=f"Feature density, {title}"),
               plots.frequency_vs_max(frequency, peaks, folder / "frequency_vs_max.png",
                                      title=f"Feature frequency vs max activation, {title}")]
    steps = []
    if (target.output_dir / CURVES_FILENAME).is_file():
        with open(target.output_dir / CURVES_FILENAME) as f:
            steps = [{k: float(v) for k, v in row.items() if v not in ("", None)} for row in csv.DictReader(f)]
    epochs = [{"step": e["step"], **e["metrics"]} for e in store.epoch_metrics(target.run["id"])] \
        if store is not None and target.run else []
    written.append(plots.training_curves(steps, folder / "training_curves.png", epochs=epochs,
                                         title=f"Training curves, {title}"))
    return written


def package(target: Target, run: dict | None) -> Path:
    name = f"run-{run['id']}" if run else target.output_dir.name
    path = target.output_dir / f"{name}_publish.tar.gz"
    # The one set that was verified: the dashboards the SAE's cfg.json names, not every set under exports/.
    members = [target.sae_dir, target.package_dir, target.dashboard_dir, target.output_dir / PLOTS_FOLDER,
               target.output_dir / REPORT_FILENAME, target.output_dir / PROBE_FILENAME]
    partial = path.with_suffix(".partial")
    with tarfile.open(partial, "w:gz") as tar:
        for member in members:
            if member is not None and member.exists():
                inside = member.relative_to(target.output_dir) if member.is_relative_to(target.output_dir) else member.name
                tar.add(member, arcname=f"{name}/{inside}")
    partial.replace(path)  # never a half-written archive under the final name
    return path


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.tokens < 1:
        raise UsageError(f"--tokens={args.tokens} must be a positive number of tokens")
    console = make_console()
    started = time.time()
    try:
        store = open_store(args.db)
    except StoreError:
        if args.target.isdigit():
            raise
        store = None  # a folder can be checked without its database; the record checks then SKIP
    try:
        target, run = make_target(args, store)
        if run and not args.no_model and run["status"] == "completed":
            target.measure_fvu = fresh_fvu(store, run["id"], args.tokens)
        results = run_checks(target)
        failed = [r for r in results if r.status == FAIL]
        report = {"target": str(target.output_dir), "run_id": run["id"] if run else None,
                  "passed": not failed, "checks": [asdict(r) for r in results]}
        (target.output_dir / REPORT_FILENAME).write_text(json.dumps(report, indent=2) + "\n")
        extras = visualize(target, store) if args.visualize else []
        if args.package and not failed:
            extras.append(package(target, run))
    finally:
        if store is not None:
            store.close()
    if args.json:
        print_json({**report, "written": [str(p) for p in extras]})
    else:
        table = make_table(console, "check", "result", "reason", title=f"verify {target.output_dir}")
        colour = {PASS: "green", FAIL: "bold red", SKIP: "yellow"}
        for r in results:
            table.add_row(r.name, f"[{colour[r.status]}]{r.status}[/]", r.reason)
        console.print(table)
        counts = {s: sum(r.status == s for r in results) for s in (PASS, FAIL, SKIP)}
        console.print(f"{counts[PASS]} passed, {counts[FAIL]} failed, {counts[SKIP]} skipped "
                      f"in {time.time() - started:.0f}s")
        for path in extras:
            console.print(f"  wrote {path}")
        if args.package and failed:
            console.print("no package written: fix the failed checks first")
    return 1 if failed else 0


if __name__ == "__main__":
    run_tool(main)
