"""What the pages show, from rows: web/views.py's pure functions."""

import pytest

from midisc.web import views


def test_tokens_are_shaded_by_the_feature_s_max_and_the_max_token_is_marked():
    shown = views.colour_tokens([" a", " b", " c"], [0.0, 2.0, 1.0], peak=4.0)
    assert [t["shade"] for t in shown] == [0.0, 0.5, 0.25]
    assert [t["max"] for t in shown] == [False, True, False]
    # A window where the feature does not fire marks nothing.
    assert not any(t["max"] for t in views.colour_tokens([" a"], [0.0], peak=None))


def example(activation: float) -> dict:
    return {"activation": activation, "context_index": 0, "tokens": [" x"], "values": [activation]}


def test_sampled_examples_are_grouped_by_activation_band_strongest_first_each_once():
    examples = [example(a) for a in (0.1, 0.3, 0.6, 0.8, 1.0, 0.26)]
    groups = views.quantile_groups(examples, peak=1.0)
    assert [(g["low"], g["high"]) for g in groups] == [(0.75, 1.0), (0.5, 0.75), (0.25, 0.5), (0.0, 0.25)]
    assert [[e["activation"] for e in g["examples"]] for g in groups] == [[0.8, 1.0], [0.6], [0.3, 0.26], [0.1]]
    assert views.quantile_groups(examples, peak=None) == []


def test_stored_bins_become_bar_centres():
    assert views.bars({"low": 0.0, "high": 1.0, "heights": [1, 2, 3, 4]}) == {
        "centres": [0.125, 0.375, 0.625, 0.875], "heights": [1, 2, 3, 4]}
    assert views.bars(None) is None and views.bars({"low": 0, "high": 0, "heights": []}) is None


def test_curves_keep_the_metrics_any_epoch_has_with_gaps_as_none():
    epochs = [{"step": 10, "metrics": {"train/loss": 2.0}}, {"step": 20, "metrics": {"train/loss": 1.0, "val/fvu": 0.3}}]
    assert views.curves(epochs) == {"steps": [10, 20], "series": {"loss": [2.0, 1.0], "FVU (held-out)": [None, 0.3]}}


def test_live_rows_fall_back_to_training_metrics_before_the_held_out_ones():
    newest = {"epoch": 2, "step": 30, "metrics": {"train/loss": 0.5, "train/fvu": 0.2, "train/l0": 31.5}}
    assert views.live({"id": 7, "status": "running"}, newest) == {
        "id": 7, "status": "running", "epoch": 2, "step": 30, "loss": 0.5, "fvu": 0.2, "l0": 31.5, "dead_frac": None}
    assert views.live({"id": 7, "status": "running"}, None)["step"] is None


def test_the_frontier_marks_pareto_jobs_and_labels_them_by_what_differs():
    runs = [{"id": 1, "l0": 16.0, "fvu": 0.3, "overrides": ["sae.k=16", "layer=3"]},
            {"id": 2, "l0": 32.0, "fvu": 0.2, "overrides": ["sae.k=32", "layer=3"]},
            {"id": 3, "l0": 32.0, "fvu": 0.25, "overrides": ["sae.k=32", "layer=3", "seed=1"]},
            {"id": 4, "l0": None, "fvu": None, "overrides": ["sae.k=64", "layer=3"]}]
    points = views.frontier(runs)
    assert [(p["id"], p["pareto"]) for p in points] == [(1, True), (2, True), (3, False)]
    assert [p["overrides"] for p in points] == ["sae.k=16", "sae.k=32", "sae.k=32 seed=1"]


def test_core_figures_are_the_newest_core_evaluation_s_numbers_by_group():
    old = {"eval_type": "core", "result": {"eval_result_metrics": {"sparsity": {"l0": 1.0}}}}
    new = {"eval_type": "core", "result": {"eval_result_metrics": {"sparsity": {"l0": 32.0, "note": "x"},
                                                                   "flag": True}}}
    assert views.core_figures([old, new]) == {"sparsity": {"l0": 32.0}}
    assert views.core_figures([]) is None


@pytest.mark.parametrize("index, width, expected", [(0, 3, (None, 1)), (2, 3, (1, None)), (1, 3, (0, 2))])
def test_neighbours_stay_inside_the_width(index, width, expected):
    assert tuple(views.neighbours(index, width).values()) == expected
