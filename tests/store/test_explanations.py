"""Feature explanations in the store, on SQLite and (with MIDISC_TEST_POSTGRES_URL) PostgreSQL."""

from __future__ import annotations

import pytest

from midisc.store import Store, UnknownRunError


def start(store: Store) -> int:
    return store.start_run(model="m", hook="model.layers.3", layer=3, architecture="topk", config={},
                           output_dir="outputs/run")


def test_an_explanation_is_written_scored_and_replaced_by_the_same_explainer_only(store: Store) -> None:
    run_id = start(store)
    first = store.add_explanation(run_id, 4, explainer="local:a", prompt_version="v1", explanation="  money \n",
                                  examples={"explain": [["top", 0]]})
    store.score_explanation(first, scorer="local:a", scores={"detection": 0.75, "fuzzing": float("nan"),
                                                             "detection_figures": {"auroc": 0.8}})
    (row,) = store.explanations(run_id)
    assert (row["explanation"], row["detection"], row["fuzzing"], row["scorer"]) == ("money", 0.75, None, "local:a")
    assert row["scores"] == {"detection": 0.75, "detection_figures": {"auroc": 0.8}}  # NaN is not kept as a score
    again = store.add_explanation(run_id, 4, explainer="local:a", prompt_version="v1", explanation="finance",
                                  examples={})
    assert again == first and store.explanations(run_id)[0]["detection"] is None  # new text, scores to redo
    store.add_explanation(run_id, 4, explainer="openai:big", prompt_version="v1", explanation="stock prices",
                          examples={})
    store.add_explanation(run_id, 2, explainer="local:a", prompt_version="v2", explanation="Money matters", examples={})
    assert [(r["feature_index"], r["explainer"]) for r in store.explanations(run_id)][:1] == [(2, "local:a")]
    assert len(store.explanations(run_id, explainer="local:a", prompt_version="v1")) == 1
    assert {r["feature_index"] for r in store.explanations(run_id, search="MONEY")} == {2}
    assert store.explanations(run_id, search="100%") == []
    newest = store.latest_explanations(run_id, [4])
    assert newest[4]["explanation"] == "stock prices"


def test_explanations_of_an_unknown_run_are_refused(store: Store) -> None:
    with pytest.raises(UnknownRunError, match="no run with id 5"):
        store.add_explanation(5, 0, explainer="e", prompt_version="v1", explanation="x", examples={})
    with pytest.raises(KeyError, match="no explanation with id 99"):
        store.score_explanation(99, scorer="e", scores={})
