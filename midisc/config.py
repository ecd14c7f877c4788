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
import os
from typing import get_args

import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from midisc.data.activations import STORE_DTYPES
from midisc.data.corpus import SOURCES
from midisc.data.lm import DTYPES
from midisc.sae.base import B_DEC_METHODS
from midisc.sae.settings import integer, number
from midisc.sae.transcoder import coder_class
from midisc.store.engine import StoreError, parse_url, postgres_url_from_env


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


def _accelerators() -> tuple:
    """Lightning's `accelerator` values: its registry's names, and the two it resolves itself."""
    from lightning.pytorch.accelerators import AcceleratorRegistry

    return ("auto", "gpu", *sorted(AcceleratorRegistry.available_accelerators()))


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


def _int(cfg: DictConfig, key: str, low: int, high: int | None = None) -> int:
    try:
        value = integer(key, resolved(cfg, key), low, high)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    if value > INT64_MAX:
        raise ConfigError(f"{key}={value} is too large; it must be at most 2**63-1 ({INT64_MAX}), as torch counts")
    return value


def _number(cfg: DictConfig, key: str, low: float, *, strict: bool = False, high: float | None = None) -> float:
    try:
        return number(key, resolved(cfg, key), low, strict=strict, high=high)
    except ValueError as err:
        raise ConfigError(str(err)) from None


def _choice(cfg: DictConfig, key: str, valid) -> str:
    value = resolved(cfg, key)
    if isinstance(value, bool) or value not in valid:  # True == 1 would pass for a choice of numbers
        shown = dict.fromkeys(map(str, valid))  # Lightning's precisions name 16 and "16" both
        raise ConfigError(f"{key}={value!r} is not valid; choose one of: {', '.join(shown)}")
    return value


def _bool(cfg: DictConfig, key: str) -> bool:
    value = resolved(cfg, key)
    if not isinstance(value, bool):
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    return value


def _text(cfg: DictConfig, key: str, *, optional: bool = False) -> str | None:
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


# A file name may hold 255 bytes; the export folder is the layer, a dash and the set name.
SET_NAME_CHARS = 200


def _memory() -> int | None:
    """This machine's memory in bytes; None where the system does not say (Windows)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


def check_fits_in_memory(sae: torch.nn.Module, analysis: dict) -> None:
    """Refuse an SAE, or an analysis (the `analysis:` group as plain values), that cannot fit in this machine's
    memory: training holds each weight four times (itself, its gradient, Adam's two moments), and the analysis
    at the end keeps, for each feature, n_top + n_quantile examples of before + after + 1 tokens. The SAE may
    be built on the meta device, which costs nothing; a value far too large would otherwise fail in an
    allocation once the model has loaded, or once the run has trained."""
    memory = _memory()
    if memory is None:
        return
    training = 4 * 4 * sum(p.numel() for p in sae.parameters())  # float32
    if training > memory:
        raise ConfigError(f"an SAE of {sae.d_sae:,} features on d_in {sae.d_in} (sae.expansion x d_in) needs "
                          f"{training / 1e9:,.1f} GB to train (weights, gradients, Adam's moments), more than this "
                          f"machine's {memory / 1e9:,.0f} GB; lower sae.expansion")
    slots = analysis["n_top"] + max(analysis["n_quantile"], 1)
    width = analysis["before"] + analysis["after"] + 1
    examples = sae.d_sae * slots * (8 * width + 32)  # a token id and an activation per window token; 4 per slot
    if examples > memory:
        raise ConfigError(f"analysis keeps {slots:,} examples (n_top + n_quantile) of {width:,} tokens (before + 1 + "
                          f"after) for each of the SAE's {sae.d_sae:,} features: {examples / 1e9:,.1f} GB, more than "
                          f"this machine's {memory / 1e9:,.0f} GB; lower analysis.n_top, n_quantile, before or after")


# The config groups train.yaml composes, each a mapping every run reads.
GROUPS = ("model", "sae", "optimizer", "storage", "data", "trainer", "logger")


def check_config(cfg: DictConfig) -> None:
    """Raise ConfigError on the first bad value: types, ranges and choices of the training config."""
    for group in GROUPS:  # `logger=[]` composes, choosing no option at all
        if not isinstance(cfg.get(group), DictConfig):
            raise ConfigError(f"{group} is not in the config (a {group}=[] chooses no option); choose one: "
                              f"{group}=OPTION, one of the files in conf/{group}/")
    for group, key in (("model", "name"), ("data", "path"), ("data", "name")):
        if key in cfg[group].keys() and OmegaConf.is_missing(cfg[group], key):
            option = HydraConfig.get().runtime.choices.get(group) if HydraConfig.initialized() else "this option"
            raise ConfigError(f"{group}.{key} is required by {group}={option}: pass {group}.{key}=...")
    check_resolvable(cfg)
    if resolved(cfg, "model.hook") is None:
        _int(cfg, "layer", 0)
    _int(cfg, "seed", 0, 2**32 - 1)  # the range Lightning's seed_everything accepts
    for key, low in [("max_samples", 1), ("context_size", 2), ("batch_size", 1), ("epochs", 1),
                     ("dead_window", 1), ("activations.buffer_size", 1), ("activations.lm_batch_size", 1),
                     ("data.holdout_texts", 1), ("export.features_per_batch", 1),
                     ("export.output_tokens", 1), ("analysis.n_top", 1), ("analysis.n_quantile", 0),
                     ("analysis.before", 0), ("analysis.after", 0), ("checkpoint_every", 1),
                     ("evaluate.contexts", 0)]:
        _int(cfg, key, low)
    if resolved(cfg, "resume") is not None:
        _int(cfg, "resume", 1)
    if resolved(cfg, "max_vectors") is not None:
        _int(cfg, "max_vectors", resolved(cfg, "batch_size"))
    if resolved(cfg, "max_doc_tokens") is not None:
        _int(cfg, "max_doc_tokens", 1)
    if resolved(cfg, "auxk_window") is not None:
        _int(cfg, "auxk_window", 1)
    _check_sae_keys(cfg)
    _check_optimizer(cfg)
    _choice(cfg, "activations.cache", ("memory", "disk", "auto"))
    _choice(cfg, "activations.dtype", tuple(STORE_DTYPES))
    _text(cfg, "activations.cache_dir")
    _number(cfg, "activations.cache_max_gb", 0.0, strict=True)
    if resolved(cfg, "activations.outlier_factor") is not None:
        _number(cfg, "activations.outlier_factor", 1.0, strict=True)
    _choice(cfg, "b_dec_init", B_DEC_METHODS)
    _bool(cfg, "normalize_input")
    _int(cfg, "resample_every", 0)
    _int(cfg, "schedule.lr_warmup_steps", 0)
    _int(cfg, "schedule.sparsity_warmup_steps", 0)
    _number(cfg, "schedule.lr_decay_frac", 0.0, high=1.0)
    _bool(cfg, "export.neuronpedia")
    set_name = _text(cfg, "export.set_name", optional=True)
    if set_name is not None and len(set_name) > SET_NAME_CHARS:
        raise ConfigError(f"export.set_name is {len(set_name):,} characters long; it names a folder of exports/ "
                          f"(LAYER-SET_NAME), so at most {SET_NAME_CHARS}")
    if _text(cfg, "storage.url", optional=True) is not None:
        try:
            parse_url(resolved(cfg, "storage.url"))
        except StoreError as err:
            raise ConfigError(f"storage.url: {err}") from None
    _check_model(cfg)
    _check_data(cfg)
    _check_trainer(cfg)


def check_resolvable(node: DictConfig | ListConfig, prefix: str = "") -> None:
    """Every value resolves and none is left ???: keys no check here reads (an SAE setting, a trainer option)
    would otherwise fail wherever they are first read, after the model has loaded, with a traceback."""
    keys = range(len(node)) if isinstance(node, ListConfig) else node.keys()
    for key in keys:
        path = f"{prefix.removesuffix('.')}[{key}]" if isinstance(node, ListConfig) else f"{prefix}{key}"
        if OmegaConf.is_missing(node, key):
            raise ConfigError(f"{path} is required: pass {path}=...")
        try:
            child = node[key]
        except OmegaConfBaseException as err:  # worded as resolved() words it
            raise ConfigError(f"{path} cannot be resolved: {str(err).splitlines()[0]}") from None
        if isinstance(child, (DictConfig, ListConfig)):
            check_resolvable(child, f"{path}.")


# Given by train.py, not by the config: the model's width and the run's seed (and a transcoder's output width).
SAE_ARGUMENTS_FROM_THE_RUN = ("d_in", "seed", "d_out")
# Keys of `sae:` that pick the class rather than set it up: sae.kind (sae | transcoder), and sae.skip.
SAE_KIND_KEYS = ("kind", "skip")


def sae_class(cfg: DictConfig) -> type:
    """The class `sae:` builds: the architecture `_target_` names, or its transcoder (`sae.kind=transcoder`)."""
    cls = _class(cfg, "sae._target_", "midisc.sae.topk.TopKSAE")
    try:
        return coder_class(cls, cfg.sae.get("kind", "sae"), cfg.sae.get("skip", False))
    except ValueError as err:
        raise ConfigError(f"sae.{err}") from None


def _check_sae_keys(cfg: DictConfig) -> None:
    """Every `sae:` key is a setting of the class it names; Hydra would fail on one only after the model loads."""
    cls = _class(cfg, "sae._target_", "midisc.sae.topk.TopKSAE")
    sae_class(cfg)  # kind and skip: refused here too, before the model loads
    settings = [p for p in inspect.signature(cls).parameters if p not in SAE_ARGUMENTS_FROM_THE_RUN]
    settings += list(SAE_KIND_KEYS)
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
    partial = resolved(cfg, "optimizer._partial_")
    if partial is not True:  # SAEModule calls what instantiate returns with the SAE's parameters
        raise ConfigError(f"optimizer._partial_ must be true (midisc passes the SAE's parameters to the "
                          f"optimizer), got {partial!r}")
    if "lr" in cfg.optimizer:
        _number(cfg, "optimizer.lr", 0.0, strict=True)
    if "momentum" in cfg.optimizer:  # Signum's (and SGD's); checked by them only once the model has loaded
        _number(cfg, "optimizer.momentum", 0.0, high=1.0)
    if "betas" in cfg.optimizer:  # Adam checks them only when Lightning builds it, after the model has loaded
        betas = resolved(cfg, "optimizer.betas")
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
    device_map = resolved(cfg, "model.device_map")
    # Used only where CUDA is: checked here too, so a config tried on a laptop does not fail on the GPU machine.
    if not (device_map is None or (isinstance(device_map, DictConfig) and device_map)
            or (isinstance(device_map, int) and not isinstance(device_map, bool) and device_map >= 0)
            or (isinstance(device_map, str) and (device_map in DEVICE_MAP_STRATEGIES or _is_device(device_map)))):
        raise ConfigError(f"model.device_map must be one of {', '.join(DEVICE_MAP_STRATEGIES)}, a device such as "
                          f"cuda:0 or cpu, a GPU index, a mapping of modules to devices, or null; got {device_map!r}")
    hooks = resolved(cfg, "model.hooks")
    if not isinstance(hooks, DictConfig) or not hooks:
        raise ConfigError(f"model.hooks must map site names to module paths such as model.layers.{{layer}}, "
                          f"got {hooks!r}")
    for site in hooks:
        _text(cfg, f"model.hooks.{site}")
    _text(cfg, "model.hook", optional=True)  # model.site is checked against the hooks in lm.resolve_hook


# accelerate's placements for transformers' device_map; any other string must name a torch device.
DEVICE_MAP_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")


def _is_device(name: str) -> bool:
    try:
        torch.device(name)
    except (RuntimeError, ValueError):
        return False
    return True


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


def harvest_part(cfg: DictConfig) -> tuple[int, int] | None:
    """activations.part as (i, n): part i of a harvest split n ways (`python -m midisc.harvest`); None for all."""
    value = resolved(cfg, "activations.part")
    if value is None:
        return None
    index, _, count = str(value).partition("/")
    if not (index.isdigit() and count.isdigit() and int(index) < int(count)):
        raise ConfigError(f"activations.part must be I/N with 0 <= I < N (part I of a harvest split N ways), e.g. "
                          f"activations.part=0/2; got {value!r}")
    return int(index), int(count)


def world_size(cfg: DictConfig) -> int:
    """Processes that train the SAE together: devices per node × nodes (1 for a single-process run)."""
    devices, nodes = resolved(cfg, "trainer.devices") or 1, resolved(cfg, "trainer.num_nodes") or 1
    count = len(devices) if isinstance(devices, ListConfig) else devices
    return count * nodes if type(count) is int and type(nodes) is int else 1


DISTRIBUTED_STRATEGIES = ("ddp", "ddp_find_unused_parameters_true")


def _check_distributed(cfg: DictConfig) -> None:
    """What a distributed run (DDP through Lightning, several processes) cannot combine with, refused before any
    process starts."""
    world = world_size(cfg)
    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        raise ConfigError(f"trainer.devices with {world} processes cannot run inside a -m sweep (each rank would "
                          "start the whole sweep again); run each setting as its own command")
    if any(resolved(cfg, key) is not None for key in ("layers", "hooks")):
        raise ConfigError(f"layers=[…] / hooks=[…] train one hook after another in one process; with {world} "
                          "processes train one hook per command (layer=N)")
    if resolved(cfg, "activations.cache") == "memory":
        raise ConfigError(f"activations.cache=memory with {world} processes: the ranks read disjoint blocks of one "
                          "disk cache; set activations.cache=disk or auto")
    if resolved(cfg, "resample_every"):
        raise ConfigError(f"resample_every={resolved(cfg, 'resample_every')} with {world} processes: each rank would "
                          "resample on its own data and the copies of the SAE would drift apart; set resample_every=0")


def _check_trainer(cfg: DictConfig) -> None:
    """The Trainer's own checks run only once the model has loaded: these keys are refused before."""
    trainer = cfg.trainer
    _class(cfg, "trainer._target_", "lightning.pytorch.Trainer")
    for key in ("enable_checkpointing", "enable_model_summary", "enable_progress_bar"):
        if key in trainer:
            _bool(cfg, f"trainer.{key}")
    for key, low in (("max_epochs", 1), ("max_steps", -1), ("log_every_n_steps", 1), ("num_sanity_val_steps", -1)):
        if key in trainer:
            _int(cfg, f"trainer.{key}", low)
    if "accelerator" in trainer:
        _choice(cfg, "trainer.accelerator", _accelerators())
    if "devices" in trainer:
        devices, gpus = resolved(cfg, "trainer.devices"), torch.cuda.device_count()
        indices = (isinstance(devices, ListConfig) and len(devices) > 0 and len(set(devices)) == len(devices)
                   and all(type(d) is int and 0 <= d < gpus for d in devices))
        if not (indices or (type(devices) is int and devices >= 1)):
            valid = "a number of devices (1, 2, …)" + (f", or GPU indices in a list, [0]..[{gpus - 1}]" if gpus else "")
            raise ConfigError(f"trainer.devices must be {valid}; got {devices!r}")
    if "num_nodes" in trainer:
        _int(cfg, "trainer.num_nodes", 1)
    if "strategy" in trainer:
        chosen = resolved(cfg, "trainer.strategy")
        if isinstance(chosen, DictConfig):
            _class(cfg, "trainer.strategy._target_", "lightning.pytorch.strategies.DDPStrategy")
        elif isinstance(chosen, bool) or chosen not in ("auto", *DISTRIBUTED_STRATEGIES):
            raise ConfigError(f"trainer.strategy={chosen!r} is not valid; choose one of: auto, "
                              f"{', '.join(DISTRIBUTED_STRATEGIES)}, or a strategy with _target_")
    _int(cfg, "ddp_timeout", 1)
    if world_size(cfg) > 1:
        _check_distributed(cfg)
    if "precision" in trainer and _precisions():
        _choice(cfg, "trainer.precision", _precisions())
