"""Feature examples, concept scores and list_runs(output_under=...) on SQLite and, when
MIDISC_TEST_POSTGRES_URL is set, on PostgreSQL."""

from __future__ import annotations

import math
import random
from collections.abc import Iterator
from datetime import timedelta

import numpy as np
import pytest

from midisc.store import Store, UnknownRunError

EXAMPLE_COLUMNS = {"id", "run_id", "feature_index", "kind", "rank", "activation", "context_index", "token_index",
                   "max_token_index", "tokens", "values"}


def start(store: Store, output_dir: str = "outputs/run") -> int:
    return store.start_run(model="SmolLM2-135M", hook="blocks.3.hook_resid_post", layer=3, architecture="topk",
                           config={"sae": {"k": 32}}, output_dir=output_dir)


def example(feature: int, kind: str = "top", rank: int = 0, width: int = 4, **overrides) -> dict:
    values = [round(0.25 * (i + 1) + feature + rank / 10, 5) for i in range(width)]
    fields = dict(feature_index=feature, kind=kind, rank=rank, activation=max(values),
                  context_index=10 * feature + rank, token_index=7, max_token_index=width - 1,
                  tokens=[f" t{i}" for i in range(width)], values=values)
    return fields | overrides


def score(feature: int, rank: int, **overrides) -> dict:
    fields = dict(feature_index=feature, rank=rank, score=0.9 - rank / 10, mean_concept=1.5, mean_contrast=0.25,
                  fire_rate_concept=0.8, fire_rate_contrast=0.05, n_concept=40, n_contrast=60)
    return fields | overrides


def keys(rows: list[dict]) -> list[tuple[int, str, int]]:
    return [(r["feature_index"], r["kind"], r["rank"]) for r in rows]


def test_examples_round_trip_in_order(store: Store) -> None:
    run_id = start(store)
    tokens = [" ünïcode ✓", "'single'", '"double"', "back\\slash", "\n", ""]
    values = [0.0, 1e-7, -0.5, 3.141592653589793, 2.5, 0.1]
    special = example(np.int64(3), "quantile", np.int32(1), tokens=tokens, values=values,
                      activation=np.float32(2.5), max_token_index=4)
    from_numpy = example(3, "top", 0, values=np.array([0.5, 1.5, 0.25, 0.0], dtype=np.float32), activation=1.5,
                         max_token_index=1)
    # Given out of order: reads come back by feature, top before quantile, then rank.
    given = [example(5, "quantile", 0), special, example(5, "top", 1), example(3, "quantile", 0), from_numpy,
             example(5, "top", 0)]
    assert store.add_feature_examples(run_id, iter(given)) == 6

    rows = store.feature_examples(run_id)
    assert keys(rows) == [(3, "top", 0), (3, "quantile", 0), (3, "quantile", 1), (5, "top", 0), (5, "top", 1),
                          (5, "quantile", 0)]
    assert all(set(row) == EXAMPLE_COLUMNS and row["run_id"] == run_id for row in rows)
    back = rows[2]
    assert back["tokens"] == tokens and back["values"] == values
    assert back["activation"] == 2.5 and type(back["activation"]) is float
    assert type(back["feature_index"]) is int and type(back["rank"]) is int and back["max_token_index"] == 4
    assert rows[0]["values"] == [0.5, 1.5, 0.25, 0.0]
    assert rows[3] | {"id": None, "run_id": None} == example(5, "top", 0) | {"id": None, "run_id": None}


def test_examples_replace_the_runs_earlier_ones(store: Store) -> None:
    run_id, other = start(store), start(store)
    store.add_feature_examples(other, [example(0)])
    store.add_feature_examples(run_id, [example(0), example(0, rank=1), example(1, "quantile")])
    assert store.add_feature_examples(run_id, [example(2, rank=0, activation=9.0)]) == 1
    (row,) = store.feature_examples(run_id)
    assert (row["feature_index"], row["activation"]) == (2, 9.0)
    assert keys(store.feature_examples(other)) == [(0, "top", 0)]
    assert store.add_feature_examples(run_id, []) == 0
    assert store.feature_examples(run_id) == []


def test_example_filters(store: Store) -> None:
    run_id = start(store)
    store.add_feature_examples(run_id, [example(f, kind, rank) for f in range(4) for kind in ("top", "quantile")
                                        for rank in range(3)])
    assert keys(store.feature_examples(run_id, features=[2, 0, 2, 99])) == [
        (f, kind, rank) for f in (0, 2) for kind in ("top", "quantile") for rank in range(3)]
    assert keys(store.feature_examples(run_id, kind="quantile", max_rank=2)) == [
        (f, "quantile", rank) for f in range(4) for rank in range(2)]
    assert keys(store.feature_examples(run_id, features=np.array([3]), kind="top", max_rank=1)) == [(3, "top", 0)]
    assert store.feature_examples(run_id, features=[]) == []
    assert store.feature_examples(run_id, max_rank=0) == []
    with pytest.raises(ValueError, match="'bottom' is not one of top, quantile"):
        store.feature_examples(run_id, kind="bottom")


def test_feature_filter_longer_than_one_query(store: Store) -> None:
    run_id = start(store)
    n = 2_400
    store.add_feature_examples(run_id, [example(f) for f in range(n)])
    wanted = list(range(n - 1, -1, -2)) + [1, 3, 10**6]
    assert [r["feature_index"] for r in store.feature_examples(run_id, features=wanted)] == list(range(1, n, 2))


def test_150k_examples_in_one_call(store: Store) -> None:
    run_id = start(store)
    rng = random.Random(0)
    n_features, width = 5_000, 21  # 20 top and 10 quantile examples each, windows as features.py cuts them
    # Sparse activations rounded to 5 places, as features.py stores them; a few hundred windows, reused.
    windows = [[round(rng.random() * 5, 5) if rng.random() < 0.3 else 0.0 for _ in range(width)] for _ in range(307)]

    def examples() -> Iterator[dict]:
        for f in range(n_features):
            for kind, count in (("top", 20), ("quantile", 10)):
                for rank in range(count):
                    values = windows[(f * 30 + rank) % len(windows)]
                    yield example(f, kind, rank, width=width, activation=max(values),
                                  max_token_index=values.index(max(values)), values=values)

    assert store.add_feature_examples(run_id, examples()) == 150_000
    last = store.feature_examples(run_id, features=[n_features - 1])
    assert len(last) == 30 and keys(last)[:2] == [(n_features - 1, "top", 0), (n_features - 1, "top", 1)]
    assert len(store.feature_examples(run_id, max_rank=1)) == 2 * n_features


@pytest.mark.parametrize("bad, message", [
    (dict(activation=math.nan), r"feature 1 top example 0: activation is nan"),
    (dict(activation=np.float32("inf")), r"feature 1 top example 0: activation is inf"),
    (dict(values=[0.5, math.nan, 1.0, 2.0]), r"feature 1 top example 0: values\[1\] is nan"),
    (dict(values=[0.5, None, 1.0, 2.0]), r"values\[1\] must be a number"),
    (dict(kind="bottom"), r"feature 1: example kind 'bottom' is not one of top, quantile"),
    (dict(tokens=["a", "b", "c"]), r"feature 1 top example 0: 3 tokens but 4 values"),
    (dict(max_token_index=4), r"max_token_index 4 is outside the window of 4 tokens \(0..3\)"),
    (dict(max_token_index=-1), r"max_token_index -1 is outside"),
    (dict(tokens=["a", 2, "c", "d"]), r"tokens must be strings, got 2 \(int\)"),
    (dict(rank=1.5), r"rank must be a whole number, got 1.5"),
    (dict(colour="red"), r"unexpected key\(s\) colour"),
])
def test_bad_examples_write_nothing(store: Store, bad: dict, message: str) -> None:
    run_id = start(store)
    store.add_feature_examples(run_id, [example(0)])
    with pytest.raises(ValueError, match=message):
        store.add_feature_examples(run_id, [example(2), example(1) | bad, example(3)])
    assert keys(store.feature_examples(run_id)) == [(0, "top", 0)]


def test_missing_key_and_duplicate_examples_refused(store: Store) -> None:
    run_id = start(store)
    incomplete = example(1)
    del incomplete["values"]
    with pytest.raises(ValueError, match=r"missing key\(s\) values"):
        store.add_feature_examples(run_id, [incomplete])
    with pytest.raises(ValueError, match="feature_index=1, kind='top', rank=0"):
        store.add_feature_examples(run_id, [example(1), example(1)])
    assert store.feature_examples(run_id) == []


def test_concept_scores_replace_per_concept(store: Store) -> None:
    run_id, other = start(store), start(store)
    assert store.add_concept_scores(run_id, "sports", [score(7, 1), score(3, 0), score(9, 2)]) == 3
    store.add_concept_scores(run_id, "finance", [score(np.int64(4), 0, score=np.float32(0.75))])
    store.add_concept_scores(other, "sports", [score(1, 0)])

    rows = store.concept_scores(run_id)
    assert [(r["concept"], r["rank"], r["feature_index"]) for r in rows] == [
        ("finance", 0, 4), ("sports", 0, 3), ("sports", 1, 7), ("sports", 2, 9)]
    assert rows[0]["score"] == 0.75 and rows[1]["n_concept"] == 40 and rows[1]["fire_rate_contrast"] == 0.05
    created = rows[0]["created_at"]
    assert created.tzinfo is not None and created.utcoffset() == timedelta(0)

    assert store.add_concept_scores(run_id, "sports", [score(11, 0)]) == 1
    assert [(r["concept"], r["feature_index"]) for r in store.concept_scores(run_id)] == [
        ("finance", 4), ("sports", 11)]
    assert [r["feature_index"] for r in store.concept_scores(run_id, "sports")] == [11]
    assert store.concept_scores(run_id, "weather") == []
    assert [r["feature_index"] for r in store.concept_scores(other)] == [1]
    assert store.concepts(run_id) == ["finance", "sports"]
    assert store.concepts(start(store)) == []


@pytest.mark.parametrize("rows, message", [
    ([score(1, 0, score=math.nan)], r"concept 'sports', feature 1: score is nan"),
    ([score(1, 0, mean_contrast=-math.inf)], r"mean_contrast is -inf"),
    ([score(1, 0, n_concept=2.5)], r"n_concept must be a whole number"),
    ([score(1, 0), score(1, 1)], r"feature_index=1"),
    ([score(1, 0) | {"auroc": 0.5}], r"unexpected key\(s\) auroc"),
])
def test_bad_concept_scores_write_nothing(store: Store, rows: list[dict], message: str) -> None:
    run_id = start(store)
    store.add_concept_scores(run_id, "sports", [score(5, 0)])
    with pytest.raises(ValueError, match=message):
        store.add_concept_scores(run_id, "sports", rows)
    assert [r["feature_index"] for r in store.concept_scores(run_id)] == [5]


def test_concept_name_checked(store: Store) -> None:
    run_id = start(store)
    for concept in ("", "x" * 129):
        with pytest.raises(ValueError, match="1 to 128 characters"):
            store.add_concept_scores(run_id, concept, [score(1, 0)])


def test_unknown_run_raises(store: Store) -> None:
    known = start(store)
    for call in (
        lambda: store.add_feature_examples(999_999, [example(0)]),
        lambda: store.feature_examples(999_999),
        lambda: store.feature_examples(999_999, features=[1]),
        lambda: store.add_concept_scores(999_999, "sports", [score(1, 0)]),
        lambda: store.concept_scores(999_999),
        lambda: store.concepts(999_999),
    ):
        with pytest.raises(UnknownRunError, match=f"no run with id 999999; existing ids: {known}"):
            call()


def test_list_runs_output_under(store: Store) -> None:
    sweep = "/work/multirun/2026-11-24/10-00-00"
    dirs = {
        "k8": f"{sweep}/sae.k=8",
        "k16": f"{sweep}/sae.k=16",
        "later": "/work/multirun/2026-11-24/10-00-001/sae.k=8",
        "other": "/work/multirun/2026-11-24/11-00-00/sae.k=8",
        "upper": "/WORK/MULTIRUN/2026-11-24/10-00-00/sae.k=8",
        "run_a": "/work/outputs/run_a",
        "runXa": "/work/outputs/runXa",
        "pct": "/work/outputs/50%/a",
        "no_pct": "/work/outputs/50x/a",
    }
    ids = {name: start(store, output_dir=path) for name, path in dirs.items()}
    store.finish_run(ids["k8"], "completed")

    def under(prefix: str, **filters) -> set[str]:
        found = {r["id"] for r in store.list_runs(output_under=prefix, **filters)}
        return {name for name, run_id in ids.items() if run_id in found}

    assert under(sweep + "/") == {"k8", "k16"}
    assert under(sweep) == {"k8", "k16", "later"}  # a plain prefix: the caller adds "/" to mean the folder
    assert under(sweep + "/", status="completed") == {"k8"}
    assert under("/work/outputs/run_") == {"run_a"}  # "_" is no single-character wildcard
    assert under("/work/outputs/50%") == {"pct"}  # nor "%" a wildcard for any text
    assert under("/work/outputs/%") == set()
    assert under("/WORK/") == {"upper"}  # case matters, on SQLite too
    assert under("") == set(dirs)
    assert [r["id"] for r in store.list_runs(output_under=sweep + "/")] == [ids["k16"], ids["k8"]]  # newest first
