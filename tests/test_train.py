"""End to end: the real entry point on tiny random models, in-process and as a user runs it."""

import csv
import json
import logging
import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import open_dict

from conftest import REPO, compose_config, run_cli, tiny_overrides
from midisc import run as run_mod
from midisc import train as train_mod
from midisc.publish.write import sha256
from midisc.data.lm import ModelError
from midisc.sae.io import load_sae
from midisc.store import Store, StoreError, UnknownRunError
from midisc.train import train
from midisc.config import ConfigError
from midisc.run_folder import WEIGHTS_FILENAME


def run_tiny(tmp_path, model_dir, texts, *extra, model="tiny_llama", sae=("sae.k=8",), db_url=None):
    db = tmp_path / "runs.db"
    cfg = compose_config(tiny_overrides(model_dir, texts, db, model, sae) + list(extra))
    if db_url:
        with open_dict(cfg):
            cfg.storage.url = db_url
    return train(cfg, tmp_path / "out"), db_url or f"sqlite:///{db}"


def check_recorded(url, result, epochs=2):
    store = Store(url)
    run = store.get_run(result.run_id)
    assert run["status"] == "completed" and run["ended_at"] > run["started_at"]
    assert run["fvu"] == pytest.approx(result.metrics["fvu"]) and run["config"]["layer"] == run["layer"]
    assert [e["epoch"] for e in store.epoch_metrics(result.run_id)] == list(range(epochs))
    assert all("val/fvu" in e["metrics"] for e in store.epoch_metrics(result.run_id))
    features = store.features(result.run_id)
    assert len(features) == result.sae.d_sae == run["d_sae"]
    # Every feature that fired on the held-out tokens has its strongest example stored.
    best = store.feature_examples(result.run_id, kind="top", max_rank=1)
    assert [e["feature_index"] for e in best] == [f["feature_index"] for f in features if f["frequency"] > 0]
    (model,) = store.sae_models(result.run_id)
    assert model["checksum"] == sha256(Path(model["path"]) / WEIGHTS_FILENAME)
    # Evaluated at the end: SAEBench's groups in the database and the run folder, the headline in the metrics.
    (evaluation,) = store.evaluations(result.run_id)
    assert evaluation["eval_type"] == "core" and evaluation["tokens"] > 0
    assert evaluation["result"]["midisc"]["fvu"] == pytest.approx(result.metrics["fvu"])
    assert json.loads((result.output_dir / "evaluation_core.json").read_text()) == evaluation["result"]
    assert "kl_div_score" in result.metrics
    store.close()
    # Published at the end of training: SAELens folder, Neuronpedia package and dashboards, probe, curve.
    out = result.output_dir
    assert (result.sae_dir / "sparsity.safetensors").is_file() and (out / "probe.safetensors").is_file()
    assert (out / f"run-{result.run_id}_neuronpedia" / "feature_analysis.json").is_file()
    assert len(list(out.glob("exports/*/*/features/batch-*.jsonl.gz"))) == -(-result.sae.d_sae // 128)
    curves = list(csv.DictReader(open(out / "curves.csv")))
    assert curves and all(float(row["train/loss"]) > 0 and 0 < float(row["train/lr"]) for row in curves)
    return run


def test_tiny_llama_run_is_recorded_and_reloads_identically(tmp_path, tiny_llama, text_folder):
    result, url = run_tiny(tmp_path, tiny_llama, text_folder)
    run = check_recorded(url, result)
    assert run["hook"] == "model.layers.1" and run["architecture"] == "topk" and run["n_tokens"] > 0
    assert result.metrics["fvu"] < 0.6 and result.metrics["l0"] <= 8
    x = torch.randn(64, result.sae.d_in)
    reloaded = load_sae(result.sae_dir)
    assert torch.equal(reloaded(x).x_hat, result.sae(x).x_hat)


def test_tiny_phi_relu_on_the_seed_hook(tmp_path, tiny_phi, text_folder):
    result, url = run_tiny(tmp_path, tiny_phi, text_folder, model="tiny_phi", sae=("sae=relu", "sae.l1_coef=1e-4"))
    run = check_recorded(url, result)
    assert run["hook"] == "model.layers.1.mlp.fc2" and run["architecture"] == "standard"


def test_without_neuronpedia_only_the_saelens_folder_is_written(tmp_path, tiny_llama, text_folder):
    result, _ = run_tiny(tmp_path, tiny_llama, text_folder, "export.neuronpedia=false", "epochs=1")
    assert (result.sae_dir / "sparsity.safetensors").is_file()
    assert not list(result.output_dir.glob("*_neuronpedia")) and not (result.output_dir / "exports").exists()


def test_disk_cache_is_written_and_reused(tmp_path, tiny_llama, text_folder, caplog):
    extra = ("activations.cache=disk", f"activations.cache_dir={tmp_path / 'cache'}")
    first, _ = run_tiny(tmp_path, tiny_llama, text_folder, *extra)
    (folder,) = [p for p in (tmp_path / "cache").iterdir() if p.is_dir()]
    assert (folder / "manifest.json").is_file() and list(folder.glob("shard-*.safetensors"))
    caplog.set_level(logging.INFO, logger="midisc.run")
    second, _ = run_tiny(tmp_path, tiny_llama, text_folder, *extra)
    assert second.metrics["n_tokens"] == first.metrics["n_tokens"]
    assert f"reusing cached activations from {folder}" in caplog.text
    assert second.metrics["fvu"] == pytest.approx(first.metrics["fvu"], rel=0.2)


@pytest.mark.parametrize("extra, error, message", [
    (("layer=7",), ModelError, "layer=7 is out of range: this model has 3 blocks, valid layers are 0..2"),
    (("model.site=resid_pre",), ModelError, "valid sites: resid, mlp, attn"),
    (("sae.k=500",), ConfigError, "k=500 is larger than the SAE width 128 (expansion 4 x d_in 32)"),
    (("data.path=/no/such/texts",), Exception, "data.path='/no/such/texts' is not a folder"),
    (("storage.url=postgresql+psycopg2://me:s3cret@127.0.0.1:1/db",), StoreError, "127.0.0.1"),
    (("batch_size=100000",), ConfigError, "fewer than one batch of batch_size=100000"),
    (("export.features_per_batch=0",), ConfigError, "export.features_per_batch=0 is too small; it must be >= 1"),
    (("export.neuronpedia=maybe",), ConfigError, "export.neuronpedia must be true or false, got 'maybe'"),
])
def test_bad_input_fails_with_one_line(tmp_path, tiny_llama, text_folder, monkeypatch, extra, error, message):
    def load_model(*args, **kwargs):
        raise AssertionError("the weights were loaded before the bad input was found")

    monkeypatch.setattr(train_mod.lm, "load_model", load_model)  # every check here needs no weights
    with pytest.raises(error) as info:
        run_tiny(tmp_path, tiny_llama, text_folder, *extra)
    assert message in str(info.value) and "\n" not in str(info.value) and "s3cret" not in str(info.value)


def test_a_crash_marks_the_run_failed_with_the_error(tmp_path, tiny_llama, text_folder, monkeypatch):
    def boom(self, batch, batch_idx):
        raise RuntimeError("simulated crash in the training step")

    monkeypatch.setattr(run_mod.SAEModule, "training_step", boom)
    with pytest.raises(RuntimeError):
        run_tiny(tmp_path, tiny_llama, text_folder)
    (run,) = Store(f"sqlite:///{tmp_path / 'runs.db'}").list_runs()
    assert run["status"] == "failed" and "simulated crash" in run["error"] and run["ended_at"]


def test_ctrl_c_marks_the_run_interrupted(tmp_path, tiny_llama, text_folder, monkeypatch):
    def interrupt(self, batch, batch_idx):
        raise KeyboardInterrupt

    monkeypatch.setattr(run_mod.SAEModule, "training_step", interrupt)
    previous = signal.getsignal(signal.SIGINT)
    try:
        with pytest.raises((KeyboardInterrupt, SystemExit)):
            run_tiny(tmp_path, tiny_llama, text_folder)
    finally:
        signal.signal(signal.SIGINT, previous)  # Lightning ignores SIGINT while shutting down
    (run,) = Store(f"sqlite:///{tmp_path / 'runs.db'}").list_runs()
    assert run["status"] == "interrupted"


def test_postgres_run(tmp_path, tiny_llama, text_folder, postgres_url):
    result, url = run_tiny(tmp_path, tiny_llama, text_folder, db_url=postgres_url)
    check_recorded(url, result)


def cli_args(tiny_llama, text_folder, db):
    return ["midisc.train", *tiny_overrides(tiny_llama, text_folder, db)]


def test_cli_single_run_prints_where_everything_is(tmp_path, tiny_llama, text_folder):
    proc = run_cli(cli_args(tiny_llama, text_folder, tmp_path / "runs.db"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "run 1 completed" in proc.stdout and "FVU" in proc.stdout and "dead" in proc.stdout
    assert "features by firing frequency (held-out tokens): never" in proc.stdout and "midisc.explore top 1" in proc.stdout
    sae_dir = Path(proc.stdout.split("SAE:")[1].split()[0])
    assert (sae_dir / "cfg.json").is_file() and sae_dir.is_relative_to(tmp_path / "outputs")
    # Each "dead" says what it counts.
    assert "not fired in the last 2,048 training tokens" in proc.stdout and "never fired on the" in proc.stdout
    # The log holds what the terminal showed, line for line, each with its time; piped, no bar was drawn.
    logged = (sae_dir.parent / "train.log").read_text().splitlines()
    assert [line.split(" INFO ", 1)[-1] for line in logged] == proc.stdout.splitlines()
    assert logged[0].endswith("run 1: topk SAE (expansion=4  k=8  aux_k_coef=0.125  aux_k=None) on model.layers.1 "
                              f"of {tiny_llama}")
    assert sum(line.split(" INFO ")[-1].startswith("epoch ") for line in logged) == 2
    assert proc.stderr == ""
    # The closing hint, run as printed, reads the run's own database (not the default one beside it).
    hint = proc.stdout.split("explore:")[1].strip().splitlines()[0]
    assert hint == f"python -m midisc.explore top 1 --db 'sqlite:///{tmp_path / 'runs.db'}'"
    shown = run_cli([*shlex.split(hint)[2:], "--json"], cwd=tmp_path)
    assert shown.returncode == 0 and json.loads(shown.stdout), shown.stderr


@pytest.mark.slow
def test_cli_multirun_sweep_records_each_job(tmp_path, tiny_llama, text_folder):
    db = tmp_path / "runs.db"
    base = cli_args(tiny_llama, text_folder, db)
    args = [base[0], "-m", *base[1:], "sae.k=4,8", "layer=0,1"]
    proc = run_cli(args, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    runs = Store(f"sqlite:///{db}").list_runs()
    assert len(runs) == 4 and {r["status"] for r in runs} == {"completed"}
    assert {(r["layer"], r["config"]["sae"]["k"]) for r in runs} == {(0, 4), (0, 8), (1, 4), (1, 8)}
    (sweep,) = list((tmp_path / "multirun").glob("*/*"))
    names = sorted(p.name for p in sweep.iterdir() if p.is_dir())
    assert len(names) == 4 and all("/" not in n and "data.path" not in n for n in names)
    for layer, k in [(0, 4), (0, 8), (1, 4), (1, 8)]:  # named after the overrides, paths left out
        assert sum(f"layer={layer}," in n and n.endswith(f"sae.k={k}") for n in names) == 1
    listed = run_cli(["midisc.explore", "list", "--json", "--sweep", str(sweep.relative_to(tmp_path)),
                      "--db", f"sqlite:///{db}"], cwd=tmp_path)
    assert listed.returncode == 0 and len(json.loads(listed.stdout)) == 4
    # One sweep in the database, each job with its own overrides.
    assert {r["sweep_id"] for r in runs} == {str(sweep)}
    assert all(f"sae.k={r['config']['sae']['k']}" in r["overrides"] for r in runs)
    # The language model ran once per layer; the other job on that layer read the shared disk cache.
    logs = [p.read_text() for p in sweep.glob("*/train.log")]
    assert len(logs) == 4 and sum("reusing cached activations" in log for log in logs) == 2
    assert len([p for p in (tmp_path / "outputs" / "activation_cache").iterdir() if p.is_dir()]) == 2
    compared = run_cli(["midisc.explore", "compare", "latest", "--json", "--db", f"sqlite:///{db}"], cwd=tmp_path)
    assert compared.returncode == 0, compared.stderr
    report = json.loads(compared.stdout)
    assert report["sweep_id"] == str(sweep) and Path(report["plot"]) == sweep / "frontier.png"
    assert (sweep / "frontier.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(report["runs"]) == 4 and any(r["frontier"] for r in report["runs"])
    runs_by_id = {r["id"]: r for r in runs}
    for row in report["runs"]:  # the spliced-in scores of each job's evaluation, where its model gave one
        metrics = runs_by_id[row["id"]]["metrics"]
        assert (row["ce_loss_score"], row["kl_div_score"]) == (metrics.get("ce_loss_score"), metrics.get("kl_div_score"))
    assert {r["job"] for r in report["runs"]} == {f"sae.k={k} layer={layer}" for k in (4, 8) for layer in (0, 1)}


@pytest.mark.slow
def test_parallel_jobs_harvest_once_and_the_other_waits_then_reuses(tmp_path, tiny_llama, text_folder):
    db = tmp_path / "runs.db"
    base = cli_args(tiny_llama, text_folder, db)
    proc = run_cli([base[0], "-m", *base[1:], "sae.k=4,8", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2"],
                   cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = Store(f"sqlite:///{db}").list_runs()
    assert len(runs) == 2 and {r["status"] for r in runs} == {"completed"} and len({r["sweep_id"] for r in runs}) == 1
    logs = [p.read_text() for p in tmp_path.glob("multirun/*/*/*/train.log")]
    assert len(logs) == 2 and sum("reusing cached activations" in log for log in logs) == 1


def test_cli_error_is_one_line_without_traceback(tmp_path, tiny_llama, text_folder):
    proc = run_cli(cli_args(tiny_llama, text_folder, tmp_path / "runs.db") + ["layer=9"], cwd=tmp_path)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: layer=9 is out of range")
    assert not list((tmp_path / "outputs").glob("*/*")), "a refused config leaves no run folder"


def test_seed_phi2_fails_clearly_without_the_model(tmp_path):
    proc = run_cli(["midisc.train", "experiment=seed_phi2", f"storage.url=sqlite:///{tmp_path / 'r.db'}"],
                   cwd=tmp_path, env={"HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "model 'microsoft/phi-2' is not available" in proc.stderr.strip().splitlines()[-1]


def test_a_run_that_fails_after_it_started_keeps_its_folder_and_the_error_in_its_log(tmp_path, tiny_llama,
                                                                                      text_folder):
    proc = run_cli(cli_args(tiny_llama, text_folder, tmp_path / "runs.db") + ["batch_size=1000000"], cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    (log,) = tmp_path.glob("outputs/*/*/train.log")
    text = log.read_text()
    assert text.splitlines()[0].endswith(f"of {tiny_llama}")  # the plan, then the refusal the terminal showed
    assert text.strip().splitlines()[-1].endswith(proc.stderr.strip().splitlines()[-1])
    (run,) = Store(f"sqlite:///{tmp_path / 'runs.db'}").list_runs()
    assert run["status"] == "failed" and Path(run["output_dir"]) == log.parent


@pytest.mark.parametrize("args, hint", [
    (["sae.expanson=16"], "error: sae.expanson is not a key of sae; did you mean sae.expansion?"),
    (["-m", "layr=3,4"], "error: layr is not a config key; did you mean layer?"),
    (["sae=relu", "sae.l1_coeff=1e-3"], "error: sae.l1_coeff is not a key of sae; did you mean sae.l1_coef?"),
])
def test_a_misspelt_key_is_refused_in_one_line_with_a_suggestion(tmp_path, args, hint):
    proc = run_cli(["midisc.train", *args, "storage=none"], cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr.strip() == hint
    assert not (tmp_path / "outputs").exists() and not (tmp_path / "multirun").exists()


@pytest.mark.slow
def test_runs_launched_together_each_get_their_own_folder(tmp_path, tiny_llama, text_folder):
    args = [sys.executable, "-m", *cli_args(tiny_llama, text_folder, tmp_path / "runs.db")]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    # Started within a few milliseconds of each other, as four shells or `&` would.
    procs = [subprocess.Popen(args + [f"seed={i}"], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(3)]
    outputs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], [err[-1500:] for _, err in outputs]
    runs = Store(f"sqlite:///{tmp_path / 'runs.db'}").list_runs()
    assert {r["status"] for r in runs} == {"completed"} and len({r["output_dir"] for r in runs}) == 3
    folders = list(tmp_path.glob("outputs/*/*"))
    assert len(folders) == 3 and all((f / "train.log").read_text() and (f / ".hydra").is_dir() for f in folders)


# Found by bench/fault_fuzz.py: sizes that passed the checks and failed in an allocation (a traceback) once the
# weights had loaded, or once the run had trained; now refused with the config's other mistakes.
@pytest.mark.parametrize("extra, message", [
    (("sae.expansion=1000000000000",), "an SAE of 32,000,000,000,000 features on d_in 32 (sae.expansion x d_in) "
                                       "needs 33,280,000.0 GB to train"),
    (("sae.expansion=18446744073709551616",), "sae.expansion=18446744073709551616 with d_in=32 makes an SAE too large "
                                              "to build (randn(): argument 'size' failed to unpack"),
    (("analysis.n_top=1000000000000",), "analysis keeps 1,000,000,000,010 examples (n_top + n_quantile) of 21 tokens"),
    (("analysis.before=1000000000000",), "of 1,000,000,000,005 tokens (before + 1 + after) for each of the SAE's 128"),
])
def test_sizes_past_memory_are_refused_before_the_weights_load(tmp_path, tiny_llama, text_folder, monkeypatch,
                                                                 extra, message):
    def load_model(*args, **kwargs):
        raise AssertionError("the weights were loaded before the bad input was found")

    monkeypatch.setattr(train_mod.lm, "load_model", load_model)
    with pytest.raises(ConfigError) as info:
        run_tiny(tmp_path, tiny_llama, text_folder, *extra)
    assert message in str(info.value) and "\n" not in str(info.value)
    assert not Store(f"sqlite:///{tmp_path / 'runs.db'}").list_runs()  # refused before a run was recorded


def test_a_raw_hook_s_sae_past_memory_is_refused_before_the_harvest(tmp_path, tiny_llama, text_folder):
    # A module path's width is known once the model has run one context: the check comes then, not before.
    with pytest.raises(ConfigError, match="analysis keeps 1,000,000,000,010 examples"):
        run_tiny(tmp_path, tiny_llama, text_folder, "model.hook=model.layers.0.mlp", "analysis.n_top=1000000000000")


@pytest.mark.parametrize("resume, message", [(0, "resume must be a run id (an integer >= 1), got 0"),
                                             (7, "resume=7: no run with id 7")])
def test_a_resume_of_no_run_names_the_setting(tmp_path, resume, message):
    cfg = compose_config([f"resume={resume}", f"storage.url=sqlite:///{tmp_path / 'runs.db'}"])
    with pytest.raises((ConfigError, UnknownRunError)) as info:
        train_mod.resumed_config(cfg)
    assert str(info.value).startswith(message)
