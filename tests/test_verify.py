"""`midisc.verify` passes on a fresh run and fails, naming the check, on each kind of corruption;
`midisc.export` writes the same files again from the database."""

import gzip
import json
import shutil
import sqlite3
import tarfile

import numpy as np
import pytest
from safetensors.torch import load_file, save_file

from midisc import analyze, explore, verify
from midisc.cli import run_tool
from midisc.export import main as export_main
from midisc.store import Store


def checks(capsys, *args):
    code = verify.main([*map(str, args), "--json"])
    report = json.loads(capsys.readouterr().out)
    return code, {c["name"]: c for c in report["checks"]}, report


def test_a_fresh_run_passes_every_check(published, capsys):
    out, url, run_id = published
    code, results, report = checks(capsys, run_id, "--db", url)
    assert code == 0 and report["passed"], results
    skipped = {name for name, c in results.items() if c["status"] == "SKIP"}
    assert skipped <= {"SAELens loads it"}  # only when SAELens is not installed
    assert "fresh tokens" in results["fresh reconstruction"]["reason"]
    assert json.loads((out / "verification.json").read_text())["passed"]


def rewrite_weights(out, change):
    path = out / "sae" / "sae_weights.safetensors"
    tensors = load_file(str(path))
    change(tensors)
    save_file(tensors, str(path))


def edit_json(path, change):
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def drop_field(out):
    (path,) = (out / "exports").glob("*/*/features/batch-0.jsonl.gz")
    rows = [json.loads(line) for line in gzip.decompress(path.read_bytes()).decode().splitlines()]
    del rows[3]["freq_hist_data_bar_heights"]
    path.write_bytes(gzip.compress("".join(json.dumps(r) + "\n" for r in rows).encode()))


def set_db(url, sql):
    with sqlite3.connect(url.removeprefix("sqlite:///")) as db:
        db.execute(sql)


CORRUPTIONS = {
    "wrong shape": (lambda out, url: rewrite_weights(out, lambda t: t.update(W_enc=t["W_enc"][:, :-1].contiguous())),
                    "shapes agree", "W_enc has shape"),
    "NaN": (lambda out, url: rewrite_weights(out, lambda t: t["W_dec"].__setitem__((0, 0), float("nan"))),
            "weights finite", "NaN or infinite"),
    "edited cfg": (lambda out, url: edit_json(out / "sae" / "cfg.json",
                                              lambda c: c["metadata"].update(hook_name="model.layers.0")),
                   "files match the database", "metadata.hook_name is 'model.layers.0'"),
    "missing file": (lambda out, url: (out / "sae" / "sparsity.safetensors").unlink(),
                     "files present", "sparsity.safetensors"),
    "wrong checksum": (lambda out, url: rewrite_weights(out, lambda t: t["b_enc"].add_(0.01)),
                       "checksum matches", "recorded"),
    "changed weights": (lambda out, url: rewrite_weights(out, lambda t: t["b_enc"].add_(0.01)),
                        "reload reproduces outputs", "differ from those recorded"),
    "long decoder row": (lambda out, url: rewrite_weights(out, lambda t: t["W_dec"][4].mul_(1.5)),
                         "decoder rows unit norm", "decoder row 4 has norm 1.5"),
    "package copy": (lambda out, url: np.save(next(out.glob("*_neuronpedia")) / "decoder_weights.npy",
                                              np.zeros((128, 32), dtype=np.float32)),
                     "package copies agree", "decoder_weights.npy differs"),
    "dashboard field": (lambda out, url: drop_field(out), "dashboard files valid",
                        "'freq_hist_data_bar_heights' is missing"),
    "dead flag": (lambda out, url: edit_json(next(out.glob("*_neuronpedia")) / "feature_analysis.json",
                                             lambda a: a["features"][0].update(is_dead=not a["features"][0]["is_dead"])),
                  "dead features agree", "dead-feature counts disagree"),
    "recorded FVU": (lambda out, url: set_db(url, "UPDATE training_runs SET fvu = fvu + 0.3"),
                     "fresh reconstruction", "recorded"),
}


@pytest.mark.parametrize("name", CORRUPTIONS)
def test_each_corruption_fails_its_named_check(published, capsys, name):
    out, url, run_id = published
    corrupt, check, reason = CORRUPTIONS[name]
    corrupt(out, url)
    code, results, _ = checks(capsys, run_id, "--db", url, "--package", *([] if "FVU" in name else ["--no-model"]))
    assert code == 1
    assert results[check]["status"] == "FAIL" and reason in results[check]["reason"], results[check]
    assert not list(out.glob("*_publish.tar.gz"))  # nothing broken gets packaged


def test_visualize_and_package_on_a_passing_run(published, capsys):
    out, url, run_id = published
    assert verify.main([str(run_id), "--db", url, "--no-model", "--visualize", "--package"]) == 0
    text = capsys.readouterr().out
    assert "FAIL" not in text and "wrote" in text
    pngs = sorted(p.name for p in (out / "plots").iterdir())
    assert pngs == ["feature_density.png", "frequency_vs_max.png", "training_curves.png"]
    assert all((out / "plots" / p).stat().st_size > 5000 for p in pngs)
    (archive,) = out.glob("run-*_publish.tar.gz")
    with tarfile.open(archive) as tar:
        names = tar.getnames()
    assert f"run-{run_id}/sae/sae_weights.safetensors" in names and f"run-{run_id}/verification.json" in names
    assert any(n.endswith("neuronpedia/decoder_weights.npy") for n in names)
    assert any("/exports/" in n and n.endswith("activations/batch-0.jsonl.gz") for n in names)


def test_a_folder_without_its_database_checks_the_files_and_skips_the_records(published, capsys, tmp_path):
    out, _, _ = published
    code, results, _ = checks(capsys, out / "sae", "--db", f"sqlite:///{tmp_path / 'other.db'}")
    assert code == 0
    assert results["checksum matches"]["status"] == "SKIP" and results["weights finite"]["status"] == "PASS"
    assert results["dashboard files valid"]["status"] == "PASS"


def test_a_missing_target_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        verify.run_tool(verify.main, [str(tmp_path / "nowhere")])
    assert exit_.value.code == 2
    assert "does not exist; give a run id" in capsys.readouterr().err


def test_export_rewrites_the_files_and_leaves_the_recorded_weights(published, capsys, tmp_path):
    out, url, run_id = published
    weights = (out / "sae" / "sae_weights.safetensors").read_bytes()
    with Store(url) as store:
        profiles = store.feature_profiles(run_id, range(store.feature_count(run_id)))
    set_db(url, "DELETE FROM feature_profiles")  # as for a run trained before the table existed
    shutil.rmtree(next(out.glob("*_neuronpedia")))
    assert export_main([str(run_id), "--db", url, "--set-name", "res-test"]) == 0
    (dashboards,) = out.glob("exports/*/*")  # the new set replaced the one it supersedes
    assert "res-test" in capsys.readouterr().out and dashboards.name.endswith("res-test")
    assert (out / "sae" / "sae_weights.safetensors").read_bytes() == weights
    with Store(url) as store:  # the dashboards' profiles are measured again, the same
        assert store.feature_profiles(run_id, range(len(profiles))) == profiles and len(profiles) == 128
    code, results, _ = checks(capsys, run_id, "--db", url, "--no-model", "--package")
    assert code == 0, results
    assert results["files present"]["status"] == "PASS"
    with tarfile.open(next(out.glob("run-*_publish.tar.gz"))) as tar:
        sets = {"/".join(n.split("/")[1:4]) for n in tar.getnames() if n.split("/")[1] == "exports" and n.count("/") > 3}
    assert sets == {str(dashboards.relative_to(out))}
    assert export_main([str(run_id), "--db", url, "--out", str(tmp_path / "elsewhere"), "--no-model"]) == 0
    assert (tmp_path / "elsewhere" / "sae" / "sae_weights.safetensors").read_bytes() == weights
    assert not (tmp_path / "elsewhere" / "exports").exists()
    with Store(url) as store:  # an export without the model keeps the profiles it could not measure again
        assert store.feature_profiles(run_id, range(len(profiles))) == profiles


def test_statistics_replaced_after_export_are_reported_stale_until_exported_again(published, capsys):
    out, url, run_id = published
    set_db(url, "UPDATE discovered_features SET frequency = frequency * 2 WHERE feature_index = 3")  # as analyze does
    code, results, _ = checks(capsys, run_id, "--db", url, "--no-model")
    assert code == 1 and "python -m midisc.export" in results["dead features agree"]["reason"]
    assert export_main([str(run_id), "--db", url]) == 0
    capsys.readouterr()
    code, results, _ = checks(capsys, run_id, "--db", url, "--no-model")
    assert code == 0, results


def test_a_reanalysis_makes_the_exports_again_so_nothing_in_the_folder_is_stale(published, capsys):
    out, url, run_id = published
    metadata = out / f"run-{run_id}_neuronpedia" / "neuronpedia_metadata.json"
    before = json.loads(metadata.read_text())["analysed_tokens"]
    assert analyze.main([str(run_id), "--tokens", "3000", "--db", url]) == 0
    assert "exports made again from the new analysis" in capsys.readouterr().out
    with Store(url) as store:
        analysed = store.get_run(run_id)["metrics"]["analysed_tokens"]
    assert analysed != before and json.loads(metadata.read_text())["analysed_tokens"] == analysed
    code, results, _ = checks(capsys, run_id, "--db", url, "--no-model")
    assert code == 0, {k: v for k, v in results.items() if v["status"] == "FAIL"}


@pytest.mark.parametrize("damage", ["truncated", "garbled header"])
def test_a_damaged_weights_file_is_one_line_in_every_tool(published, capsys, damage):
    out, url, run_id = published
    path = out / "sae" / "sae_weights.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3] if damage == "truncated" else b"\xff" * 16 + data[16:])

    code, results, _ = checks(capsys, run_id, "--db", url, "--no-model")
    failed = {name: c["reason"] for name, c in results.items() if c["status"] == "FAIL"}
    assert code == 1 and failed and all("\n" not in reason for reason in failed.values())
    assert any("sae_weights.safetensors" in reason for reason in failed.values()), failed
    said = f"run {run_id}'s SAE does not load: {path} cannot be read ("
    # explore details shows what the database holds, and why the output tokens, which need the SAE, are missing
    with pytest.raises(SystemExit) as details:
        run_tool(explore.main, ["details", str(run_id), "0", "--db", url])
    assert details.value.code == 0 and f"not shown: {said}" in capsys.readouterr().out
    with pytest.raises(SystemExit) as analyzed:
        run_tool(analyze.main, [str(run_id), "--db", url])
    err = capsys.readouterr().err.strip()
    assert analyzed.value.code == 2 and err.startswith(f"error: {said}") and "\n" not in err, err[-2000:]


def test_a_database_deleted_while_analyze_runs_is_one_line(published, capsys, monkeypatch):
    out, url, run_id = published
    original = analyze.analyze_features

    def analyse_then_lose_the_database(*args, **kwargs):
        result = original(*args, **kwargs)
        (out.parent / "runs.db").unlink()
        return result

    monkeypatch.setattr(analyze, "analyze_features", analyse_then_lose_the_database)
    with pytest.raises(SystemExit) as stopped:
        run_tool(analyze.main, [str(run_id), "--db", url])
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]  # after the progress bars
    assert stopped.value.code == 2 and "Traceback" not in err and "\nerror: " not in err.strip().replace(last, "")
    assert last.startswith("error: the database stopped working during the command (") and "deleted" in last
