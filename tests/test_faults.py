"""Runs that meet faults lose nothing: kill -9 and resume, Ctrl-C, a NaN loss, the database going away.

The fault tests run against the real PostgreSQL server (`postgres_url` skips without one; CI has one).
"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from omegaconf import open_dict
from sqlalchemy import text
from sqlalchemy.engine import make_url

from conftest import REPO, compose_config, run_cli, tiny_overrides
from midisc import run as run_mod
from midisc import train as train_mod
from midisc.training.checkpoints import CheckpointError
from midisc.db import main as db_main
from midisc.training.module import NonFiniteLossError
from midisc.store import Store, UnknownRunError, storage_argument
from midisc.train import train
from proxy import Proxy
from midisc.run_folder import CHECKPOINT_DIR, LAST, PENDING_FILENAME, PREVIOUS

SECRET = "S3cr-t-pa55"  # trust auth ignores it, so it can travel in the URL without breaking the login


def tiny_cfg(tiny_llama, text_folder, url, *extra):
    cfg = compose_config(tiny_overrides(tiny_llama, text_folder, None) + list(extra))
    with open_dict(cfg):
        cfg.storage.url = url
    return cfg


def row_counts(store: Store, run_id: int) -> dict[str, int]:
    return {"epochs": len(store.epoch_metrics(run_id)), "features": len(store.features(run_id)),
            "examples": len(store.feature_examples(run_id)), "sae_models": len(store.sae_models(run_id))}


def _interruptible() -> None:
    # A shell without job control starts background commands with SIGINT ignored, and the ignoring is inherited:
    # Python then never raises KeyboardInterrupt. CI launched that way would test nothing, so undo it in the child.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start_cli(args: list[str], cwd: Path, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", *args], cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})},
                            preexec_fn=_interruptible)


def wait_for(path_glob: str, root: Path, proc: subprocess.Popen, timeout: float = 120) -> Path:
    deadline = time.time() + timeout
    while time.time() < deadline:
        found = list(root.glob(path_glob))
        if found:
            return found[0]
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"the run ended (status {proc.returncode}) before {path_glob} appeared:\n{err[-3000:]}")
        time.sleep(0.05)
    proc.kill()
    pytest.fail(f"{path_glob} did not appear within {timeout} s")


def files_holding(root: Path, secret: str) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and secret.encode() in p.read_bytes()]


@pytest.mark.slow
def test_a_killed_run_resumes_into_the_same_run_and_no_file_holds_the_password(
        tmp_path, tiny_llama, text_folder, postgres_url):
    url = postgres_url.replace("postgres@", f"postgres:{SECRET}@", 1)
    assert make_url(url).password == SECRET
    overrides = [o for o in tiny_overrides(tiny_llama, text_folder, None) if not o.startswith("storage.url")]
    settings = ["epochs=6", "checkpoint_every=2"]
    args = ["midisc.train", *overrides, *settings, f"storage.url='{url}'"]

    proc = start_cli(args, tmp_path)
    wait_for(f"outputs/*/*/{CHECKPOINT_DIR}/{LAST}", tmp_path, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    with Store(postgres_url) as store:
        (run,) = store.list_runs()
        assert run["status"] == "running"  # kill -9 leaves no chance to record anything

    resumed = run_cli(["midisc.train", f"resume={run['id']}", f"storage.url='{url}'"], cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming run {run['id']} from step" in resumed.stdout + resumed.stderr
    assert f"run {run['id']} completed" in resumed.stdout
    with Store(postgres_url) as store:
        (after,) = store.list_runs()
        assert after["status"] == "completed" and after["output_dir"] == run["output_dir"]
        resumed_counts = row_counts(store, run["id"])
    assert not (Path(run["output_dir"]) / CHECKPOINT_DIR).exists()  # removed once the run completed
    # The resume logged into the run's own train.log and left no folder of its own behind.
    assert [p for p in (tmp_path / "outputs").glob("*/*") if p.is_dir()] == [Path(run["output_dir"])]
    log_text = (Path(run["output_dir"]) / "train.log").read_text()
    assert f"resuming run {run['id']} from step" in log_text

    # The same run without the kill: the same rows.
    baseline = train(tiny_cfg(tiny_llama, text_folder, f"sqlite:///{tmp_path / 'base.db'}", *settings),
                     tmp_path / "baseline")
    with Store(f"sqlite:///{tmp_path / 'base.db'}") as store:
        assert resumed_counts == row_counts(store, baseline.run_id)
    assert resumed_counts["epochs"] == 6

    # The password: nowhere in what either invocation wrote, nor in the database.
    assert files_holding(tmp_path / "outputs", SECRET) == []
    with Store(postgres_url) as store:
        engine = store._engine
        with engine.connect() as connection:
            for table in ("training_runs", "epoch_metrics", "sae_models"):
                dump = " ".join(map(str, connection.execute(text(f"SELECT * FROM {table}")).all()))
                assert SECRET not in dump, table
    assert SECRET not in resumed.stdout + resumed.stderr


@pytest.mark.slow
@pytest.mark.parametrize("launcher", [[], ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"]],
                         ids=["basic", "joblib"])
def test_a_sweep_keeps_the_password_out_of_every_file_row_and_line(tmp_path, tiny_llama, text_folder, postgres_url,
                                                                   launcher):
    # Hydra writes a sweep's overrides escaped (postgresql+psycopg2\://postgres\:SECRET@…), a spelling the
    # redaction once missed: the password stayed in each job's .hydra files, its overrides row and the console.
    url = postgres_url.replace("postgres@", f"postgres:{SECRET}@", 1)
    overrides = [o for o in tiny_overrides(tiny_llama, text_folder, None) if not o.startswith("storage.url")]
    typed = url.replace("=", "\\=")  # unquoted, as people type it; the test schema's options need the = escaped
    proc = run_cli(["midisc.train", "-m", *overrides, "seed=1,2", "epochs=1", f"storage.url={typed}", *launcher],
                   cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "#1 : " in proc.stdout + proc.stderr and "\\:***@" in proc.stdout + proc.stderr
    assert SECRET not in proc.stdout + proc.stderr
    assert len(list(tmp_path.glob("multirun/*/*/*/.hydra/overrides.yaml"))) == 2
    assert files_holding(tmp_path, SECRET) == []
    with Store(postgres_url) as store:
        runs = store.list_runs()
    assert len(runs) == 2 and {r["status"] for r in runs} == {"completed"}
    assert SECRET not in repr(runs)
    assert all(any(o.startswith("storage.url=") and ":***@" in o for o in r["overrides"]) for r in runs)


@pytest.mark.slow
def test_ctrl_c_marks_the_run_interrupted_keeps_its_metrics_and_saves_a_checkpoint(
        tmp_path, tiny_llama, text_folder, postgres_url):
    overrides = [o for o in tiny_overrides(tiny_llama, text_folder, None) if not o.startswith("storage.url")]
    # The URL through $MIDISC_DB_URL, which storage=sqlite (the default) reads.
    proc = start_cli(["midisc.train", *overrides, "epochs=40", "checkpoint_every=1000"], tmp_path,
                     env={"MIDISC_DB_URL": postgres_url})
    with Store(postgres_url) as store:
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            runs = store.list_runs()
            if runs and len(store.epoch_metrics(runs[0]["id"])) >= 2:
                break
            time.sleep(0.1)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 130, (out[-2000:], err[-3000:])
        (run,) = store.list_runs()
        assert run["status"] == "interrupted" and f"resume={run['id']}" in run["error"]
        assert f"python -m midisc.train resume={run['id']}" in err and "Traceback" not in err
        kept = len(store.epoch_metrics(run["id"]))
        assert 2 <= kept < 40
    output_dir = Path(run["output_dir"])
    assert (output_dir / CHECKPOINT_DIR / LAST).is_file()

    # Resumed in-process with the stored config: the same run goes on to the end, its epochs kept once each.
    cfg = compose_config(["resume=" + str(run["id"]), f"storage.url='{postgres_url}'"])
    cfg, folder = train_mod.resumed_config(cfg)
    assert folder == output_dir and cfg.epochs == 40
    with open_dict(cfg):
        cfg.epochs = cfg.trainer.max_epochs = kept + 1  # a shorter finish: it carries on from the checkpoint
    result = train(cfg, folder)
    with Store(postgres_url) as store:
        assert [e["epoch"] for e in store.epoch_metrics(run["id"])] == list(range(kept + 1))
        assert store.get_run(run["id"])["status"] == "completed" and result.run_id == run["id"]


def test_a_nan_loss_stops_the_run_as_failed_and_nothing_non_finite_is_kept(
        tmp_path, tiny_llama, text_folder, monkeypatch):
    class Poisoned(run_mod.SAEModule):
        def training_step(self, batch, batch_idx):
            if self.current_epoch == 1 and batch_idx == 2:
                batch = batch * float("nan")
            return super().training_step(batch, batch_idx)

    monkeypatch.setattr(run_mod, "SAEModule", Poisoned)
    url = f"sqlite:///{tmp_path / 'runs.db'}"
    with pytest.raises(NonFiniteLossError, match=r"the training loss became nan at step \d+ \(epoch 1\)"):
        train(tiny_cfg(tiny_llama, text_folder, url), tmp_path / "out")
    with Store(url) as store:
        (run,) = store.list_runs()
        assert run["status"] == "failed" and "lower optimizer.lr" in run["error"] and "\n" not in run["error"]
        assert [e["epoch"] for e in store.epoch_metrics(run["id"])] == [0]  # the good epoch stays
        assert store.features(run["id"]) == [] and store.sae_models(run["id"]) == []
    assert not (tmp_path / "out" / "sae").exists()  # nothing published from NaN weights


def test_training_goes_on_while_the_database_is_away(tmp_path, tiny_llama, text_folder, postgres_url, monkeypatch):
    real = make_url(postgres_url)
    proxy = Proxy(real.host, real.port or 5432).start()
    url = real.set(port=proxy.port).render_as_string(hide_password=False)
    recorder = run_mod.MetricsRecorder
    original_epoch_end, original_finish = recorder.on_train_epoch_end, run_mod.finish

    def epoch_end(self, trainer, module):
        (proxy.stop if trainer.current_epoch == 0 else proxy.start)()  # away at epoch 0's end, back at epoch 1's
        original_epoch_end(self, trainer, module)

    def finish(*args, **kwargs):
        proxy.stop()  # and away again for the feature analysis and everything after it
        return original_finish(*args, **kwargs)

    monkeypatch.setattr(recorder, "on_train_epoch_end", epoch_end)
    monkeypatch.setattr(run_mod, "finish", finish)
    try:
        result = train(tiny_cfg(tiny_llama, text_folder, url, "epochs=3"), tmp_path / "out")
        pending = tmp_path / "out" / PENDING_FILENAME
        assert pending.is_file() and result.metrics["fvu"] < 1
        with Store(postgres_url) as store:
            run = store.get_run(result.run_id)
            assert run["status"] == "running" and len(store.epoch_metrics(result.run_id)) == 3  # back at epoch 1
        proxy.start()
        assert db_main(["sync", str(tmp_path / "out"), "--db", url]) == 0
    finally:
        proxy.stop()
    assert not pending.exists()
    with Store(postgres_url) as store:
        assert store.get_run(result.run_id)["status"] == "completed"
        counts = row_counts(store, result.run_id)
    assert counts["epochs"] == 3 and counts["features"] == result.sae.d_sae and counts["sae_models"] == 1
    assert counts["examples"] > 0


def test_resume_refuses_a_completed_run_and_one_still_training(tmp_path, tiny_llama, text_folder):
    url = f"sqlite:///{tmp_path / 'runs.db'}"
    cfg = tiny_cfg(tiny_llama, text_folder, url)
    with Store(url) as store:
        done = store.start_run(model="m", hook="h", layer=1, architecture="topk",
                               config=run_mod.recorded_config(cfg), output_dir=str(tmp_path / "done"))
        store.finish_run(done, "completed")
        alive = store.start_run(model="m", hook="h", layer=1, architecture="topk",
                                config=run_mod.recorded_config(cfg), output_dir=str(tmp_path / "alive"))
    with open_dict(cfg):
        cfg.resume = done
    with pytest.raises(run_mod.ConfigError, match=f"run {done} is already completed"):
        train_mod.resumed_config(cfg)
    with open_dict(cfg):
        cfg.resume = 99
    with pytest.raises(UnknownRunError, match="no run with id 99"):
        train_mod.resumed_config(cfg)

    with open_dict(cfg):
        cfg.resume = alive
    resumed, folder = train_mod.resumed_config(cfg)
    holder = run_mod.RunLock(folder)  # as the process that is still training holds it
    assert holder.acquire()
    try:
        with pytest.raises(run_mod.ConfigError, match="is in use by another training process"):
            train(resumed, folder)
    finally:
        holder.release()
    with Store(url) as store:
        assert store.get_run(alive)["status"] == "running"  # refused before anything was touched


def stop_at(monkeypatch, step: int, stop=None) -> None:
    """Make training stop once it reaches global step `step`: Ctrl-C (KeyboardInterrupt) or `stop()`."""
    original = run_mod.SAEModule.training_step

    def training_step(self, batch, batch_idx):
        if self.trainer.global_step == step:
            if stop is None:
                raise KeyboardInterrupt
            stop()
        return original(self, batch, batch_idx)

    monkeypatch.setattr(run_mod.SAEModule, "training_step", training_step)


def interrupted_run(monkeypatch, cfg, folder: Path, step: int, stop=None) -> dict:
    """Train `cfg` in `folder` until it is stopped at `step`; the run's row."""
    with monkeypatch.context() as patch:
        stop_at(patch, step, stop)
        previous = signal.getsignal(signal.SIGINT)
        try:
            with pytest.raises(KeyboardInterrupt):
                train(cfg, folder)
        finally:
            signal.signal(signal.SIGINT, previous)  # Lightning ignores SIGINT while shutting down
    with Store(cfg.storage.url) as store:
        (run,) = store.list_runs()
    assert run["status"] == "interrupted"
    return run


@pytest.mark.parametrize("cache", ["auto", "disk"])
def test_a_run_stopped_in_a_later_epoch_resumes_to_the_same_weights(tmp_path, tiny_llama, text_folder, monkeypatch,
                                                                     cache):
    # With the memory cache (the default for a single run) a restart finds the cache empty; the resumed epoch
    # must still serve the shuffled cached order, not the corpus order of a fresh harvest.
    settings = ["epochs=3", "checkpoint_every=10", f"activations.cache={cache}"]
    # Caches of their own: a run that finds a complete disk cache trains its first epoch in the cached order.
    twin = train(tiny_cfg(tiny_llama, text_folder, f"sqlite:///{tmp_path / 'twin.db'}", *settings,
                          f"activations.cache_dir={tmp_path / 'twin-cache'}"), tmp_path / "twin")
    steps_per_epoch = int(twin.metrics["n_tokens"]) // 128
    cfg = tiny_cfg(tiny_llama, text_folder, f"sqlite:///{tmp_path / 'runs.db'}", *settings,
                   f"activations.cache_dir={tmp_path / 'cache'}")
    run = interrupted_run(monkeypatch, cfg, tmp_path / "run", steps_per_epoch * 2 + 15)  # epoch 3, between saves
    with open_dict(cfg):
        cfg.resume = run["id"]
    resumed = train(*train_mod.resumed_config(cfg))

    twin_state, state = twin.sae.state_dict(), resumed.sae.state_dict()
    assert twin_state.keys() == state.keys()
    assert all(torch.equal(twin_state[name], state[name]) for name in state), [
        name for name in state if not torch.equal(twin_state[name], state[name])]
    assert (tmp_path / "run" / "curves.csv").read_text() == (tmp_path / "twin" / "curves.csv").read_text()
    # The resumed epoch's training averages cover its steps before the resume too.
    with Store(cfg.storage.url) as store, Store(f"sqlite:///{tmp_path / 'twin.db'}") as twin_store:
        rows, twin_rows = store.epoch_metrics(run["id"]), twin_store.epoch_metrics(twin.run_id)
    assert [r["epoch"] for r in rows] == [0, 1, 2]
    for row, twin_row in zip(rows, twin_rows):
        assert row["metrics"].keys() == twin_row["metrics"].keys()
        for name, value in twin_row["metrics"].items():
            assert row["metrics"][name] == pytest.approx(value, rel=1e-5), (row["epoch"], name)


def test_a_run_stopped_after_its_last_epoch_resumes_into_the_same_rows(tmp_path, tiny_llama, text_folder, monkeypatch):
    # Found by bench/faults.py: resumed from the last epoch's checkpoint, the run trains no epoch, and the
    # stream, which counts its vectors as it serves them, once recorded n_tokens 0.
    settings = ["epochs=2", "checkpoint_every=100"]
    twin = train(tiny_cfg(tiny_llama, text_folder, f"sqlite:///{tmp_path / 'twin.db'}", *settings), tmp_path / "twin")
    cfg = tiny_cfg(tiny_llama, text_folder, f"sqlite:///{tmp_path / 'runs.db'}", *settings)

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt  # as Ctrl-C during the feature analysis
    with monkeypatch.context() as patch:
        patch.setattr(run_mod, "finish", stopped)
        with pytest.raises(KeyboardInterrupt):
            train(cfg, tmp_path / "run")
    with open_dict(cfg):
        cfg.resume = 1
    resumed = train(*train_mod.resumed_config(cfg))
    assert resumed.metrics["n_tokens"] == twin.metrics["n_tokens"] > 0
    with Store(cfg.storage.url) as store:
        assert store.get_run(1)["n_tokens"] == twin.metrics["n_tokens"]


def test_a_damaged_checkpoint_falls_back_to_the_one_before_and_then_says_how_to_start_over(
        tmp_path, tiny_llama, text_folder, monkeypatch, caplog):
    cfg = tiny_cfg(tiny_llama, text_folder, f"sqlite:///{tmp_path / 'runs.db'}", "epochs=2", "checkpoint_every=10")
    run = interrupted_run(monkeypatch, cfg, tmp_path / "run", 25)
    folder = tmp_path / "run" / CHECKPOINT_DIR
    assert sorted(p.name for p in folder.iterdir()) == [LAST, PREVIOUS]  # saved on Ctrl-C at 25, and at 20
    with open_dict(cfg):
        cfg.resume = run["id"]

    for name in (LAST, PREVIOUS):  # both cut short: nothing to resume from, and the run is left as it was
        data = (folder / name).read_bytes()
        (folder / name).write_bytes(data[: len(data) // 2])
    (folder / "good.ckpt").write_bytes(data)  # previous.ckpt as it was
    with pytest.raises(CheckpointError) as caught:
        train(*train_mod.resumed_config(cfg))
    message = str(caught.value)
    assert "\n" not in message and str(folder / LAST) in message and str(folder / PREVIOUS) in message
    assert message.endswith(f"To train it again from the start, remove {folder} and resume again")
    with Store(cfg.storage.url) as store:
        assert store.get_run(run["id"])["status"] == "interrupted"

    (folder / "good.ckpt").replace(folder / PREVIOUS)  # only last.ckpt damaged: the run goes on from step 20
    with caplog.at_level("INFO"):
        result = train(*train_mod.resumed_config(cfg))
    assert f"resuming from the one before it, {folder / PREVIOUS}" in caplog.text
    assert f"resuming run {run['id']} from step 20 " in caplog.text
    with Store(cfg.storage.url) as store:
        assert store.get_run(result.run_id)["status"] == "completed"


def test_sigterm_stops_the_run_as_interrupted_naming_the_signal(tmp_path, tiny_llama, text_folder, monkeypatch):
    cfg = tiny_cfg(tiny_llama, text_folder, f"sqlite:///{tmp_path / 'runs.db'}", "epochs=2", "checkpoint_every=100")
    run = interrupted_run(monkeypatch, cfg, tmp_path / "run", 12, stop=lambda: os.kill(os.getpid(), signal.SIGTERM))
    # The hint names the database, so that run as printed it resumes this run, not one in the default database.
    assert run["error"] == (f"stopped by SIGTERM; continue with: python -m midisc.train resume={run['id']}"
                            f"{storage_argument(cfg.storage.url)}")
    assert (tmp_path / "run" / CHECKPOINT_DIR / LAST).is_file()  # saved on the way out, as on Ctrl-C


def test_a_run_recorded_before_the_sae_package_resumes_with_its_class(tmp_path, tiny_llama, text_folder):
    url = f"sqlite:///{tmp_path / 'runs.db'}"
    cfg = tiny_cfg(tiny_llama, text_folder, url, "sae=batchtopk")
    recorded = run_mod.recorded_config(cfg)
    recorded["sae"]["_target_"] = "midisc.sae_jump.BatchTopKSAE"  # the module it lived in until 2026-12
    del recorded["sae"]["kind"], recorded["sae"]["skip"]  # keys of transcoders, which came later
    with Store(url) as store:
        old = store.start_run(model="m", hook="h", layer=1, architecture="batchtopk", config=recorded,
                              output_dir=str(tmp_path / "old"))
        store.finish_run(old, "failed", error="killed")
    with open_dict(cfg):
        cfg.resume = old
    resumed, _ = train_mod.resumed_config(cfg)
    assert resumed.sae._target_ == "midisc.sae.BatchTopKSAE"
    assert run_mod.sae_class(resumed).__name__ == "BatchTopKSAE"
    assert type(run_mod.build_sae(resumed, d_in=8)).__name__ == "BatchTopKSAE"
