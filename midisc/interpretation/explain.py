"""Explain features and score the explanations, writing each feature's row as soon as it is done.

Two passes over the chosen features. Explaining: the examples `sampling.choose` picks go to the explainer;
each explanation is stored at once. Scoring: for each explained feature, the scorer judges its held-out
activating windows against windows where it does not fire (detection), and windows with the right tokens
marked against the same windows with as many tokens marked at random (fuzzing); then the same contexts
with another feature's explanation (the shuffled baseline), so a score can be read against chance *for
this set of features*. Features already explained (same explainer, same prompt version) are skipped, and
already scored ones too, so an interrupted run continues where it stopped.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from midisc.interpretation import prompts
from midisc.interpretation.pool import Pool
from midisc.interpretation.sampling import choose
from midisc.interpretation.scoring import auroc, balanced_accuracy, derangement
from midisc.store import Store

CHUNK = 8  # features per round trip to the model: rows are written and the bar moves this often


@dataclass
class Settings:
    prompt_version: str
    explain: int         # examples shown to the explainer
    detect: int          # activating windows judged
    non_activating: int  # windows where the feature does not fire
    fuzz: int            # windows with marked tokens (each shown rightly and wrongly marked)
    seed: int


@dataclass
class Summary:
    explained: int = 0          # explanations written in this run
    skipped: int = 0            # features explained before, with the same explainer and prompt
    scored: int = 0
    unexplainable: list[int] = field(default_factory=list)  # features without examples (never fired)
    seconds: float = 0.0
    tokens: int = 0
    means: dict[str, float | None] = field(default_factory=dict)


def _mean(values: Sequence[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return sum(kept) / len(kept) if kept else None


def _fuzz_cases(example: dict, rng: random.Random) -> list[tuple[set[int], bool]]:
    """The window marked where the feature fires most, and marked as often where it does not."""
    right = prompts.strongest(example["values"])
    silent = [i for i, v in enumerate(example["values"]) if v <= 0]
    wrong = set(rng.sample(silent, min(len(right), len(silent))))
    return [(right, True)] + ([(wrong, False)] if wrong else [])


def score_cases(explanation: str, detect: list[dict], quiet: list[list[str]], fuzz: list[dict],
                rng: random.Random) -> tuple[list, list]:
    """The scorer's conversations and the truth of each: (detection cases, fuzzing cases)."""
    detection = [(prompts.detection_messages(explanation, e["tokens"]), True) for e in detect]
    detection += [(prompts.detection_messages(explanation, tokens), False) for tokens in quiet]
    fuzzing = [(prompts.fuzzing_messages(explanation, e["tokens"], marks), truth)
               for e in fuzz for marks, truth in _fuzz_cases(e, rng)]
    return detection, fuzzing


def _figures(p_yes: list[float], truth: list[bool]) -> dict[str, Any]:
    return {"balanced_accuracy": balanced_accuracy(p_yes, truth), "auroc": auroc(p_yes, truth),
            "n_true": sum(truth), "n_false": len(truth) - sum(truth), "p_yes": [round(p, 4) for p in p_yes]}


def run(store: Store, run_id: int, features: list[int], examples: dict[int, list[dict]], pool: Pool | None,
        explainer: Any, scorer: Any, settings: Settings, bar: Callable[..., Any]) -> Summary:
    """Explain and score `features` of the run; `examples` their feature_examples rows, `pool` the quiet windows
    (built over those features), `bar` a tqdm-like progress bar factory."""
    started, summary = time.perf_counter(), Summary()
    version = settings.prompt_version
    done = {row["feature_index"]: row for row in store.explanations(run_id, features=features,
                                                                   explainer=explainer.label, prompt_version=version)}
    summary.unexplainable = [f for f in features if not examples.get(f)]
    todo = [f for f in features if f not in done and examples.get(f)]
    summary.skipped = len([f for f in features if f in done])
    chosen = {f: choose(examples[f], settings.explain, settings.detect, settings.fuzz) for f in features
              if examples.get(f)}
    with bar(total=len(todo), desc="explaining", unit="feature") as progress:
        for first in range(0, len(todo), CHUNK):
            batch = todo[first:first + CHUNK]
            answers = explainer.complete([prompts.explanation_messages(chosen[f].explain) for f in batch])
            for feature, answer in zip(batch, answers):
                ids = chosen[feature].ids()
                quiet = pool.quiet(feature, settings.non_activating, settings.seed) if pool else []
                ids["non_activating"] = [list(pool.origin[i]) for i in quiet] if pool else []
                row_id = store.add_explanation(run_id, feature, explainer=explainer.label, prompt_version=version,
                                               explanation=prompts.clean_explanation(answer), examples=ids)
                done[feature] = {"id": row_id, "explanation": prompts.clean_explanation(answer), "scorer": None,
                                 "examples": ids, "feature_index": feature}
                summary.explained += 1
            progress.update(len(batch))
    explained = sorted(f for f in done if f in chosen)
    borrowed = derangement(explained, settings.seed)
    unscored = [f for f in explained if done[f].get("scorer") is None and f in borrowed]
    with bar(total=len(unscored), desc="scoring", unit="feature") as progress:
        for feature in unscored:
            rng = random.Random(settings.seed * 7919 + feature)
            quiet = [pool.windows[i] for i in pool.quiet(feature, settings.non_activating, settings.seed)] if pool else []
            scores: dict[str, Any] = {"baseline_feature": borrowed[feature]}
            for name, explanation in (("", done[feature]["explanation"]),
                                      ("baseline_", done[borrowed[feature]]["explanation"])):
                detection, fuzzing = score_cases(explanation, chosen[feature].detect, quiet, chosen[feature].fuzz,
                                                 random.Random(rng.random()))
                p = scorer.yes_probability([c for c, _ in detection + fuzzing])
                scores[f"{name}detection_figures"] = _figures(p[:len(detection)], [t for _, t in detection])
                scores[f"{name}fuzzing_figures"] = _figures(p[len(detection):], [t for _, t in fuzzing])
                scores[f"{name}detection"] = scores[f"{name}detection_figures"]["balanced_accuracy"]
                scores[f"{name}fuzzing"] = scores[f"{name}fuzzing_figures"]["balanced_accuracy"]
            store.score_explanation(done[feature]["id"], scorer=scorer.label, scores=scores)
            done[feature].update(scorer=scorer.label, **{k: scores[k] for k in (
                "detection", "fuzzing", "baseline_detection", "baseline_fuzzing")})
            summary.scored += 1
            progress.update(1)
    rows = store.explanations(run_id, features=features, explainer=explainer.label, prompt_version=version)
    summary.means = {name: _mean([r[name] for r in rows]) for name in (
        "detection", "baseline_detection", "fuzzing", "baseline_fuzzing")}
    summary.tokens = explainer.tokens + (scorer.tokens if scorer is not explainer else 0)
    summary.seconds = time.perf_counter() - started
    return summary
