"""`python -m midisc.autointerp` on a tiny trained run: rows for every chosen feature, disjoint examples, a run
that continues where it stopped, a failing endpoint that keeps what was written, and a key that goes nowhere."""

from __future__ import annotations

import json

import pytest

from chat_server import ChatServer
from midisc import autointerp, explore
from midisc.cli import run_tool
from midisc.interpretation.backends import LocalChat
from midisc.store import Store


def local(model) -> list[str]:
    """Overrides that make the bundled explainer and scorer the tiny test model."""
    return [f"explainer.{key}={value}" for key, value in (("name", model), ("gguf_package", "null"), ("gguf_file", "null"),
                               ("max_new_tokens", 6))]


def call(capsys, argv: list[str]) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_:
        run_tool(autointerp.main, argv)
    out = capsys.readouterr()
    return exit_.value.code, out.out, out.err


def test_features_are_explained_scored_and_skipped_when_asked_again(published, tiny_llama, capsys):
    _, url, run_id = published
    code, out, err = call(capsys, [str(run_id), "--features", "0-3,9", "--db", url, *local(tiny_llama),
                                   "pool_contexts=8"])
    assert code == 0, err
    assert "explained 5 features (0 done before, 0 never fired), scored 5" in out
    assert "detection:" in out and "(shuffled explanations:" in out
    with Store(url) as store:
        rows = store.explanations(run_id)
    assert [r["feature_index"] for r in rows] == [0, 1, 2, 3, 9]
    for row in rows:
        assert row["explainer"] == row["scorer"] == f"local:{tiny_llama}" and row["prompt_version"] == "v1"
        used = row["examples"]
        explaining, scoring = {tuple(e) for e in used["explain"]}, {tuple(e) for e in used["detect"] + used["fuzz"]}
        assert explaining and scoring and not explaining & scoring
        figures = row["scores"]["detection_figures"]
        assert figures["n_true"] == len(used["detect"]) and figures["n_false"] == len(used["non_activating"])
        assert row["scores"]["baseline_feature"] != row["feature_index"]
    code, out, _ = call(capsys, [str(run_id), "--features", "0-3,9", "--db", url, *local(tiny_llama)])
    assert code == 0 and "explained 0 features (5 done before" in out and "scored 0" in out
    assert explore.main(["explanations", str(run_id), "--db", url, "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)) == 5


@pytest.mark.parametrize("argv, says", [
    (["--features", "0-500"], "--features='0-500': 0-500 is outside the run's features 0-127"),
    (["--features", "a-b"], "'a-b' is not a feature number or a range like 0-99"),
    (["--top", "0"], "--top=0 must be at least 1"),
    (["examples.explan=3"], "Could not override 'examples.explan'"),
    (["--explainer", "openai"], "Missing mandatory value: explainer.name"),
])
def test_bad_settings_are_one_line(published, capsys, argv, says):
    _, url, run_id = published
    code, _, err = call(capsys, [str(run_id), "--db", url, *argv])
    assert code == 2 and says in err and err.count("\n") == 1, err


def test_an_endpoint_that_breaks_keeps_what_was_written_and_the_rerun_finishes(published, tiny_llama, capsys,
                                                                                monkeypatch):
    out_dir, url, run_id = published
    monkeypatch.setenv("OPENAI_API_KEY", "sk-never-written-4242")
    chat = LocalChat(str(tiny_llama), max_new_tokens=6)
    endpoint = ["--explainer", "openai", "explainer.name=tiny", "explainer.retries=0", "explainer.max_tokens=6",
                "pool_contexts=8"]
    features = ["--features", "0-11"]
    with ChatServer(chat, mode="breaks", flaky=9) as server:  # 8 explanations (one chunk), then one more, then 500s
        code, _, err = call(capsys, [str(run_id), "--db", url, *features, *endpoint, f"explainer.url={server.url}"])
    assert code == 2 and err.startswith(f"error: the chat endpoint {server.url} answered HTTP 500"), err
    with Store(url) as store:
        kept = store.explanations(run_id)
    assert [r["feature_index"] for r in kept] == list(range(8))  # the first chunk was written before the failure
    with ChatServer(chat) as server:
        code, out, err = call(capsys, [str(run_id), "--db", url, *features, *endpoint, f"explainer.url={server.url}"])
        assert code == 0, err
        assert "explained 4 features (8 done before" in out and "scored 12" in out
        assert {r["headers"].get("Authorization") for r in server.requests} == {"Bearer sk-never-written-4242"}
    with Store(url) as store:
        rows = store.explanations(run_id)
    assert [r["feature_index"] for r in rows] == list(range(12)) and all(r["scorer"] == "openai:tiny" for r in rows)
    # The key is in no row, no file of the run and nothing printed.
    database = url.removeprefix("sqlite:///")
    assert b"sk-never-written" not in open(database, "rb").read()
    assert not [p for p in out_dir.rglob("*") if p.is_file() and b"sk-never-written" in p.read_bytes()]
    assert "sk-never-written" not in out + err


def test_a_scorer_of_its_own_is_set_apart_from_the_explainer(published, tiny_llama, capsys):
    _, url, run_id = published
    scorer = ["--scorer", "local", f"scorer.name={tiny_llama}", "scorer.gguf_package=null", "scorer.gguf_file=null",
              "scorer.dtype=float32"]
    code, out, err = call(capsys, [str(run_id), "--features", "0-1", "--db", url, *local(tiny_llama), *scorer,
                                   "--json", "pool_contexts=8"])
    assert code == 0, err
    summary = json.loads(out)
    assert (summary["explained"], summary["scored"]) == (2, 2)
    assert summary["explainer"] == summary["scorer"] == f"local:{tiny_llama}"  # same model, loaded twice
    code, _, err = call(capsys, [str(run_id), "--db", url, "scorer.name=x"])
    assert code == 2 and "scorer.name=x needs --scorer local|openai first" in err
