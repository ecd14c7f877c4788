"""`python -m midisc.autointerp RUN`: explain a run's features in words and score the explanations.

    python -m midisc.autointerp 1                               # the 50 most frequent features, bundled SmolLM2
    python -m midisc.autointerp 1 --features 0-99
    python -m midisc.autointerp 1 --top 20 --by max examples.explain=16
    python -m midisc.autointerp 1 --explainer openai explainer.url=http://127.0.0.1:8080/v1 explainer.name=qwen

Settings are Hydra's (conf/autointerp.yaml, conf/explainer/*.yaml), overridden as key=value after the options.
Each explanation and its scores go to the database as soon as they exist; run it again to continue where
it stopped (features explained by the same explainer with the same prompt version are skipped).
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from midisc.cli import UsageError, add_db_argument, db_hint, make_console, open_store, print_json, run_tool

CONF = Path(__file__).resolve().parents[1] / "conf"
BY = {"frequency": "frequency", "max": "max_activation", "mean": "mean_activation"}
EXPLAINERS = sorted(p.stem for p in (CONF / "explainer").glob("*.yaml"))


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m midisc.autointerp", description=__doc__.split("\n")[0])
    parser.add_argument("run", type=int, help="run id (python -m midisc.explore list)")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--features", default=None, help="feature numbers: 0-99, or 3,17,42")
    which.add_argument("--top", type=int, default=None, help="the N features first by --by (default: 50)")
    parser.add_argument("--by", choices=sorted(BY), default="frequency", help="what --top ranks by")
    parser.add_argument("--explainer", choices=EXPLAINERS, default=None, help="conf/explainer/NAME.yaml")
    parser.add_argument("--scorer", choices=EXPLAINERS, default=None, help="conf/explainer/NAME.yaml, set with "
                        "scorer.KEY=... (default: the explainer, with its settings, scores too)")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. examples.explain=16 explainer.name=m")
    add_db_argument(parser)
    return parser.parse_intermixed_args(argv)  # overrides may come before or after the options


def feature_list(text: str, width: int) -> list[int]:
    """'0-99' or '3,17,42' (or both, comma-separated) -> sorted feature numbers, each checked against the width."""
    found: set[int] = set()
    for part in text.split(","):
        match = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if not match:
            raise UsageError(f"--features={text!r}: {part!r} is not a feature number or a range like 0-99")
        low, high = int(match.group(1)), int(match.group(2) or match.group(1))
        if high < low or high >= width:
            raise UsageError(f"--features={text!r}: {part.strip()} is outside the run's features 0-{width - 1}")
        found.update(range(low, high + 1))
    return sorted(found)


def compose(args: argparse.Namespace):
    from hydra import compose as hydra_compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

    given = [o for o in args.overrides if o.startswith("scorer.")]
    if given and not args.scorer:
        raise UsageError(f"{given[0]} needs --scorer local|openai first: without it the explainer scores its own "
                         "explanations, with the explainer's settings")
    chosen = [f"explainer={args.explainer}"] if args.explainer else []
    chosen += [f"+explainer@scorer={args.scorer}"] if args.scorer else []
    try:
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            config = hydra_compose(config_name="autointerp", overrides=chosen + list(args.overrides))
        return OmegaConf.to_container(config, resolve=True, throw_on_missing=True)
    except MissingMandatoryValue as error:
        key = error.full_key
        raise UsageError(f"Missing mandatory value: {key}; give it on the command line, e.g. {key}=VALUE (for an "
                         "endpoint: the model name it serves)") from None
    except (HydraException, OmegaConfBaseException) as error:
        first = str(error).strip().splitlines()[0]
        raise UsageError(f"{first} (the settings: conf/autointerp.yaml and conf/explainer/{{{','.join(EXPLAINERS)}}}"
                         ".yaml)") from None


def chosen_features(store, run_id: int, args: argparse.Namespace, db: str) -> list[int]:
    width = store.feature_count(run_id)
    if width == 0:
        raise UsageError(f"run {run_id} has no analysed features; completed runs have them, or run "
                         f"python -m midisc.analyze {run_id}{db}")
    if args.features is not None:
        return feature_list(args.features, width)
    top = 50 if args.top is None else args.top
    if top < 1:
        raise UsageError(f"--top={top} must be at least 1")
    return sorted(r["feature_index"] for r in store.feature_page(run_id, sort=BY[args.by], alive=True,
                                                                 limit=min(top, 500)).rows)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    settings = compose(args)
    console = make_console()
    from hydra.utils import instantiate
    from tqdm.auto import tqdm

    from midisc.interpretation import explain, pool
    from midisc.training.reopen import open_run

    with open_store(args.db) as store:
        features = chosen_features(store, args.run, args, db_hint(args))
        run = open_run(store, args.run)
        examples: dict[int, list[dict]] = {}
        for row in store.feature_examples(args.run, features=features):
            examples.setdefault(row["feature_index"], []).append(row)
        explainer = instantiate(settings["explainer"])
        # Without --scorer the explainer judges its own explanations: one model loaded, not two.
        scorer = instantiate(settings["scorer"]) if "scorer" in settings else explainer
        if not args.json:
            console.print(f"run {args.run}: {len(features)} features, explained by {explainer.label}, scored by "
                          f"{scorer.label}, prompt {settings['prompt_version']}", markup=False)
        source = run.recipe.open()
        quiet = pool.build(run.sae, source, [f for f in features if examples.get(f)], settings["pool_contexts"],
                           settings["window"])
        counts = settings["examples"]
        summary = explain.run(store, args.run, features, examples, quiet, explainer, scorer,
                              explain.Settings(settings["prompt_version"], counts["explain"], counts["detect"],
                                               counts["non_activating"], counts["fuzz"], settings["seed"]),
                              bar=lambda **kw: tqdm(leave=False, disable=None, file=sys.stderr, **kw))
    means = summary.means
    if args.json:
        print_json({"run": args.run, "features": len(features), "explained": summary.explained,
                    "skipped": summary.skipped, "scored": summary.scored, "never_fired": summary.unexplainable,
                    "seconds": round(summary.seconds, 1), "tokens": summary.tokens, "explainer": explainer.label,
                    "scorer": scorer.label, "prompt_version": settings["prompt_version"], **means})
        return 0

    def shown(name: str) -> str:
        value = means.get(name)
        return "–" if value is None else f"{value:.3f}"

    minutes = summary.seconds / 60
    rate = f"{summary.explained / minutes:.1f}/min" if summary.explained and minutes > 0 else "–"
    console.print(f"explained {summary.explained} features ({summary.skipped} done before, "
                  f"{len(summary.unexplainable)} never fired), scored {summary.scored}, in {summary.seconds:.0f}s "
                  f"({rate}), {summary.tokens:,} tokens", markup=False)
    console.print(f"  detection: {shown('detection')}  (shuffled explanations: {shown('baseline_detection')})",
                  markup=False)
    console.print(f"  fuzzing:   {shown('fuzzing')}  (shuffled explanations: {shown('baseline_fuzzing')})",
                  markup=False)
    console.print("  balanced accuracy; 0.5 is chance. "
                  f"next: python -m midisc.explore explanations {args.run}{db_hint(args)}", markup=False)
    return 0


if __name__ == "__main__":
    run_tool(main)
