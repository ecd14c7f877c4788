"""Concept testing end to end on the planted run: the planted feature must win its concept."""

import json

import pytest

from conftest import make_texts, run_cli
from midisc import concepts
from midisc.cli import run_tool
from midisc.store import Store
from transformers import AutoTokenizer


@pytest.fixture(scope="module")
def run(planted_run, tiny_llama):
    found = planted_run
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)

    def has_token(text):
        return found.token in tokenizer(text, add_special_tokens=False)["input_ids"]

    # Concept: short texts that contain the planted token; contrast modules: texts that do not.
    words = [w for w in " ".join(make_texts(200, seed=3)).split()]
    concept = [line for line in (" ".join(words[i:i + 8]) for i in range(0, len(words) - 8, 3)) if has_token(line)]
    others = [line for line in (" ".join(words[i:i + 8]) for i in range(1, len(words) - 8, 5)) if not has_token(line)]
    assert len(concept) >= 5 and len(others) >= 60
    (found.workdir / "marker.txt").write_text("# texts with the planted token\n" + "\n".join(concept[:40]))
    modules = found.workdir / "modules"
    modules.mkdir(exist_ok=True)
    (modules / "plain.txt").write_text("\n".join(others[:30]))
    (modules / "other.txt").write_text("\n".join(others[30:60]))
    found.modules = modules
    return found


def test_the_planted_feature_is_the_most_selective_for_its_token(run, capsys):
    args = [str(run.run_id), "--custom-texts", str(run.workdir / "marker.txt"), "--modules", str(run.modules),
            "--corpus-sample", "0", "--top-features", "5", "--db", run.url]
    assert concepts.main([*args, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)["concepts"]["marker"]
    best = result["features"][0]
    assert best["feature_index"] == 0 and best["score"] == 1.0
    assert best["fire_rate_concept"] == 1.0 and best["fire_rate_contrast"] == 0.0
    assert result["n_contrast"] == 60 and len(result["features"]) == 5
    with Store(run.url) as store:
        stored = store.concept_scores(run.run_id, "marker")
    assert [r["feature_index"] for r in stored] == [r["feature_index"] for r in result["features"]]
    assert concepts.main(args) == 0
    table = capsys.readouterr().out
    assert "marker: " in table and "AUROC" in table and f"[[{run.text}]]" in table


def test_all_scores_every_module_and_prints_the_best_of_each(run, capsys):
    args = [str(run.run_id), "--all", "--modules", str(run.modules), "--corpus-sample", "3", "--db", run.url]
    assert concepts.main(args) == 0
    out = capsys.readouterr().out
    assert "best feature per concept" in out and "plain" in out and "other" in out and "concept" in out
    with Store(run.url) as store:
        assert {"plain", "other"} <= set(store.concepts(run.run_id))


def test_shipped_modules_by_name(run, capsys):
    args = [str(run.run_id), "--concepts", "numbers,questions", "--top-features", "2", "--json", "--db", run.url]
    assert concepts.main(args) == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result["concepts"]) == {"numbers", "questions"} and result["corpus_sample"] > 0
    for scores in result["concepts"].values():
        assert 0.5 <= scores["features"][0]["score"] <= 1.0 and scores["n_concept"] >= 50


@pytest.mark.parametrize("args, message", [
    (["--concepts", "emotion"], "unknown concept 'emotion'; modules in"),
    (["--custom-texts", "/no/such.txt"], "cannot read concept texts from /no/such.txt"),
    (["--concepts", "numbers", "--top-features", "0"], "--top-features=0 must be >= 1"),
    (["--concepts", "numbers", "--name", "x"], "--name names a --custom-texts concept; give --custom-texts FILE too"),
    (["--custom-texts", "/no/such.txt", "--name", " "], "--name=' ' must be a non-empty concept name"),
])
def test_mistakes_get_one_line(run, args, message, capsys):
    with pytest.raises(SystemExit) as stopped:  # in-process, through run_tool as `python -m` runs it
        run_tool(concepts.main, [str(run.run_id), *args, "--db", run.url])
    err = capsys.readouterr().err.strip()
    assert stopped.value.code == 2 and err.startswith(f"error: {message}") and "\n" not in err


def test_a_custom_concept_can_be_named(run, capsys):
    args = [str(run.run_id), "--custom-texts", str(run.workdir / "marker.txt"), "--name", "planted token",
            "--modules", str(run.modules), "--corpus-sample", "0", "--top-features", "3", "--json", "--db", run.url]
    assert concepts.main(args) == 0
    assert set(json.loads(capsys.readouterr().out)["concepts"]) == {"planted token"}
    with Store(run.url) as store:
        assert len(store.concept_scores(run.run_id, "planted token")) == 3


def test_the_old_name_interpret_still_works_with_a_notice(tmp_path):
    proc = run_cli(["midisc.interpret", "--help"], cwd=tmp_path, timeout=120)
    assert proc.returncode == 0 and "usage: python -m midisc.concepts" in proc.stdout
    assert proc.stderr.strip() == "note: midisc.interpret is now midisc.concepts; running: python -m midisc.concepts --help"
