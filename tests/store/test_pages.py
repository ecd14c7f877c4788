"""Paged, sorted reads (store/pages.py) and feature profiles, on SQLite and, when MIDISC_TEST_POSTGRES_URL is
set, on PostgreSQL: the database sorts, filters and cuts the page, and a bad request names what is valid."""

from __future__ import annotations

import pytest

from midisc.store import PageError, Store, UnknownRunError


def start(store: Store, **fields) -> int:
    given = dict(model="SmolLM2-135M", hook="model.layers.3", layer=3, architecture="topk", config={},
                 output_dir="outputs/run") | fields
    return store.start_run(**given)


def runs(store: Store) -> list[int]:
    ids = []
    for i, (fvu, ce) in enumerate([(0.3, 0.9), (0.1, None), (0.2, 0.95), (None, None)]):
        run_id = start(store, model=f"model-{i}", architecture="jumprelu" if i == 2 else "topk",
                       sweep_id="multirun/a" if i < 2 else None)
        if fvu is not None:
            metrics = {"fvu": fvu, "l0": 10.0 * (i + 1)} | ({"ce_loss_score": ce} if ce is not None else {})
            store.finish_run(run_id, "completed", metrics=metrics)
        ids.append(run_id)
    return ids


def test_runs_sort_with_unmeasured_ones_last_either_way(store: Store) -> None:
    a, b, c, d = runs(store)
    assert [r["id"] for r in store.run_page(sort="fvu", descending=False).rows] == [b, c, a, d]
    assert [r["id"] for r in store.run_page(sort="fvu", descending=True).rows] == [a, c, b, d]
    # The spliced-in score lives in the metrics JSON; it sorts in SQL on both backends.
    assert [r["id"] for r in store.run_page(sort="ce_loss_score").rows][:2] == [c, a]
    assert store.run_page(sort="ce_loss_score").rows[0]["ce_loss_score"] == pytest.approx(0.95)


def test_runs_page_counts_and_cuts(store: Store) -> None:
    ids = runs(store)
    first, second = (store.run_page(sort="id", descending=False, offset=o, limit=3) for o in (0, 3))
    assert (first.total, second.total) == (4, 4)
    assert [r["id"] for r in first.rows + second.rows] == ids
    assert "config" not in first.rows[0]  # the list never carries every run's whole config


def test_runs_filter_by_status_search_and_sweep(store: Store) -> None:
    a, b, c, d = runs(store)
    assert [r["id"] for r in store.run_page(status="running").rows] == [d]
    assert [r["id"] for r in store.run_page(search="JUMPrelu").rows] == [c]
    assert {r["id"] for r in store.run_page(search="multirun/").rows} == {a, b}
    assert {r["id"] for r in store.run_page(sweep_id="multirun/a").rows} == {a, b}
    assert store.run_page(search="100%_").total == 0  # % and _ are matched as themselves


@pytest.mark.parametrize("ask, message", [
    (dict(sort="speed"), "sort 'speed' is not one of id, status"),
    (dict(offset=-1), "offset -1 must be 0 or more"),
    (dict(limit=0), "limit 0 must be between 1 and 500"),
    (dict(status="done"), "status 'done' is not one of running, completed"),
])
def test_a_bad_run_page_names_what_is_valid(store: Store, ask, message) -> None:
    with pytest.raises(PageError, match=message):
        store.run_page(**ask)


def features(store: Store) -> int:
    run_id = start(store)
    store.add_features(run_id, [0.5, 0.0, 0.25, 0.125], [1.0, 0.0, 3.0, 2.0], [2.0, 0.0, 6.0, 4.0],
                       [False, True, False, False])
    tokens = {0: [" the", " bank"], 2: [" shares", " fell"], 3: [" 100%", " the"]}
    store.add_feature_examples(run_id, [
        dict(feature_index=f, kind="top", rank=0, activation=1.0, context_index=f, token_index=1, max_token_index=1,
             tokens=t, values=[0.5, 1.0]) for f, t in tokens.items()])
    store.add_concept_scores(run_id, "finance", [
        dict(feature_index=f, rank=r, score=s, mean_concept=1.0, mean_contrast=0.0, fire_rate_concept=0.5,
             fire_rate_contrast=0.1, n_concept=4, n_contrast=4) for r, (f, s) in enumerate([(2, 0.9), (0, 0.6)])])
    return run_id


def test_features_sort_page_and_join_a_concept(store: Store) -> None:
    run_id = features(store)
    assert [r["feature_index"] for r in store.feature_page(run_id, sort="max_activation").rows] == [2, 3, 0, 1]
    assert [r["feature_index"] for r in store.feature_page(run_id, sort="frequency", offset=1, limit=2).rows] == [2, 3]
    by_concept = store.feature_page(run_id, sort="concept_score", concept="finance").rows
    assert [(r["feature_index"], r["concept_score"]) for r in by_concept] == [(2, 0.9), (0, 0.6), (1, None),
                                                                               (3, None)]
    assert [r["feature_index"] for r in store.feature_page(run_id, alive=True).rows] == [0, 2, 3]


def test_features_search_by_index_or_a_token_of_the_top_examples(store: Store) -> None:
    run_id = features(store)
    assert [r["feature_index"] for r in store.feature_page(run_id, search="2").rows] == [2]
    assert sorted(r["feature_index"] for r in store.feature_page(run_id, search="THE").rows) == [0, 3]
    assert [r["feature_index"] for r in store.feature_page(run_id, search="100%").rows] == [3]
    assert store.feature_page(run_id, search="nothing like it").total == 0


def test_a_bad_feature_page_names_what_is_valid(store: Store) -> None:
    run_id = features(store)
    with pytest.raises(PageError, match="sort concept_score needs a concept"):
        store.feature_page(run_id, sort="concept_score")
    with pytest.raises(UnknownRunError, match="no run with id 99"):
        store.feature_page(99)


def test_width_frequencies_and_newest_epochs(store: Store) -> None:
    run_id = features(store)
    other = start(store)
    assert (store.feature_count(run_id), store.feature_count(other)) == (4, 0)
    assert store.feature_frequencies(run_id) == [0.5, 0.0, 0.25, 0.125]
    for epoch, step in ((0, 10), (1, 20)):
        store.add_epoch_metrics(run_id, epoch, step, {"train/loss": 1.0 / step})
    newest = store.latest_epochs([run_id, other])
    assert newest.keys() == {run_id} and (newest[run_id]["epoch"], newest[run_id]["step"]) == (1, 20)
    assert newest[run_id]["metrics"] == {"train/loss": 0.05}


def test_profiles_round_trip_and_replace(store: Store) -> None:
    run_id = features(store)
    profile = {"density": {"low": 0.1, "high": 2.0, "heights": [3, 0, 1]}, "similar": [[2, 0.5]],
               "promoted": [[" ünï\n", 0.25]]}
    assert store.add_feature_profiles(run_id, [{"feature_index": 0, "profile": profile},
                                               {"feature_index": 3, "profile": {}}]) == 2
    assert store.feature_profiles(run_id, [0, 1, 3]) == {0: profile, 3: {}}
    store.add_feature_profiles(run_id, [{"feature_index": 1, "profile": {"similar": []}}])
    assert store.feature_profiles(run_id, [0, 1, 3]) == {1: {"similar": []}}
    with pytest.raises(ValueError, match="two feature profile rows share feature_index=1"):
        store.add_feature_profiles(run_id, [{"feature_index": 1, "profile": {}}] * 2)
    with pytest.raises(ValueError, match=r"feature 2 profile.similar is a set"):
        store.add_feature_profiles(run_id, [{"feature_index": 2, "profile": {"similar": {0}}}])
    store.add_feature_profiles(run_id, [{"feature_index": 2, "profile": {"similar": [[0, float("nan")]]}}])
    assert store.feature_profiles(run_id, [2]) == {2: {"similar": [[0, None]]}}  # JSON has no NaN
