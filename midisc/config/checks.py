"""The checks of the training config as a whole (`check_config`), of the SAE's keys and class, the optimizer, the
model and the data, and whether an SAE fits in this machine's memory."""

from __future__ import annotations

import difflib
import inspect
import os

import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from midisc.config.trainer import check_trainer
from midisc.config.values import (ConfigError, check_bool, check_choice, check_class, check_encoding, check_int,
                                  check_number, check_text, resolved)
from midisc.data.activations import STORE_DTYPES
from midisc.data.corpus import SOURCES
from midisc.data.lm import DTYPES
from midisc.sae.base import B_DEC_METHODS
from midisc.sae.transcoder import coder_class
from midisc.store.engine import StoreError, parse_url


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
        check_int(cfg, "layer", 0)
    check_int(cfg, "seed", 0, 2**32 - 1)  # the range Lightning's seed_everything accepts
    for key, low in [("max_samples", 1), ("context_size", 2), ("batch_size", 1), ("epochs", 1),
                     ("dead_window", 1), ("activations.buffer_size", 1), ("activations.lm_batch_size", 1),
                     ("data.holdout_texts", 1), ("export.features_per_batch", 1),
                     ("export.output_tokens", 1), ("analysis.n_top", 1), ("analysis.n_quantile", 0),
                     ("analysis.before", 0), ("analysis.after", 0), ("checkpoint_every", 1),
                     ("evaluate.contexts", 0)]:
        check_int(cfg, key, low)
    if resolved(cfg, "resume") is not None:
        check_int(cfg, "resume", 1)
    if resolved(cfg, "max_vectors") is not None:
        check_int(cfg, "max_vectors", resolved(cfg, "batch_size"))
    if resolved(cfg, "max_doc_tokens") is not None:
        check_int(cfg, "max_doc_tokens", 1)
    if resolved(cfg, "auxk_window") is not None:
        check_int(cfg, "auxk_window", 1)
    _check_sae_keys(cfg)
    _check_optimizer(cfg)
    check_choice(cfg, "activations.cache", ("memory", "disk", "auto"))
    check_choice(cfg, "activations.dtype", tuple(STORE_DTYPES))
    check_text(cfg, "activations.cache_dir")
    check_number(cfg, "activations.cache_max_gb", 0.0, strict=True)
    if resolved(cfg, "activations.outlier_factor") is not None:
        check_number(cfg, "activations.outlier_factor", 1.0, strict=True)
    check_choice(cfg, "b_dec_init", B_DEC_METHODS)
    check_bool(cfg, "normalize_input")
    check_int(cfg, "resample_every", 0)
    check_int(cfg, "schedule.lr_warmup_steps", 0)
    check_int(cfg, "schedule.sparsity_warmup_steps", 0)
    check_number(cfg, "schedule.lr_decay_frac", 0.0, high=1.0)
    check_bool(cfg, "export.neuronpedia")
    set_name = check_text(cfg, "export.set_name", optional=True)
    if set_name is not None and len(set_name) > SET_NAME_CHARS:
        raise ConfigError(f"export.set_name is {len(set_name):,} characters long; it names a folder of exports/ "
                          f"(LAYER-SET_NAME), so at most {SET_NAME_CHARS}")
    if check_text(cfg, "storage.url", optional=True) is not None:
        try:
            parse_url(resolved(cfg, "storage.url"))
        except StoreError as err:
            raise ConfigError(f"storage.url: {err}") from None
    _check_model(cfg)
    _check_data(cfg)
    check_trainer(cfg)


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
    cls = check_class(cfg, "sae._target_", "midisc.sae.topk.TopKSAE")
    try:
        return coder_class(cls, cfg.sae.get("kind", "sae"), cfg.sae.get("skip", False))
    except ValueError as err:
        raise ConfigError(f"sae.{err}") from None


def _check_sae_keys(cfg: DictConfig) -> None:
    """Every `sae:` key is a setting of the class it names; Hydra would fail on one only after the model loads."""
    cls = check_class(cfg, "sae._target_", "midisc.sae.topk.TopKSAE")
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
    check_class(cfg, "optimizer._target_", "torch.optim.Adam")
    partial = resolved(cfg, "optimizer._partial_")
    if partial is not True:  # SAEModule calls what instantiate returns with the SAE's parameters
        raise ConfigError(f"optimizer._partial_ must be true (midisc passes the SAE's parameters to the "
                          f"optimizer), got {partial!r}")
    if "lr" in cfg.optimizer:
        check_number(cfg, "optimizer.lr", 0.0, strict=True)
    if "momentum" in cfg.optimizer:  # Signum's (and SGD's); checked by them only once the model has loaded
        check_number(cfg, "optimizer.momentum", 0.0, high=1.0)
    if "betas" in cfg.optimizer:  # Adam checks them only when Lightning builds it, after the model has loaded
        betas = resolved(cfg, "optimizer.betas")
        numbers = isinstance(betas, ListConfig) and all(
            isinstance(b, (int, float)) and not isinstance(b, bool) for b in betas)
        if not numbers or len(betas) != 2 or not all(0 <= b < 1 for b in betas):
            raise ConfigError(f"optimizer.betas must be two numbers in [0, 1), e.g. [0.9,0.999], got {betas!r}")


def _check_model(cfg: DictConfig) -> None:
    check_text(cfg, "model.name")
    for key in ("gguf_package", "gguf_file", "separator"):
        check_text(cfg, f"model.{key}", optional=True)
    check_choice(cfg, "model.dtype", tuple(DTYPES))
    check_bool(cfg, "model.prepend_bos")
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
        check_text(cfg, f"model.hooks.{site}")
    check_text(cfg, "model.hook", optional=True)  # model.site is checked against the hooks in lm.resolve_hook


# accelerate's placements for transformers' device_map; any other string must name a torch device.
DEVICE_MAP_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")


def _is_device(name: str) -> bool:
    try:
        torch.device(name)
    except (RuntimeError, ValueError):
        return False
    return True


def _check_data(cfg: DictConfig) -> None:
    check_choice(cfg, "data.source", SOURCES)
    for key in ("package", "subdir", "path", "name", "split", "field"):
        if key in cfg.data:
            check_text(cfg, f"data.{key}")
    if "config_name" in cfg.data:
        check_text(cfg, "data.config_name", optional=True)
    if "dedupe" in cfg.data:
        check_bool(cfg, "data.dedupe")
    if "encoding" in cfg.data:
        check_encoding(cfg, "data.encoding")
