"""Distributed training for real: two CPU processes, gloo, a tiny model, launched by Lightning as a user launches
them (`trainer=ddp`). Only rank 0 records; a crashed rank fails the run instead of hanging it; resume works."""

import csv
import os
import sqlite3

import pytest
import torch

from conftest import REPO, compose_config, run_cli, tiny_overrides
from midisc.config import ConfigError, check_config
from midisc.sae.io import load_sae
from midisc.store import Store
from midisc.train import train

DDP = ["trainer=ddp", "trainer.accelerator=cpu", "checkpoint_every=10"]
TABLES = ("training_runs", "epoch_metrics", "discovered_features", "feature_examples", "evaluations", "sae_models",
          "feature_profiles")


def counts(db):
    with sqlite3.connect(db) as connection:
        return {t: connection.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0] for t in TABLES}


def ddp_run(tmp_path, tiny_llama, text_folder, *extra, env=None):
    args = ["midisc.train", *tiny_overrides(tiny_llama, text_folder, tmp_path / "runs.db"), *DDP,
            f"activations.cache_dir={tmp_path / 'cache'}", *extra]
    return run_cli(args, tmp_path, timeout=240,
                   env={"PYTHONPATH": f"{REPO}{os.pathsep}{REPO / 'tests'}", **(env or {})})


def test_two_processes_train_one_sae_recorded_once(tmp_path, tiny_llama, text_folder):
    done = ddp_run(tmp_path, tiny_llama, text_folder)
    assert done.returncode == 0, done.stderr[-3000:]
    with Store(f"sqlite:///{tmp_path / 'runs.db'}") as store:
        (run,) = store.list_runs()
        assert run["status"] == "completed"
        d_sae = run["d_sae"]
        folder = run["output_dir"]
        ddp_fvu = store.get_run(run["id"])["fvu"]
    rows = counts(tmp_path / "runs.db")
    assert rows["training_runs"] == 1 and rows["epoch_metrics"] == 2 and rows["discovered_features"] == d_sae
    assert rows["evaluations"] == 1 and rows["sae_models"] == 1 and rows["feature_profiles"] == d_sae
    with open(os.path.join(folder, "curves.csv")) as f:
        steps = [int(r["step"]) for r in csv.DictReader(f)]
    assert steps == sorted(set(steps))  # one writer: no step twice
    assert os.path.isfile(os.path.join(folder, "train_ddp_process_1.log"))  # rank 1 ran, in the same folder
    # Two ranks of 128 make a batch of 256: a single process at 256 reaches the same place.
    single = train(compose_config(tiny_overrides(tiny_llama, text_folder, tmp_path / "single.db")
                                  + ["batch_size=256", "activations.cache=disk",
                                     f"activations.cache_dir={tmp_path / 'cache'}"]), tmp_path / "single")
    assert abs(ddp_fvu - single.metrics["fvu"]) < 0.04, (ddp_fvu, single.metrics["fvu"])
    sae = load_sae(os.path.join(folder, "sae"))
    x = torch.randn(16, sae.d_in)
    assert torch.isfinite(sae(x).x_hat).all()


def test_a_crashed_rank_fails_the_run_and_resume_finishes_it(tmp_path, tiny_llama, text_folder):
    crash = {"MIDISC_TEST_CRASH_RANK": "1", "MIDISC_TEST_CRASH_STEP": "45"}
    done = ddp_run(tmp_path, tiny_llama, text_folder, "sae._target_=crashing_sae.CrashingTopKSAE", env=crash)
    assert done.returncode != 0
    with Store(f"sqlite:///{tmp_path / 'runs.db'}") as store:
        (run,) = store.list_runs()
        failed = store.get_run(run["id"])
    assert failed["status"] == "failed", failed
    assert "rank 1 failed: " in failed["error"] and "planted crash on rank 1 at step 45" in failed["error"]
    assert os.path.isfile(os.path.join(failed["output_dir"], "checkpoints", "last.ckpt"))
    resumed = ddp_run(tmp_path, tiny_llama, text_folder, f"resume={run['id']}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming run 1 from step 40" in resumed.stdout
    with Store(f"sqlite:///{tmp_path / 'runs.db'}") as store:
        assert store.get_run(run["id"])["status"] == "completed"
    rows = counts(tmp_path / "runs.db")
    assert rows["training_runs"] == 1 and rows["epoch_metrics"] == 2 and rows["sae_models"] == 1


@pytest.mark.slow
def test_a_rank_that_stops_answering_fails_the_run_after_ddp_timeout(tmp_path, tiny_llama, text_folder):
    # The timeout bounds the ranks' start too: 30 s leaves a busy machine time to start rank 1.
    hang = {"MIDISC_TEST_CRASH_RANK": "1", "MIDISC_TEST_CRASH_STEP": "5", "MIDISC_TEST_HANG_S": "45"}
    done = ddp_run(tmp_path, tiny_llama, text_folder, "sae._target_=crashing_sae.CrashingTopKSAE", "ddp_timeout=30",
                   env=hang)
    assert done.returncode == 2, done.stderr[-3000:]
    assert "another rank stopped answering" in done.stderr.strip().splitlines()[-1]
    with Store(f"sqlite:///{tmp_path / 'runs.db'}") as store:
        (run,) = store.list_runs()
        assert run["status"] == "failed" and "rank 0 lost another rank" in store.get_run(run["id"])["error"]


@pytest.mark.parametrize("extra, message", [
    (["activations.cache=memory"], "activations.cache=memory with 2 processes"),
    (["layers=[0,1]"], "with 2 processes train one hook per command"),
    (["resample_every=5"], "resample_every=5 with 2 processes"),
    (["trainer.strategy=fsdp"], "trainer.strategy='fsdp' is not valid; choose one of: auto, ddp,"),
    (["trainer.devices=0"], "trainer.devices must be a number of devices (1, 2, …)"),
    (["trainer.num_nodes=0"], "trainer.num_nodes"),
])
def test_what_a_distributed_run_cannot_combine_with_is_refused(tiny_llama, text_folder, extra, message):
    cfg = compose_config(tiny_overrides(tiny_llama, text_folder, None) + ["trainer=ddp", *extra])
    with pytest.raises(ConfigError) as info:
        check_config(cfg)
    assert message in str(info.value)
