"""The Trainer's keys and the distributed run: what Lightning would check only once the model has loaded, and
what a run of several processes (DDP) cannot combine with, refused before any process starts."""

from __future__ import annotations

from typing import get_args

import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, ListConfig

from midisc.config.values import ConfigError, check_bool, check_choice, check_class, check_int, resolved


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


def check_trainer(cfg: DictConfig) -> None:
    """The Trainer's own checks run only once the model has loaded: these keys are refused before."""
    trainer = cfg.trainer
    check_class(cfg, "trainer._target_", "lightning.pytorch.Trainer")
    for key in ("enable_checkpointing", "enable_model_summary", "enable_progress_bar"):
        if key in trainer:
            check_bool(cfg, f"trainer.{key}")
    for key, low in (("max_epochs", 1), ("max_steps", -1), ("log_every_n_steps", 1), ("num_sanity_val_steps", -1)):
        if key in trainer:
            check_int(cfg, f"trainer.{key}", low)
    if "accelerator" in trainer:
        check_choice(cfg, "trainer.accelerator", _accelerators())
    if "devices" in trainer:
        devices, gpus = resolved(cfg, "trainer.devices"), torch.cuda.device_count()
        indices = (isinstance(devices, ListConfig) and len(devices) > 0 and len(set(devices)) == len(devices)
                   and all(type(d) is int and 0 <= d < gpus for d in devices))
        if not (indices or (type(devices) is int and devices >= 1)):
            valid = "a number of devices (1, 2, …)" + (f", or GPU indices in a list, [0]..[{gpus - 1}]" if gpus else "")
            raise ConfigError(f"trainer.devices must be {valid}; got {devices!r}")
    if "num_nodes" in trainer:
        check_int(cfg, "trainer.num_nodes", 1)
    if "strategy" in trainer:
        chosen = resolved(cfg, "trainer.strategy")
        if isinstance(chosen, DictConfig):
            check_class(cfg, "trainer.strategy._target_", "lightning.pytorch.strategies.DDPStrategy")
        elif isinstance(chosen, bool) or chosen not in ("auto", *DISTRIBUTED_STRATEGIES):
            raise ConfigError(f"trainer.strategy={chosen!r} is not valid; choose one of: auto, "
                              f"{', '.join(DISTRIBUTED_STRATEGIES)}, or a strategy with _target_")
    check_int(cfg, "ddp_timeout", 1)
    if world_size(cfg) > 1:
        _check_distributed(cfg)
    if "precision" in trainer and _precisions():
        check_choice(cfg, "trainer.precision", _precisions())
