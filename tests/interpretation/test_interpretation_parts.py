"""Sampling, prompts and scoring of auto-interpretation: pure functions on small hand-made examples."""

import pytest

from midisc.interpretation import prompts, sampling, scoring


def ex(kind: str, rank: int) -> dict:
    return {"kind": kind, "rank": rank, "tokens": [" a", " b", " c"], "values": [0.0, 1.0 + rank, 0.5]}


def test_explaining_and_scoring_examples_are_disjoint_and_span_both_kinds():
    examples = [ex("top", r) for r in range(20)] + [ex("quantile", r) for r in range(10)]
    chosen = sampling.choose(examples, n_explain=12, n_detect=6, n_fuzz=4)
    explain = {(e["kind"], e["rank"]) for e in chosen.explain}
    scored = {(e["kind"], e["rank"]) for e in chosen.detect + chosen.fuzz}
    assert len(explain) == 12 and not explain & scored
    assert {k for k, _ in explain} == {k for k, _ in scored} == {"top", "quantile"}
    assert chosen.explain[:4] == [examples[0], examples[20], examples[2], examples[22]]  # strongest first
    assert len(chosen.detect) == 6 and len(chosen.fuzz) == 4 and not {id(e) for e in chosen.detect} & {
        id(e) for e in chosen.fuzz}
    assert chosen.ids()["explain"][:2] == [["top", 0], ["quantile", 0]]


def test_a_feature_with_few_examples_reuses_detection_windows_for_fuzzing_never_explaining_ones():
    chosen = sampling.choose([ex("top", r) for r in range(4)], n_explain=12, n_detect=6, n_fuzz=4)
    assert [e["rank"] for e in chosen.explain] == [0, 2]
    assert [e["rank"] for e in chosen.detect] == [1, 3] and [e["rank"] for e in chosen.fuzz] == [1, 3]


def test_prompts_mark_the_strongest_tokens_and_say_what_to_answer():
    example = {"tokens": [" the", " cat", "\n", " sat"], "values": [0.0, 2.0, 0.5, 1.0]}
    assert prompts.strongest(example["values"], n=2) == {1, 3}
    assert prompts.marked_text(example["tokens"], {1}) == " the<< cat>>\\n sat"
    explain = prompts.explanation_messages([example])
    assert explain[0]["role"] == "system" and "Example 1:  the<< cat>><<\\n>><< sat>>" in explain[1]["content"]
    assert "Answer Yes or No" in prompts.detection_messages("cats", example["tokens"])[1]["content"]
    fuzz = prompts.fuzzing_messages("cats", example["tokens"], {3})[1]["content"]
    assert "cats" in fuzz and "<< sat>>" in fuzz


@pytest.mark.parametrize("answer, cleaned", [
    ("The marked tokens are: words about cats.\nMore text", "words about cats"),
    ('"plural nouns"', "plural nouns"), ("", "(no explanation)"), ("  \n", "(no explanation)"),
])
def test_explanations_are_cleaned_to_their_first_line(answer, cleaned):
    assert prompts.clean_explanation(answer) == cleaned


def test_balanced_accuracy_and_auroc_by_hand():
    p, truth = [0.9, 0.6, 0.4, 0.2, 0.7], [True, True, True, False, False]
    # hits 2/3 of the true cases, rejects 1/2 of the false ones
    assert scoring.balanced_accuracy(p, truth) == pytest.approx((2 / 3 + 1 / 2) / 2)
    # pairs (true, false) where the true one is higher: 0.9>0.2, 0.9>0.7, 0.6>0.2, 0.4>0.2 -> 4 of 6
    assert scoring.auroc(p, truth) == pytest.approx(4 / 6)
    assert scoring.auroc([0.5, 0.5], [True, False]) == 0.5  # a tie counts half
    assert scoring.balanced_accuracy([0.9], [True]) is None and scoring.auroc([], []) is None


@pytest.mark.parametrize("answer, p", [("Yes", 1.0), (" yes, it does", 1.0), ("**Yes**", 1.0), ("No", 0.0),
                                       ("maybe", 0.0), ("", 0.0)])
def test_a_written_answer_counts_one_for_yes(answer, p):
    assert scoring.yes_from_text(answer) == p


def test_the_baseline_borrows_another_feature_s_explanation_never_its_own():
    pairs = scoring.derangement(range(10), seed=3)
    assert sorted(pairs) == list(range(10)) and sorted(pairs.values()) == list(range(10))
    assert all(a != b for a, b in pairs.items())
    assert pairs == scoring.derangement(range(10), seed=3) and scoring.derangement([4], seed=0) == {}
