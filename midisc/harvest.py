"""`python -m midisc.harvest`: fill the activation cache without training, whole or one part of a split harvest.

    python -m midisc.harvest layers=[4,8,15,24]                 # one pass of the model, four caches
    python -m midisc.harvest layer=15 activations.part=0/2      # on machine A: contexts 0, 2, 4, …
    python -m midisc.harvest layer=15 activations.part=1/2      # on machine B: contexts 1, 3, 5, …
    python -m midisc.cache merge A B --into outputs/activation_cache     # A, B: the parts' cache_dir

It takes the training config (the same overrides a later `python -m midisc.train` gets), so the caches it
writes are the ones that run looks for: a run, or a sweep, then trains without running the model. Part i of
n harvests every n-th training context from the i-th, part 0 the held-out contexts too; `midisc.cache merge`
joins the parts into the cache of the whole harvest.
"""

from __future__ import annotations

import logging
import sys
from contextlib import ExitStack
from pathlib import Path

import hydra
from dotenv import load_dotenv
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from midisc.cli import user_errors
from midisc.config import ConfigError, check_config, harvest_part
from midisc.data import lm
from midisc.data.cache import SharedCache, cache_bytes
from midisc.data.prefill import prefill
from midisc.data.recipe import Recipe
from midisc.jobs import hook_jobs, several_hooks
from midisc.overrides import override_errors
from midisc.run import expected_rows, load_corpus
from midisc.store.redaction import redact_log_records
from midisc.training.run_log import remove_unused_run_folder

log = logging.getLogger(__name__)


def harvest(cfg: DictConfig) -> list[SharedCache]:
    """Harvest every hook the config names (`layer`, `layers=[…]` or `hooks=[…]`) in one pass into the disk cache
    under activations.cache_dir, or the part `activations.part` says; the caches, complete (released)."""
    jobs = hook_jobs(cfg) if several_hooks(cfg) else [(f"layer={cfg.layer}" if cfg.model.hook is None
                                                      else f"hook={cfg.model.hook}", cfg)]
    for name, one in jobs:
        check_config(one)
    part = harvest_part(cfg)
    if part and cfg.max_vectors is not None:
        raise ConfigError(f"activations.part={cfg.activations.part} with max_vectors={cfg.max_vectors}: a part cannot "
                          "tell which vectors the whole harvest would have stopped at; cap the data with max_samples")
    split = load_corpus(cfg)
    m = cfg.model
    hf_config = lm.load_config(lm.model_source(m.name, m.gguf_package, m.gguf_file))
    hooks = [lm.resolve_hook(hf_config, layer=one.layer, site=m.site, hooks=dict(m.hooks), hook=one.model.hook)
             for _, one in jobs]
    recipes = [Recipe.of(OmegaConf.to_container(one, resolve=True), hook) for (_, one), hook in zip(jobs, hooks)]
    tokens = recipes[0].tokens()
    train_ctx, heldout_ctx = tokens.pack(split.train), tokens.pack(split.heldout)
    expected = expected_rows(cfg, tokens, train_ctx)
    if part:
        index, count = part
        train_ctx, heldout_ctx = train_ctx[index::count], heldout_ctx[:len(heldout_ctx) if index == 0 else 0]
        expected = expected // count + 1
    acts = cfg.activations
    need = cache_bytes(expected + heldout_ctx.numel(), hf_config.hidden_size, acts.dtype, tokens=heldout_ctx.numel())
    with ExitStack() as held:
        caches = []
        for recipe in recipes:
            producer = {**recipe.producer(), **({"part": acts.part} if part else {})}
            caches.append(held.enter_context(SharedCache.open(
                acts.cache_dir, producer, dtype=acts.dtype, max_bytes=int(acts.cache_max_gb * 1e9),
                expected_bytes=need, log=log.info)))
        todo = [i for i, cache in enumerate(caches) if not cache.complete]
        if todo:
            first = recipes[todo[0]].open(tokens)
            sources = [first, *(recipes[i].open(tokens, first.loaded) for i in todo[1:])]
            prefill(sources, [caches[i] for i in todo], train_ctx, heldout_ctx, cfg.max_vectors)
        for (name, _), cache, i in zip(jobs, caches, range(len(jobs))):
            said = "harvested" if i in todo else "already cached"
            log.info(f"{name}: {said}, {cache.describe()} in {cache.folder}")
    if part:
        log.info(f"part {acts.part} done; once every part is, join them: python -m midisc.cache merge <each part's "
                 f"cache_dir, this one {acts.cache_dir}> --into <the cache_dir training reads>")
    return caches


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> None:
    redact_log_records()
    output_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        harvest(cfg)
    except user_errors() as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    finally:
        remove_unused_run_folder(output_dir)  # the caches are the product; the run folder holds only the log


if __name__ == "__main__":
    load_dotenv(Path.cwd() / ".env")
    mistakes = override_errors(sys.argv[1:], str(Path(__file__).parents[1] / "conf"))
    if mistakes:
        print(f"error: {mistakes[0]}", file=sys.stderr)
        sys.exit(2)
    main()
