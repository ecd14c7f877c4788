"""The config's own rules: its resolvers, and the checks that refuse an impossible value before anything slow
happens, with one line naming the value and the valid range.

Checks here need only the config itself; checks that need the model's shape (layer past the last block,
an unknown module path) run in `midisc.data.lm.resolve_hook`. The SAE's hyperparameters are checked by its
constructor alone (with `midisc.sae.settings`, the functions that check every number here too), which
`train.py` runs on the meta device with the model's width before any weights load; here only the names
of the `sae:` keys are checked against the constructor's.

`values` reads one key and refuses it in one line; `checks` holds `check_config` and the checks of the SAE,
optimizer, model and data groups; `trainer` those of the Trainer and of distributed runs. This package imports
`sae`, `data` and `store`; the commands and `run` import it.
"""

from __future__ import annotations

import hashlib

from omegaconf import OmegaConf

from midisc.config.checks import check_config, check_fits_in_memory, sae_class
from midisc.config.trainer import DISTRIBUTED_STRATEGIES, harvest_part, world_size
from midisc.config.values import ConfigError, resolved
from midisc.store.engine import postgres_url_from_env

__all__ = ["DISTRIBUTED_STRATEGIES", "ConfigError", "check_config", "check_fits_in_memory", "harvest_part", "resolved",
           "sae_class", "short_dirname", "world_size"]


def short_dirname(name: str, limit: int = 120) -> str:
    """A sweep job's folder name: the overrides, or a readable prefix plus a hash when too long for a file name."""
    if len(name) <= limit:
        return name
    return f"{name[: limit - 17]}-{hashlib.sha1(name.encode()).hexdigest()[:16]}"


OmegaConf.register_new_resolver("midisc.dirname", short_dirname, replace=True)
# conf/storage/postgres.yaml: one builder of the URL (escaping the password) for training and the tools.
OmegaConf.register_new_resolver("midisc.postgres_url", postgres_url_from_env, replace=True)
