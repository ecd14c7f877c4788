"""`python -m midisc.train`: compose the config, train an SAE on one layer, record the run.

    python -m midisc.train                                  # bundled SmolLM2, BBC News, SQLite
    python -m midisc.train sae.expansion=16 layer=24
    python -m midisc.train -m sae.k=16,32 layer=8,16        # a sweep: one database run per job
    python -m midisc.train layers=[4,8,15,24]               # one model pass, one run per layer
    python -m midisc.train trainer=ddp trainer.devices=4    # one run, data-parallel over 4 processes
    python -m midisc.train experiment=seed_phi2

Order of work: check the config, open the database, check the hook against the model's architecture,
and only then load weights, so mistakes cost seconds. A run that fails after it was recorded is marked
failed (Ctrl-C: interrupted) with the error text.
"""

from __future__ import annotations

import logging
import sys
import traceback
from contextlib import ExitStack
from pathlib import Path

import hydra
import lightning as L
from dotenv import load_dotenv
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from midisc.cli import user_errors
from midisc.config import ConfigError, check_config, check_fits_in_memory
from midisc.overrides import override_errors
from midisc.run import Prepared, build_sae, expected_rows, fit, load_corpus, make_cache, train
from midisc.data import lm
from midisc.data.cache import cache_bytes
from midisc.data.prefill import prefill
from midisc.data.recipe import Recipe
from midisc.jobs import hook_jobs, job_overrides, resumed_config, several_hooks, sweep_of_job
from midisc.store import Store
from midisc.store.redaction import redact_console, redact_log_records, redact_text, scrub_hydra_files
from midisc.training.checkpoints import last_checkpoint
from midisc.training.outcome import Result, summary
from midisc.training.ranks import is_secondary, rank_name, run_id_of_job
from midisc.training.run_log import (log_into_run_folder, logging_into, quiet_lightning, remove_unused_run_folder,
                                     to_file_only)


log = logging.getLogger(__name__)


def train_rank(cfg: DictConfig, output_dir: Path) -> None:
    """A rank after the first of a distributed run (see training/ranks.py): the same checks and data as rank 0,
    its share of the training, nothing recorded. If it crashes it marks the run failed itself: Lightning's
    launcher then kills rank 0, which has no chance to."""
    check_config(cfg)
    split = load_corpus(cfg)
    m = cfg.model
    hf_config = lm.load_config(lm.model_source(m.name, m.gguf_package, m.gguf_file))
    hook = lm.resolve_hook(hf_config, layer=cfg.layer, site=m.site, hooks=dict(m.hooks), hook=m.hook)
    L.seed_everything(cfg.seed, verbose=False)
    resume_from = last_checkpoint(output_dir) if cfg.resume is not None else None  # rank 0 chose it already
    try:
        fit(cfg, output_dir, None, None, hook, split.train, split.heldout, resume_from)
    except Exception as err:
        run_id = run_id_of_job()
        if run_id is not None and cfg.storage.url:
            error = str(err) if isinstance(err, user_errors()) else "".join(traceback.format_exception(err))
            with Store(cfg.storage.url) as store:
                store.finish_run(run_id, "failed", error=f"{rank_name()} failed: {redact_text(error)[-7900:]}")
        raise


def train_hooks(cfg: DictConfig, output_dir: Path) -> tuple[list[Result], list[str]]:
    """Train one SAE per entry of `layers` / `hooks` from one pass of the language model (see data/prefill.py),
    each a run of its own in output_dir/<layer=N>/. A run that fails is recorded failed and the others go on.
    Returns (the completed runs' results, one line per failed run)."""
    jobs = hook_jobs(cfg)
    for name, one in jobs:
        try:
            check_config(one)
        except ConfigError as err:
            raise ConfigError(f"{name}: {err}") from None
    split = load_corpus(cfg)
    m = cfg.model
    hf_config = lm.load_config(lm.model_source(m.name, m.gguf_package, m.gguf_file))
    hooks = []
    for name, one in jobs:
        hook = lm.resolve_hook(hf_config, layer=one.layer, site=m.site, hooks=dict(m.hooks), hook=one.model.hook)
        if hook in hooks:
            raise ConfigError(f"{name} hooks {hook}, as an earlier entry does; each hook trains one SAE")
        hooks.append(hook)
        if one.model.hook is None:
            check_fits_in_memory(build_sae(one, d_in=hf_config.hidden_size, device="meta"),
                                 OmegaConf.to_container(one.analysis))
    recipes = [Recipe.of(OmegaConf.to_container(one, resolve=True), hook) for (_, one), hook in zip(jobs, hooks)]
    tokens = recipes[0].tokens()
    train_ctx, heldout_ctx = tokens.pack(split.train), tokens.pack(split.heldout)
    expected = expected_rows(cfg, tokens, train_ctx)
    first = recipes[0].open(tokens)
    sources = [first, *(recipe.open(tokens, first.loaded) for recipe in recipes[1:])]
    sweep_id, overrides = sweep_of_job()
    if sweep_id is None:  # the job's runs are a sweep of their own
        sweep_id = str(Path(output_dir).resolve())
    results, failed = [], []
    with ExitStack() as held:
        need = cache_bytes(expected + heldout_ctx.numel(), first.model.config.hidden_size, recipes[0].dtype,
                           tokens=heldout_ctx.numel())
        caches = [held.enter_context(make_cache(one, recipe.producer(), need, several=True))
                  for (_, one), recipe in zip(jobs, recipes)]
        todo = [i for i, cache in enumerate(caches) if not cache.complete]
        if len(todo) < len(caches):
            log.info(f"reusing cached activations of {', '.join(jobs[i][0] for i in range(len(jobs)) if i not in todo)}")
        if todo:
            log.info(f"harvesting {', '.join(jobs[i][0] for i in todo)} in one pass of {m.name}, up to the deepest")
        made = prefill([sources[i] for i in todo], [caches[i] for i in todo], train_ctx, heldout_ctx, cfg.max_vectors)
        heldout = {i: chunks for i, chunks in zip(todo, made)}
        for i, ((name, one), source, cache) in enumerate(zip(jobs, sources, caches)):
            chunks = heldout[i] if i in heldout else cache.load_heldout()
            run_dir = Path(output_dir) / name
            run_dir.mkdir(parents=True, exist_ok=True)
            prepared = Prepared(tokens, train_ctx, heldout_ctx, source, cache, chunks)
            try:
                with logging_into(run_dir / "train.log"):
                    results.append(train(one, run_dir, prepared, sweep=(sweep_id, job_overrides(overrides, name))))
            except user_errors() as err:
                failed.append(f"{name}: {err}")
                log.error(f"{name} failed: {err}")
            except Exception as err:  # a bug: the run is recorded failed with its traceback; the others go on
                failed.append(f"{name}: {type(err).__name__}: {err}")
                log.error(redact_text("".join(traceback.format_exception(err))))
    return results, failed


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> None:
    redact_log_records()  # again here: a joblib sweep runs this in worker processes that never ran __main__
    logging.captureWarnings(True)  # Python's warnings into the run's log, as the terminal shows them
    quiet_lightning()
    output_dir = Path(HydraConfig.get().runtime.output_dir)
    sweep_dir = HydraConfig.get().sweep.dir if HydraConfig.get().mode == RunMode.MULTIRUN else None
    scrub_hydra_files(output_dir, Path(sweep_dir) if sweep_dir else None)  # a password given in storage.url
    fresh = output_dir
    try:
        if cfg.resume is not None:
            try:
                cfg, output_dir = resumed_config(cfg)
            except BaseException:  # a refused resume: the folder Hydra made for it goes again
                remove_unused_run_folder(fresh)
                raise
            if sweep_dir is None:
                log_into_run_folder(fresh, output_dir)
        if is_secondary():
            train_rank(cfg, output_dir)
            results, failed = [], []
        elif several_hooks(cfg):
            results, failed = train_hooks(cfg, output_dir)
        else:
            results, failed = [train(cfg, output_dir)], []
    except user_errors() as err:
        print(f"error: {err}", file=sys.stderr)
        to_file_only(f"error: {err}")
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as err:  # a bug: Hydra prints the traceback, the log keeps it too
        to_file_only(redact_text("".join(traceback.format_exception(err))))
        raise
    for result in results:
        log.info(summary(result, cfg.storage.url))
    if failed:
        message = f"{len(failed)} of {len(failed) + len(results)} runs failed:\n  " + "\n  ".join(failed)
        print(f"error: {message}", file=sys.stderr)
        to_file_only(f"error: {message}")
        sys.exit(1)


if __name__ == "__main__":
    load_dotenv(Path.cwd() / ".env")  # POSTGRES_* and MIDISC_DB_URL may live in a .env file
    redact_log_records()  # before Hydra's launcher logs each job's overrides, storage.url among them
    redact_console()  # and before it prints a failed job's overrides straight to stderr
    # Before Hydra, which refuses a misspelt key with a struct error and no suggestion, after making the folders,
    # and a bad override in several lines or with a traceback.
    mistakes = override_errors(sys.argv[1:], str(Path(__file__).parents[1] / "conf"))
    if mistakes:
        print(f"error: {mistakes[0]}", file=sys.stderr)
        sys.exit(2)
    main()
