"""Refuse an impossible config before anything slow happens, with one line naming the value and the valid range.

Checks here need only the config itself; checks that need the model's shape (layer past the last block,
k wider than the SAE, an unknown module path) run in `midisc.lm.resolve_hook` and the SAE constructors,
still before any weights load.
"""

from __future__ import annotations

import math

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from midisc.activations import STORE_DTYPES
from midisc.corpus import SOURCES
from midisc.lm import DTYPES
from midisc.sae import B_DEC_METHODS


class ConfigError(ValueError):
    """An impossible or ill-typed config value; the message is one line."""


def _int(cfg: DictConfig, key: str, low: int) -> int:
    value = OmegaConf.select(cfg, key)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{key} must be an integer >= {low}, got {value!r}")
    if value < low:
        raise ConfigError(f"{key}={value} is too small; it must be >= {low}")
    return value


def _number(cfg: DictConfig, key: str, low: float, *, strict: bool = False) -> float:
    value = OmegaConf.select(cfg, key)
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < low or (strict and value == low):
        bound = f"> {low}" if strict else f">= {low}"
        raise ConfigError(f"{key} must be a number {bound}, got {value!r}")
    return float(value)


def _choice(cfg: DictConfig, key: str, valid) -> str:
    value = OmegaConf.select(cfg, key)
    if value not in valid:
        raise ConfigError(f"{key}={value!r} is not valid; choose one of: {', '.join(valid)}")
    return value


def check_config(cfg: DictConfig) -> None:
    """Raise ConfigError on the first bad value: types, ranges and choices of the training config."""
    for group, key in (("model", "name"), ("data", "path"), ("data", "name")):
        if key in cfg[group].keys() and OmegaConf.is_missing(cfg[group], key):
            option = HydraConfig.get().runtime.choices.get(group) if HydraConfig.initialized() else "this option"
            raise ConfigError(f"{group}.{key} is required by {group}={option}: pass {group}.{key}=...")
    _int(cfg, "layer", 0) if cfg.model.hook is None else None
    for key, low in [("seed", 0), ("max_samples", 1), ("context_size", 2), ("batch_size", 1), ("epochs", 1),
                     ("dead_window", 1), ("activations.buffer_size", 1), ("activations.lm_batch_size", 1),
                     ("data.holdout_texts", 1), ("sae.expansion", 1), ("export.features_per_batch", 1),
                     ("export.output_tokens", 1)]:
        _int(cfg, key, low)
    if "k" in cfg.sae:
        _int(cfg, "sae.k", 1)
    if "l1_coef" in cfg.sae:
        _number(cfg, "sae.l1_coef", 0.0)
    if "lr" in cfg.optimizer:
        _number(cfg, "optimizer.lr", 0.0, strict=True)
    _choice(cfg, "activations.cache", ("memory", "disk"))
    _choice(cfg, "activations.dtype", tuple(STORE_DTYPES))
    _choice(cfg, "model.dtype", tuple(DTYPES))
    _choice(cfg, "data.source", SOURCES)
    _choice(cfg, "b_dec_init", B_DEC_METHODS)
    if not isinstance(cfg.export.neuronpedia, bool):
        raise ConfigError(f"export.neuronpedia must be true or false, got {cfg.export.neuronpedia!r}")
    if cfg.activations.outlier_factor is not None:
        _number(cfg, "activations.outlier_factor", 1.0, strict=True)

