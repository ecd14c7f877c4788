"""Reading one value of the config and refusing it in one line: each helper names the key, the value it found
and what would be valid. The rules themselves (ranges of integers and numbers) are `midisc.sae.settings`'s."""

from __future__ import annotations

import codecs
import importlib

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from midisc.sae.settings import integer, number


class ConfigError(ValueError):
    """An impossible or ill-typed config value; the message is one line."""


def resolved(cfg: DictConfig, key: str):
    """The value at `key`, interpolations resolved; a ConfigError naming the key when one does not resolve."""
    try:
        return OmegaConf.select(cfg, key)
    except OmegaConfBaseException as err:  # an interpolation such as ${nope} that cannot be resolved
        raise ConfigError(f"{key} cannot be resolved: {str(err).splitlines()[0]}") from None


# Counts end up in torch tensors (int64): a larger one fails there, after the model has loaded.
INT64_MAX = 2**63 - 1


def check_int(cfg: DictConfig, key: str, low: int, high: int | None = None) -> int:
    try:
        value = integer(key, resolved(cfg, key), low, high)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    if value > INT64_MAX:
        raise ConfigError(f"{key}={value} is too large; it must be at most 2**63-1 ({INT64_MAX}), as torch counts")
    return value


def check_number(cfg: DictConfig, key: str, low: float, *, strict: bool = False, high: float | None = None) -> float:
    try:
        return number(key, resolved(cfg, key), low, strict=strict, high=high)
    except ValueError as err:
        raise ConfigError(str(err)) from None


def check_choice(cfg: DictConfig, key: str, valid) -> str:
    value = resolved(cfg, key)
    if isinstance(value, bool) or value not in valid:  # True == 1 would pass for a choice of numbers
        shown = dict.fromkeys(map(str, valid))  # Lightning's precisions name 16 and "16" both
        raise ConfigError(f"{key}={value!r} is not valid; choose one of: {', '.join(shown)}")
    return value


def check_bool(cfg: DictConfig, key: str) -> bool:
    value = resolved(cfg, key)
    if not isinstance(value, bool):
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    return value


def check_text(cfg: DictConfig, key: str, *, optional: bool = False) -> str | None:
    """A non-empty string (a name, path or URL); with `optional`, null too."""
    value = resolved(cfg, key)
    if value is None and optional:
        return None
    if not isinstance(value, str) or not value.strip():
        valid = "a non-empty string" + (" or null" if optional else "")
        # Hydra reads layer=12 as a number: a name that looks like one needs quotes.
        hint = f" (quote a number meant as text: {key}='\"{value}\"')" if isinstance(value, (int, float)) else ""
        raise ConfigError(f"{key} must be {valid}, got {value!r}{hint}")
    return value


def check_encoding(cfg: DictConfig, key: str) -> None:
    value = check_text(cfg, key)
    try:
        # Codecs such as base64 are known but turn bytes into bytes: bytes.decode refuses them.
        text = getattr(codecs.lookup(value), "_is_text_encoding", True)
    except LookupError:
        text = False
    if not text:
        raise ConfigError(f"{key}={value!r} is not a text encoding Python knows; e.g. utf-8, latin-1, cp1252")


def check_class(cfg: DictConfig, key: str, example: str) -> type:
    """An importable class, checked now: Hydra would fail on it only after the model has loaded."""
    path = check_text(cfg, key)
    module, _, name = path.rpartition(".")
    try:
        found = getattr(importlib.import_module(module), name, None) if module else None
    except (ImportError, TypeError, ValueError):  # no such module; a relative or empty name such as ".x"
        found = None
    if not isinstance(found, type):
        raise ConfigError(f"{key}={path!r} is not an importable class; give package.module.Class, e.g. {example}")
    return found
