"""A job of several hooks (`layers=[…]`, `hooks=[…]`): one pass of the model, one recorded run per hook."""

import logging

import pytest
import torch
from omegaconf import OmegaConf

from conftest import compose_config, run_cli, tiny_overrides
from midisc import run as run_mod
from midisc.config import ConfigError
from midisc.data.cache import SharedCache
from midisc.data.lm import ModelError
from midisc.data.recipe import Recipe
from midisc.store import Store
from midisc.train import train, train_hooks


def job(tmp_path, tiny_llama, text_folder, *extra):
    cfg = compose_config(tiny_overrides(tiny_llama, text_folder, tmp_path / "runs.db")
                         + [f"activations.cache_dir={tmp_path / 'cache'}", *extra])
    return cfg


def test_each_hook_is_a_run_of_its_own_in_one_sweep(tmp_path, tiny_llama, text_folder, caplog):
    caplog.set_level(logging.INFO)  # as Hydra's job logging sets it for the command
    cfg = job(tmp_path, tiny_llama, text_folder, "layers=[0,2]", "hooks=[model.layers.1.mlp]")
    results, failed = train_hooks(cfg, tmp_path / "out")
    assert failed == [] and [r.output_dir.name for r in results] == ["layer=0", "layer=2", "hook=model.layers.1.mlp"]
    with Store(f"sqlite:///{tmp_path / 'runs.db'}") as store:
        runs = [store.get_run(r.run_id) for r in results]
        assert [r["hook"] for r in runs] == ["model.layers.0", "model.layers.2", "model.layers.1.mlp"]
        assert [r["layer"] for r in runs] == [0, 2, None]
        assert {r["sweep_id"] for r in runs} == {str((tmp_path / "out").resolve())}
        assert [r["overrides"][-1] for r in runs] == ["layer=0", "layer=2", "model.hook=model.layers.1.mlp"]
        assert all(r["status"] == "completed" for r in runs) and len(store.list_runs()) == 3
        # Recorded as a single-hook run of it would be: resume=RUN continues one alone.
        assert [(r["config"]["layers"], r["config"]["hooks"]) for r in runs] == [(None, None)] * 3
        for result in results:
            assert len(store.features(result.run_id)) == result.sae.d_sae
            assert store.evaluations(result.run_id) and store.sae_models(result.run_id)
    for result in results:
        assert (result.sae_dir / "sae_weights.safetensors").is_file()
        assert "epoch 2/2" in (result.output_dir / "train.log").read_text()
    other = (results[1].output_dir / "train.log").read_text()
    assert "model.layers.0 " not in other  # each run's log holds its own run


def test_a_hook_run_equals_a_single_run_that_finds_the_cache(tmp_path, tiny_llama, text_folder):
    (result, *_), _ = train_hooks(job(tmp_path, tiny_llama, text_folder, "layers=[1,2]"), tmp_path / "out")
    alone = train(job(tmp_path, tiny_llama, text_folder, "layer=1", "activations.cache=disk"), tmp_path / "alone")
    for name, tensor in result.sae.state_dict().items():
        assert torch.equal(tensor, alone.sae.state_dict()[name]), name
    assert alone.metrics["fvu"] == pytest.approx(result.metrics["fvu"])


def test_the_job_fills_the_caches_a_separate_harvest_would(tmp_path, tiny_llama, text_folder):
    train_hooks(job(tmp_path, tiny_llama, text_folder, "layers=[0,2]", "epochs=1"), tmp_path / "out")
    separate = tmp_path / "separate"
    cfg = job(tmp_path, tiny_llama, text_folder, "layer=2", "epochs=1", "activations.cache=disk",
              f"activations.cache_dir={separate}")
    train(cfg, tmp_path / "alone")  # harvests layer 2 alone, as epoch 1 streams it
    producer = Recipe.of(OmegaConf.to_container(cfg, resolve=True), "model.layers.2").producer()
    rows = []
    for root in (tmp_path / "cache", separate):
        with SharedCache.open(root, producer, dtype="float32", max_bytes=None, expected_bytes=0,
                              log=print) as cache:
            assert cache.complete
            rows.append(cache.block(0, len(cache)))
    assert torch.equal(*rows)


def test_a_failed_hook_is_recorded_and_the_others_go_on(tmp_path, tiny_llama, text_folder, monkeypatch):
    real = run_mod._train

    def breaks_on_layer_0(cfg, *args):
        if cfg.layer == 0:
            raise ConfigError("planted failure")
        return real(cfg, *args)

    monkeypatch.setattr(run_mod, "_train", breaks_on_layer_0)
    results, failed = train_hooks(job(tmp_path, tiny_llama, text_folder, "layers=[0,1]"), tmp_path / "out")
    assert failed == ["layer=0: planted failure"] and [r.output_dir.name for r in results] == ["layer=1"]
    with Store(f"sqlite:///{tmp_path / 'runs.db'}") as store:
        assert sorted(r["status"] for r in store.list_runs()) == ["completed", "failed"]


@pytest.mark.parametrize("override, error, message", [
    ("layers=[1,1]", ConfigError, "layers=[1, 1] names one twice"),
    ("layers=[]", ConfigError, "layers must be a non-empty list, e.g. layers=[4,8,15]"),
    ("layers=[a]", ConfigError, "layers must be block indices"),
    ("layers=[0,7]", ModelError, "layer=7 is out of range: this model has 3 blocks"),
    ("hooks=[model.layers.0,model.nope]", ModelError, "model.hook='model.nope' is not a module of this model"),
    ("+resume=3", ConfigError, "resume continues one run"),
])
def test_bad_hook_lists_are_refused_before_the_model_loads(tmp_path, tiny_llama, text_folder, override, error,
                                                          message):
    extra = ["layers=[0,1]", override.replace("+", "")] if override.startswith("+") else [override]
    cfg = job(tmp_path, tiny_llama, text_folder, *extra)
    with pytest.raises(error) as info:
        train_hooks(cfg, tmp_path / "out")
    assert message in str(info.value)
    assert not (tmp_path / "runs.db").exists() or not Store(f"sqlite:///{tmp_path / 'runs.db'}").list_runs()


def test_layers_from_the_command_line(tmp_path, tiny_llama, text_folder):
    args = ["midisc.train", *tiny_overrides(tiny_llama, text_folder, tmp_path / "runs.db"), "layers=[0,2]",
            f"activations.cache_dir={tmp_path / 'cache'}"]
    done = run_cli(args, tmp_path)
    assert done.returncode == 0, done.stderr
    assert "harvesting layer=0, layer=2 in one pass" in done.stdout
    assert "run 1 completed" in done.stdout and "run 2 completed" in done.stdout
    with_bad = run_cli([*args[:-2], "layers=[0,9]"], tmp_path)
    assert with_bad.returncode == 2 and with_bad.stderr.strip().splitlines()[-1].startswith("error: layer=9 is out")
