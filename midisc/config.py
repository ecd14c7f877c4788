"""The config's own rules: its resolvers, and the checks that refuse an impossible value before anything slow
happens, with one line naming the value and the valid range.

Checks here need only the config itself; checks that need the model's shape (layer past the last block,
an unknown module path) run in `midisc.data.lm.resolve_hook`. The SAE's hyperparameters are checked by its
constructor alone (with `midisc.sae.settings`, the functions that check every number here too), which
`train.py` runs on the meta device with the model's width before any weights load; here only the names
of the `sae:` keys are checked against the constructor's.
"""

from __future__ import annotations

import codecs
import difflib
import hashlib
import importlib
import inspect
from pathlib import Path
from typing import get_args

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from midisc.data.activations import STORE_DTYPES
from midisc.data.corpus import SOURCES
from midisc.data.lm import DTYPES
from midisc.sae.base import B_DEC_METHODS
from midisc.sae.settings import integer, number
from midisc.store.engine import postgres_url_from_env


def short_dirname(name: str, limit: int = 120) -> str:
    """A sweep job's folder name: the overrides, or a readable prefix plus a hash when too long for a file name."""
    if len(name) <= limit:
        return name
    return f"{name[: limit - 17]}-{hashlib.sha1(name.encode()).hexdigest()[:16]}"


OmegaConf.register_new_resolver("midisc.dirname", short_dirname, replace=True)
# conf/storage/postgres.yaml: one builder of the URL (escaping the password) for training and the tools.
OmegaConf.register_new_resolver("midisc.postgres_url", postgres_url_from_env, replace=True)


def _precisions() -> tuple:
    """Lightning's `precision` values (16, "bf16-mixed", …), from its own type; empty if that moves."""
    try:
        from lightning.fabric.connector import _PRECISION_INPUT
    except ImportError:
        return ()
    return tuple(value for literal in get_args(_PRECISION_INPUT) for value in get_args(literal))


class ConfigError(ValueError):
    """An impossible or ill-typed config value; the message is one line."""


def _get(cfg: DictConfig, key: str):
    try:
        return OmegaConf.select(cfg, key)
    except OmegaConfBaseException as err:  # an interpolation such as ${nope} that cannot be resolved
        raise ConfigError(f"{key} cannot be resolved: {str(err).splitlines()[0]}") from None


def _int(cfg: DictConfig, key: str, low: int, high: int | None = None) -> int:
    try:
        return integer(key, _get(cfg, key), low, high)
    except ValueError as err:
        raise ConfigError(str(err)) from None


def _number(cfg: DictConfig, key: str, low: float, *, strict: bool = False, high: float | None = None) -> float:
    try:
        return number(key, _get(cfg, key), low, strict=strict, high=high)
    except ValueError as err:
        raise ConfigError(str(err)) from None


def _choice(cfg: DictConfig, key: str, valid) -> str:
    value = _get(cfg, key)
    if isinstance(value, bool) or value not in valid:  # True == 1 would pass for a choice of numbers
        shown = dict.fromkeys(map(str, valid))  # Lightning's precisions name 16 and "16" both
        raise ConfigError(f"{key}={value!r} is not valid; choose one of: {', '.join(shown)}")
    return value


def _bool(cfg: DictConfig, key: str) -> bool:
    value = _get(cfg, key)
    if not isinstance(value, bool):
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    return value


def _text(cfg: DictConfig, key: str, *, optional: bool = False) -> str | None:
    """A non-empty string (a name, path or URL); with `optional`, null too."""
    value = _get(cfg, key)
    if value is None and optional:
        return None
    if not isinstance(value, str) or not value.strip():
        valid = "a non-empty string" + (" or null" if optional else "")
        # Hydra reads layer=12 as a number: a name that looks like one needs quotes.
        hint = f" (quote a number meant as text: {key}='\"{value}\"')" if isinstance(value, (int, float)) else ""
        raise ConfigError(f"{key} must be {valid}, got {value!r}{hint}")
    return value


def _encoding(cfg: DictConfig, key: str) -> None:
    value = _text(cfg, key)
    try:
        # Codecs such as base64 are known but turn bytes into bytes: bytes.decode refuses them.
        text = getattr(codecs.lookup(value), "_is_text_encoding", True)
    except LookupError:
        text = False
    if not text:
        raise ConfigError(f"{key}={value!r} is not a text encoding Python knows; e.g. utf-8, latin-1, cp1252")


def _class(cfg: DictConfig, key: str, example: str) -> type:
    """An importable class, checked now: Hydra would fail on it only after the model has loaded."""
    path = _text(cfg, key)
    module, _, name = path.rpartition(".")
    try:
        found = getattr(importlib.import_module(module), name, None) if module else None
    except (ImportError, TypeError, ValueError):  # no such module; a relative or empty name such as ".x"
        found = None
    if not isinstance(found, type):
        raise ConfigError(f"{key}={path!r} is not an importable class; give package.module.Class, e.g. {example}")
    return found


def check_config(cfg: DictConfig) -> None:
    """Raise ConfigError on the first bad value: types, ranges and choices of the training config."""
    for group, key in (("model", "name"), ("data", "path"), ("data", "name")):
        if key in cfg[group].keys() and OmegaConf.is_missing(cfg[group], key):
            option = HydraConfig.get().runtime.choices.get(group) if HydraConfig.initialized() else "this option"
            raise ConfigError(f"{group}.{key} is required by {group}={option}: pass {group}.{key}=...")
    if _get(cfg, "model.hook") is None:
        _int(cfg, "layer", 0)
    _int(cfg, "seed", 0, 2**32 - 1)  # the range Lightning's seed_everything accepts
    for key, low in [("max_samples", 1), ("context_size", 2), ("batch_size", 1), ("epochs", 1),
                     ("dead_window", 1), ("activations.buffer_size", 1), ("activations.lm_batch_size", 1),
                     ("data.holdout_texts", 1), ("export.features_per_batch", 1),
                     ("export.output_tokens", 1), ("analysis.n_top", 1), ("analysis.n_quantile", 0),
                     ("analysis.before", 0), ("analysis.after", 0), ("checkpoint_every", 1),
                     ("evaluate.contexts", 0)]:
        _int(cfg, key, low)
    if _get(cfg, "resume") is not None:
        _int(cfg, "resume", 1)
    if _get(cfg, "max_vectors") is not None:
        _int(cfg, "max_vectors", _get(cfg, "batch_size"))
    if _get(cfg, "max_doc_tokens") is not None:
        _int(cfg, "max_doc_tokens", 1)
    _check_sae_keys(cfg)
    _check_optimizer(cfg)
    _choice(cfg, "activations.cache", ("memory", "disk", "auto"))
    _choice(cfg, "activations.dtype", tuple(STORE_DTYPES))
    _text(cfg, "activations.cache_dir")
    _number(cfg, "activations.cache_max_gb", 0.0, strict=True)
    if _get(cfg, "activations.outlier_factor") is not None:
        _number(cfg, "activations.outlier_factor", 1.0, strict=True)
    _choice(cfg, "b_dec_init", B_DEC_METHODS)
    _bool(cfg, "normalize_input")
    _int(cfg, "resample_every", 0)
    _int(cfg, "schedule.lr_warmup_steps", 0)
    _int(cfg, "schedule.sparsity_warmup_steps", 0)
    _number(cfg, "schedule.lr_decay_frac", 0.0, high=1.0)
    _bool(cfg, "export.neuronpedia")
    _text(cfg, "export.set_name", optional=True)
    _text(cfg, "storage.url", optional=True)
    _check_model(cfg)
    _check_data(cfg)
    _check_trainer(cfg)


# Given by train.py, not by the config: the model's width and the run's seed.
SAE_ARGUMENTS_FROM_THE_RUN = ("d_in", "seed")


def _check_sae_keys(cfg: DictConfig) -> None:
    """Every `sae:` key is a setting of the class it names; Hydra would fail on one only after the model loads."""
    cls = _class(cfg, "sae._target_", "midisc.sae.topk.TopKSAE")
    settings = [p for p in inspect.signature(cls).parameters if p not in SAE_ARGUMENTS_FROM_THE_RUN]
    for key in cfg.sae:
        if key == "_target_" or key in settings:
            continue
        if key in SAE_ARGUMENTS_FROM_THE_RUN:
            raise ConfigError(f"sae.{key} is set by midisc (from the model and the run's seed); remove it")
        near = difflib.get_close_matches(key, settings, n=1)
        hint = f"did you mean sae.{near[0]}? " if near else ""
        raise ConfigError(f"sae.{key} is not a setting of {cls.__name__}; {hint}its settings: {', '.join(settings)}")


def _check_optimizer(cfg: DictConfig) -> None:
    _class(cfg, "optimizer._target_", "torch.optim.Adam")
    if "lr" in cfg.optimizer:
        _number(cfg, "optimizer.lr", 0.0, strict=True)
    if "betas" in cfg.optimizer:  # Adam checks them only when Lightning builds it, after the model has loaded
        betas = _get(cfg, "optimizer.betas")
        numbers = isinstance(betas, ListConfig) and all(
            isinstance(b, (int, float)) and not isinstance(b, bool) for b in betas)
        if not numbers or len(betas) != 2 or not all(0 <= b < 1 for b in betas):
            raise ConfigError(f"optimizer.betas must be two numbers in [0, 1), e.g. [0.9,0.999], got {betas!r}")


def _check_model(cfg: DictConfig) -> None:
    _text(cfg, "model.name")
    for key in ("gguf_package", "gguf_file", "separator"):
        _text(cfg, f"model.{key}", optional=True)
    _choice(cfg, "model.dtype", tuple(DTYPES))
    _bool(cfg, "model.prepend_bos")
    device_map = _get(cfg, "model.device_map")
    if isinstance(device_map, bool) or not isinstance(device_map, (str, int, DictConfig, type(None))):
        raise ConfigError(f"model.device_map must be auto, a device, a mapping or null, got {device_map!r}")
    hooks = _get(cfg, "model.hooks")
    if not isinstance(hooks, DictConfig) or not hooks:
        raise ConfigError(f"model.hooks must map site names to module paths such as model.layers.{{layer}}, "
                          f"got {hooks!r}")
    for site in hooks:
        _text(cfg, f"model.hooks.{site}")
    _text(cfg, "model.hook", optional=True)  # model.site is checked against the hooks in lm.resolve_hook


def _check_data(cfg: DictConfig) -> None:
    _choice(cfg, "data.source", SOURCES)
    for key in ("package", "subdir", "path", "name", "split", "field"):
        if key in cfg.data:
            _text(cfg, f"data.{key}")
    if "config_name" in cfg.data:
        _text(cfg, "data.config_name", optional=True)
    if "dedupe" in cfg.data:
        _bool(cfg, "data.dedupe")
    if "encoding" in cfg.data:
        _encoding(cfg, "data.encoding")


def _check_trainer(cfg: DictConfig) -> None:
    """The Trainer's own checks run only once the model has loaded: these keys are refused before."""
    trainer = cfg.trainer
    for key in ("enable_checkpointing", "enable_model_summary", "enable_progress_bar"):
        if key in trainer:
            _bool(cfg, f"trainer.{key}")
    for key, low in (("max_epochs", 1), ("max_steps", -1), ("log_every_n_steps", 1), ("num_sanity_val_steps", -1)):
        if key in trainer:
            _int(cfg, f"trainer.{key}", low)
    if "accelerator" in trainer:
        _text(cfg, "trainer.accelerator")
    if "precision" in trainer and _precisions():
        _choice(cfg, "trainer.precision", _precisions())


HYDRA_FLAGS_WITH_VALUE = {"-c", "--cfg", "-p", "--package", "-cp", "--config-path", "-cn", "--config-name", "-cd",
                          "--config-dir", "--info", "-i", "--experimental-rerun"}


def _first_value(override) -> str:
    return next(iter(override.sweep_string_iterator())) if override.is_sweep_override() else \
        override.get_value_element_as_str()


def misspelt_keys(argv: list[str], config_dir: str, config_name: str = "train") -> list[str]:
    """Hints for the command-line overrides that name no key of the config (`sae.expanson=16`): Hydra refuses
    them with its struct error and no suggestion; this says which key was probably meant.

    The config is composed with the overrides that choose groups (`sae=relu`, the first value of a sweep),
    so the keys offered are the ones of the config the user asked for."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import OverrideType

    words, skip = [], False
    for arg in argv:  # Hydra's own flags, and the value after those that take one, are not overrides
        if not skip and not arg.startswith("-"):
            words.append(arg)
        skip = arg in HYDRA_FLAGS_WITH_VALUE
    try:
        overrides = OverridesParser.create().parse_overrides(words)
    except Exception:  # Hydra's own message already said what is wrong with the syntax
        return []
    overrides = [o for o in overrides if o.type == OverrideType.CHANGE and not o.is_hydra_override()]
    groups = {p.name for p in Path(config_dir).iterdir() if p.is_dir()}
    choices = [f"{o.key_or_group}={_first_value(o)}" for o in overrides if o.key_or_group in groups]
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=config_dir, version_base="1.3"):
            cfg = compose(config_name, overrides=choices)
    except Exception:
        return []
    hints = []
    for o in overrides:
        key = o.key_or_group
        if key in groups or OmegaConf.select(cfg, key) is not None:
            continue
        parent, _, leaf = key.rpartition(".")
        node = OmegaConf.select(cfg, parent) if parent else cfg
        if not isinstance(node, DictConfig) or leaf in node.keys():  # (`in node` is False for a ??? value)
            continue  # an existing key set to null, or a path through a value
        near = difflib.get_close_matches(leaf, [str(k) for k in node], n=1)
        where = f"a key of {parent}" if parent else "a config key"
        hints.append(f"{key} is not {where}; " + (f"did you mean {parent + '.' if parent else ''}{near[0]}?"
                                                  if near else f"its keys: {', '.join(map(str, node))}"))
    return hints
