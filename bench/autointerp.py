"""Auto-interpretation with the bundled explainer: explanations per minute, and how much its explanations tell.

Runs the real command, `python -m midisc.autointerp RUN --top N --json`, on a copy of the database (the
user's own rows are never touched), and reads its summary: features explained per minute (explaining and
scoring together, loading the explainer included; the run's own forward for quiet windows is not), tokens,
and the mean detection and fuzzing balanced accuracy against the same scorer given shuffled explanations (the
baseline, measured in the same run). An explainer worth using scores clearly above its baseline; 0.5 is chance.

    python bench/autointerp.py --db sqlite:///outputs/midisc.db --run 1   # the default run's 100 most frequent
    python bench/autointerp.py --quick                                    # a tiny run and tiny explainer (CI)

The full mode needs a default run (`python -m midisc.train`) in a SQLite database; it takes about an hour
on 2 CPU cores for 100 features with SmolLM2-135M-Instruct explaining and scoring. --quick trains a tiny
random model's run and lets that model explain 8 features: it checks the pipeline, not quality.

Measured on 2 CPU cores, 2026-12-03, default run, 20 most frequent features (--features 20): see README.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from output import result, table

REPO = Path(__file__).resolve().parents[1]
TARGET_MARGIN = 0.05  # detection above the shuffled baseline by this much counts as "explanations tell something"


def tiny_run(work: Path) -> tuple[str, int, list[str]]:
    """A tiny trained run in a fresh SQLite file: (database URL, run id, overrides that make its model explain)."""
    from tiny import run_overrides

    db = work / "tiny.db"
    overrides = run_overrides(work, texts=60)
    done = subprocess.run([sys.executable, "-m", "midisc.train", *overrides, f"storage.url=sqlite:///{db}",
                           f"hydra.run.dir={work / 'run'}", "trainer.enable_progress_bar=false"], cwd=work,
                          capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise SystemExit(f"the tiny run failed: {done.stderr[-2000:]}")
    model = next(o.split("=", 1)[1] for o in overrides if o.startswith("model.name="))
    return f"sqlite:///{db}", 1, [f"explainer.name={model}", "explainer.gguf_package=null",
                                  "explainer.gguf_file=null", "explainer.max_new_tokens=8", "pool_contexts=8"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--db", default="sqlite:///outputs/midisc.db", help="a SQLite database with the run")
    parser.add_argument("--run", type=int, default=1, help="the run to explain (the default run)")
    parser.add_argument("--features", type=int, default=100, help="the N most frequent features")
    parser.add_argument("--quick", action="store_true", help="a tiny run explained by its tiny model (seconds)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if args.quick:
            url, run_id, extra = tiny_run(work)
            features = 8
        else:
            source = Path(args.db.removeprefix("sqlite:///"))
            if not args.db.startswith("sqlite:///") or not source.is_file():
                raise SystemExit(f"--db {args.db}: give the SQLite database of a default run "
                                 "(python -m midisc.train makes sqlite:///outputs/midisc.db)")
            shutil.copy(source, work / "copy.db")
            url, run_id, extra, features = f"sqlite:///{work / 'copy.db'}", args.run, [], args.features
        done = subprocess.run([sys.executable, "-m", "midisc.autointerp", str(run_id), "--top", str(features),
                               "--db", url, "--json", *extra], cwd=work, capture_output=True, text=True,
                              timeout=6 * 3600, env={**os.environ, "PYTHONPATH": str(REPO)})
        if done.returncode != 0:
            raise SystemExit(f"autointerp failed: {done.stderr[-2000:]}")
        summary = json.loads(done.stdout)
    per_minute = summary["explained"] / (summary["seconds"] / 60) if summary["seconds"] else None
    rows = [{"explainer": summary["explainer"], "features": summary["explained"], "seconds": summary["seconds"],
             "per_minute": per_minute, "tokens": summary["tokens"], "detection": summary["detection"],
             "baseline_detection": summary["baseline_detection"], "fuzzing": summary["fuzzing"],
             "baseline_fuzzing": summary["baseline_fuzzing"]}]
    margin = (None if summary["detection"] is None or summary["baseline_detection"] is None
              else summary["detection"] - summary["baseline_detection"])
    table(f"auto-interpretation of {summary['explained']} features (balanced accuracy; 0.5 is chance)",
          ["explainer", "features", "s", "per min", "tokens", "detection", "shuffled", "fuzzing", "shuffled"],
          [[r["explainer"], r["features"], r["seconds"], r["per_minute"], r["tokens"], r["detection"],
            r["baseline_detection"], r["fuzzing"], r["baseline_fuzzing"]] for r in rows])
    result({"rows": rows, "detection_margin": margin,
            "targets_met": bool(margin is not None and margin >= TARGET_MARGIN)})


if __name__ == "__main__":
    main()
