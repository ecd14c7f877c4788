"""The analysis and explorer CLIs on a tiny run with a planted feature whose answer is known."""

import json

import pytest

from conftest import compose_config, tiny_overrides
from midisc import analyze, explore
from midisc.cli import run_tool
from midisc.store import Store
from midisc.train import train


@pytest.fixture
def run(planted_run):
    return planted_run


def call(capsys, tool, *args):
    assert tool.main([*map(str, args)]) == 0
    return capsys.readouterr().out


def test_the_planted_features_top_examples_are_exactly_its_tokens_contexts(run):
    with Store(run.url) as store:
        examples = store.feature_examples(run.run_id, features=[0], kind="top")
        feature = store.features(run.run_id)[0]
    assert {(e["context_index"], e["token_index"]) for e in examples} == run.places
    assert all(e["tokens"][e["max_token_index"]] == run.text for e in examples)
    assert [e["rank"] for e in examples] == list(range(len(run.places)))
    assert feature["frequency"] > 0 and feature["max_activation"] == examples[0]["activation"]


def test_top_by_max_puts_the_planted_feature_first_with_its_token_highlighted(run, capsys):
    rows = json.loads(call(capsys, explore, "top", run.run_id, "--by", "max", "--n", "5", "--json", "--db", run.url))
    assert rows[0]["feature"] == 0 and len(rows) == 5
    assert rows[0]["example"]["tokens"][rows[0]["example"]["max_token_index"]] == run.text
    text = call(capsys, explore, "top", run.run_id, "--by", "max", "--n", "3", "--db", run.url)
    assert f"[[{run.text}]]" in text.splitlines()[2] and "\x1b[" not in text  # piped: plain text


def test_top_by_frequency_is_sorted(run, capsys):
    rows = json.loads(call(capsys, explore, "top", run.run_id, "--json", "--db", run.url))
    assert len(rows) == 20 and [r["frequency"] for r in rows] == sorted((r["frequency"] for r in rows), reverse=True)


def test_list_shows_the_run_and_filters(run, capsys):
    (row,) = json.loads(call(capsys, explore, "list", "--json", "--db", run.url))
    assert row["id"] == run.run_id and row["status"] == "completed" and row["width"] == 128
    assert row["architecture"] == "standard" and row["tokens"] > 0 and row["alive_features"] is not None
    assert json.loads(call(capsys, explore, "list", "--status", "failed", "--json", "--db", run.url)) == []
    assert "no runs match" in call(capsys, explore, "list", "--model", "gpt2", "--db", run.url)
    table = call(capsys, explore, "list", "--db", run.url)
    assert "completed" in table and "model.layers.1" in table
    assert table.strip().splitlines()[-1] == explore.DEAD_IN_TABLES  # which of the three meanings "dead" has here


def test_analyze_reports_metrics_curve_bins_and_notes(run, capsys):
    report = json.loads(call(capsys, explore, "analyze", run.run_id, "--json", "--db", run.url))
    assert sum(report["frequency_bins"].values()) == 128 and report["run"]["architecture"] == "standard"
    assert [e["epoch"] for e in report["epochs"]] == [0, 1] and "val/fvu" in report["epochs"][0]
    assert report["notes"] and sum(report["log10_density_histogram"]["counts"]) + \
        report["log10_density_histogram"]["never"] == 128
    text = call(capsys, explore, "analyze", run.run_id, "--db", run.url)
    for part in ("features by firing frequency", "by epoch", "final held-out metrics", "notes", "reconstruction"):
        assert part in text
    assert any("dead" in note and "not fired in the last 2,048 training tokens" in note for note in report["notes"])


def test_details_shows_examples_and_output_tokens(run, capsys):
    report = json.loads(call(capsys, explore, "details", run.run_id, 0, "--json", "--db", run.url))
    assert 1 <= report["frequency_rank"] <= 128 and len(report["output_tokens"]["boosted"]) == 10
    assert {e["kind"] for e in report["examples"]} == {"top", "quantile"}
    text = call(capsys, explore, "details", run.run_id, 0, "--n", "2", "--db", run.url)
    assert "strongest examples" in text and "output tokens" in text and f"{run.text}(" in text
    quiet = json.loads(call(capsys, explore, "details", run.run_id, 0, "--no-model", "--json", "--db", run.url))
    assert quiet["output_tokens"] is None


@pytest.mark.parametrize("args, message", [
    (["top", "99"], "no run with id 99; existing ids: 1"),
    (["details", "1", "500"], "run 1 has no feature 500; its features are 0-127"),
    (["top", "1", "--n", "0"], "--n=0 must be at least 1"),
])
def test_mistakes_get_one_line(run, args, message, capsys):
    with pytest.raises(SystemExit) as stopped:  # in-process, through run_tool as `python -m` runs it
        run_tool(explore.main, [*args, "--db", run.url])
    assert stopped.value.code == 2 and capsys.readouterr().err.strip() == f"error: {message}"


@pytest.mark.parametrize("tool, args", [(explore, ["top", "1"]), (explore, ["list"]), (analyze, ["1"])])
def test_a_mistyped_sqlite_path_is_refused_not_created(tool, args, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    Store("sqlite:///outputs/midisc.db").close()
    with pytest.raises(SystemExit) as stopped:
        run_tool(tool.main, [*args, "--db", "sqlite:///outputs/midsic.db"])
    assert stopped.value.code == 2 and capsys.readouterr().err.strip() == (
        "error: no database at outputs/midsic.db (sqlite:///outputs/midsic.db); databases under outputs/: "
        "outputs/midisc.db")
    assert [p.name for p in (tmp_path / "outputs").iterdir()] == ["midisc.db"]
    (tmp_path / "outputs" / "midisc.db").unlink()
    with pytest.raises(SystemExit):
        run_tool(tool.main, [*args, "--db", "sqlite:///elsewhere/runs.db"])
    assert capsys.readouterr().err.strip().endswith("there is no database under outputs/ either: train a run first "
                                                    "(python -m midisc.train)")
    assert not (tmp_path / "elsewhere").exists()


def test_the_analysis_cli_takes_more_tokens_from_training_texts(run, capsys):
    with Store(run.url) as store:
        before = store.features(run.run_id)
    out = call(capsys, analyze, run.run_id, "--tokens", "3000", "--n-top", "3", "--db", run.url)
    assert "stored 128 features" in out and "analysed" in out
    with Store(run.url) as store:
        top = store.feature_examples(run.run_id, kind="top")
        after = store.features(run.run_id)
    assert max(e["rank"] for e in top) == 2 and max(e["context_index"] for e in top) >= 6  # past the held-out ones
    assert [f["is_dead"] for f in after] == [f["is_dead"] for f in before]
    analyze.main([str(run.run_id), "--db", run.url])  # back to the held-out analysis for the other tests


def test_explorer_on_postgres(tmp_path, tiny_llama, text_folder, postgres_url, capsys):
    cfg = compose_config(tiny_overrides(tiny_llama, text_folder, None))
    from omegaconf import open_dict
    with open_dict(cfg):
        cfg.storage.url = postgres_url
    result = train(cfg, tmp_path / "out")
    (row,) = json.loads(call(capsys, explore, "list", "--json", "--db", postgres_url))
    assert row["id"] == result.run_id
    rows = json.loads(call(capsys, explore, "top", result.run_id, "--n", "3", "--json", "--db", postgres_url))
    assert len(rows) == 3 and all(r["example"] for r in rows)


def test_the_analysis_keeps_the_heldout_activations_for_the_exports_whatever_the_chunk_edges():
    import torch

    from midisc.data.activations import ContextChunk

    keep = torch.rand(10, 6) > 0.3
    acts = torch.randn(int(keep.sum()), 3)
    rows = keep.sum(1).cumsum(0).tolist()
    chunks, start = [], 0
    for first in range(0, 10, 4):  # contexts 0-3, 4-7, 8-9; the first 5 are held out
        end = rows[min(first + 4, 10) - 1]
        chunks.append(ContextChunk(tokens=torch.zeros(min(4, 10 - first), 6, dtype=torch.long),
                                   keep=keep[first:first + 4], acts=acts[start:end], first=first))
        start = end
    kept = []
    assert list(analyze.keeping_heldout(iter(chunks), 5, kept)) == chunks
    assert torch.equal(torch.cat(kept), acts[: rows[4]])
