"""`python -m midisc.train`: compose the config, train an SAE on one layer, record the run.

    python -m midisc.train                                  # bundled SmolLM2, BBC News, SQLite
    python -m midisc.train sae.expansion=16 layer=24
    python -m midisc.train -m sae.k=16,32 layer=8,16        # a sweep: one database run per job
    python -m midisc.train experiment=seed_phi2

Order of work: check the config, open the database, check the hook against the model's architecture,
and only then load weights, so mistakes cost seconds. A run that fails after it was recorded is marked
failed (Ctrl-C: interrupted) with the error text.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import time
import traceback
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass
from pathlib import Path

import hydra
import lightning as L
import torch
from dotenv import load_dotenv
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.errors import InstantiationException
from hydra.utils import get_class, instantiate
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader

from midisc.analysis.features import frequency_bins
from midisc.cli import user_errors
from midisc.config import ConfigError, check_config, check_fits_in_memory
from midisc.overrides import override_errors
from midisc.data import corpus, lm
from midisc.data.activations import ActivationCache, ActivationStream, ContextChunk, MemoryCache, keep_mask
from midisc.data.recipe import Recipe, Source, Tokens
from midisc.data.cache import SharedCache, cache_bytes
from midisc.data.prefill import prefill
from midisc.jobs import (hook_jobs, job_overrides, plan, recorded_config, resumed_config, several_hooks, sweep_of_job,
                         sync_command)
from midisc.publish.publication import run_info
from midisc.run_folder import CHECKPOINT_DIR, CURVES_FILENAME, PENDING_FILENAME
from midisc.store import Store, storage_argument
from midisc.store.journal import Journal
from midisc.store.redaction import redact_console, redact_log_records, redact_text, scrub_hydra_files
from midisc.training.callbacks import MetricsRecorder, ProgressBar
from midisc.training.checkpoints import (CheckpointError, Checkpointer, RunLock, checkpoint_step, last_checkpoint,
                                        resume_checkpoint, trainer_position, trim_curves)
from midisc.training.finish import RunEnd, finish
from midisc.training.module import SAEModule, StopOnNonFiniteLoss
from midisc.training.outcome import Result, summary
from midisc.training.run_log import (log_into_run_folder, logging_into, quiet_lightning, remove_unused_run_folder,
                                     to_file_only)

log = logging.getLogger(__name__)


def load_corpus(cfg: DictConfig) -> corpus.Split:
    return corpus.train_heldout(OmegaConf.to_container(cfg.data, resolve=True), cfg.seed, cfg.max_samples)


def build_sae(cfg: DictConfig, d_in: int, device: str = "cpu") -> torch.nn.Module:
    """The configured SAE. Its constructor is the one place its hyperparameters are checked (k within the
    width, l1_coef >= 0…): a refusal becomes a ConfigError naming the key, e.g. `sae.k=0 is too small`."""
    try:
        with torch.device(device):
            return instantiate(cfg.sae, d_in=d_in, seed=cfg.seed)
    except InstantiationException as err:  # Hydra wraps the constructor's ValueError
        cause = err.__cause__
        if isinstance(cause, ValueError):
            raise ConfigError(f"sae.{cause}") from None
        # A width past int64 (even on the meta device), or past a GPU's memory: torch's first line says which.
        if isinstance(cause, (RuntimeError, TypeError)) and re.search("allocate|Overflow", str(cause)):
            said = str(cause).strip().splitlines()[0][:200]
            raise ConfigError(f"sae.expansion={cfg.sae.get('expansion')} with d_in={d_in} makes an SAE too large to "
                              f"build ({said}); lower sae.expansion") from None
        raise


def make_cache(cfg: DictConfig, producer: dict, expected_bytes: int, several: bool = False):
    """The activation cache the config asks for; `auto` shares one on disk between the jobs of a sweep and the
    hooks of a job of several (`several`), and keeps a single run's in memory. A context manager."""
    acts = cfg.activations
    mode = acts.cache
    if mode == "auto":
        sweep = HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN
        mode = "disk" if sweep or several else "memory"
    if mode == "memory":
        return nullcontext(MemoryCache())
    return SharedCache.open(acts.cache_dir, producer, dtype=acts.dtype, max_bytes=int(acts.cache_max_gb * 1e9),
                            expected_bytes=expected_bytes, log=log.info)


def make_loggers(cfg: DictConfig, output_dir: Path) -> list:
    if "wandb" in cfg.logger and not os.environ.get("WANDB_API_KEY"):
        os.environ.setdefault("WANDB_MODE", "offline")  # files in the run folder; `wandb sync` uploads later
    return [instantiate(conf, save_dir=str(output_dir)) for conf in cfg.logger.values()]


def train(cfg: DictConfig, output_dir: Path, prepared: Prepared | None = None,
          sweep: tuple[str | None, list[str] | None] | None = None) -> Result:
    """Train one SAE on one hook and record it. `prepared` and `sweep` come from a job of several hooks: its
    harvest, and the sweep id and overrides its runs are recorded with (else this job's own)."""
    started = time.time()
    try:  # refusals: nothing has started, and a folder Hydra made for the run goes again
        check_config(cfg)
        split = load_corpus(cfg)
        train_texts, heldout_texts = split.train, split.heldout
        store = Store(cfg.storage.url) if cfg.storage.url else None

        m = cfg.model
        source = lm.model_source(m.name, m.gguf_package, m.gguf_file)
        hf_config = lm.load_config(source)
        hook = lm.resolve_hook(hf_config, layer=cfg.layer, site=m.site, hooks=dict(m.hooks), hook=m.hook)
        if m.hook is None:  # the standard sites all output hidden_size: the SAE's own checks can run now
            sae = build_sae(cfg, d_in=hf_config.hidden_size, device="meta")  # meta: no memory, no weights
            check_fits_in_memory(sae, OmegaConf.to_container(cfg.analysis))
        # (a raw hook's width is known once the model has run one context: _fit builds the SAE then)
    except BaseException:
        if cfg.resume is None:
            remove_unused_run_folder(output_dir)
        raise
    L.seed_everything(cfg.seed, verbose=False)

    lock = RunLock(output_dir)
    if not lock.acquire():
        if store:
            store.close()
        raise ConfigError(f"{output_dir} is in use by another training process (pid {lock.holder()}); "
                          "stop it first or wait for it")
    run_id = cfg.resume
    try:  # before the run is reopened: a run whose checkpoints are all damaged stays as it was, resumable
        resume_from = resume_checkpoint(output_dir, log.warning) if run_id is not None else None
    except CheckpointError:
        lock.release()
        if store:
            store.close()
        raise
    if store and run_id is not None:
        store = Journal(store, output_dir / PENDING_FILENAME, run_id)  # first sends what an earlier attempt kept
        store.reopen_run(run_id)
    elif store:
        sweep_id, overrides = sweep or sweep_of_job()
        run_id = store.start_run(model=m.name, hook=hook, layer=None if m.hook else cfg.layer,
                                 architecture=get_class(cfg.sae._target_).architecture, config=recorded_config(cfg),
                                 output_dir=str(output_dir), sweep_id=sweep_id, overrides=overrides)
        store = Journal(store, output_dir / PENDING_FILENAME, run_id)
    log.info(plan(cfg, hook, run_id, split))
    try:
        result = _fit(cfg, output_dir, store, run_id, hook, train_texts, heldout_texts, resume_from, prepared)
    except (KeyboardInterrupt, SystemExit) as stop:  # Lightning turns Ctrl-C into SystemExit(1)
        if store:
            how = f"continue with: python -m midisc.train resume={run_id}{storage_argument(cfg.storage.url)}"
            why = "stopped by SIGTERM" if isinstance(stop, SIGTERMException) else "interrupted by the user (Ctrl-C)"
            store.finish_run(run_id, "interrupted", error=f"{why}; {how}")
            saved = "its checkpoint is saved" if last_checkpoint(output_dir) else "it had no checkpoint yet"
            message = f"run {run_id} is marked interrupted and {saved}; {how}"
            print(message, file=sys.stderr)
            to_file_only(message)
        raise KeyboardInterrupt from None
    except BaseException as err:
        if store:
            error = str(err) if isinstance(err, user_errors()) else "".join(traceback.format_exception(err))
            store.finish_run(run_id, "failed", error=redact_text(error)[-8000:])
        raise
    else:
        result.seconds = time.time() - started
        result.texts, result.duplicates = len(train_texts), split.duplicates
        if store:
            store.finish_run(run_id, "completed", metrics=result.metrics)
    finally:
        lock.release()
        if store:
            if store.pending:
                message = (f"the database was unreachable: {store.pending} write(s) of run {run_id} wait in "
                           f"{store.path}; send them with: {sync_command(store)}")
                print(f"warning: {message}", file=sys.stderr)
                to_file_only(message, logging.WARNING)
            store.close()
    return result


def expected_rows(cfg: DictConfig, tokens: Tokens, train_ctx: torch.Tensor) -> int:
    """An upper bound on the training vectors (the kept positions, at most max_vectors); refused below one batch."""
    expected = int(keep_mask(train_ctx, tokens.special).sum())
    if cfg.max_vectors is not None:
        expected = min(expected, cfg.max_vectors)
    if expected < cfg.batch_size:
        raise ConfigError(f"the {len(train_ctx)} training contexts give at most {expected} activation vectors, "
                          f"fewer than one batch of batch_size={cfg.batch_size}; raise max_samples or lower batch_size")
    return expected


@dataclass
class Prepared:
    """What a job of several hooks made once for all of them, handed to one hook's run, which then trains as a run
    that found its activations cached: the tokens, the loaded model at this hook, the filled cache."""

    tokens: Tokens
    train_ctx: torch.Tensor
    heldout_ctx: torch.Tensor
    source: Source
    cache: ActivationCache          # complete; the job releases it
    heldout: list[ContextChunk]


def _fit(cfg: DictConfig, output_dir: Path, store: Store | None, run_id: int | None, hook: str,
         train_texts: list[str], heldout_texts: list[str], resume_from: Path | None,
         prepared: Prepared | None = None) -> Result:
    recipe = Recipe.of(OmegaConf.to_container(cfg, resolve=True), hook)
    if prepared is None:
        # The tokenizer first: the data can refuse the batch size before the weights take their time to load.
        tokens = recipe.tokens()
        train_ctx, heldout_ctx = tokens.pack(train_texts), tokens.pack(heldout_texts)
        expected = expected_rows(cfg, tokens, train_ctx)
        source = recipe.open(tokens)
    else:
        tokens, train_ctx, heldout_ctx, source = prepared.tokens, prepared.train_ctx, prepared.heldout_ctx, prepared.source
        expected = len(prepared.cache)
    sae = build_sae(cfg, d_in=source.width(heldout_ctx))  # before the harvest: a raw hook's checks run here
    if cfg.model.hook is not None:  # a standard site's SAE was checked on the meta device, before the weights
        check_fits_in_memory(sae, OmegaConf.to_container(cfg.analysis))
    need = cache_bytes(expected + heldout_ctx.numel(), source.model.config.hidden_size, recipe.dtype,
                       tokens=heldout_ctx.numel())
    with make_cache(cfg, recipe.producer(), need) if prepared is None else nullcontext(prepared.cache) as cache:
        if prepared is not None:
            heldout_chunks = prepared.heldout
        elif getattr(cache, "complete", False):
            log.info(f"reusing cached activations from {cache.folder} ({cache.describe()}); "
                     "the language model does not run")
            heldout_chunks = cache.load_heldout()
        else:
            # Held-out activations keep their contexts: the feature analysis shows them as examples.
            heldout_chunks = list(source.chunks(heldout_ctx, progress="held-out activations"))
            if isinstance(cache, SharedCache):
                cache.save_heldout(heldout_chunks)
        stream = ActivationStream(lambda: source.vectors(train_ctx), cache, batch_size=cfg.batch_size,
                                  buffer_size=cfg.activations.buffer_size, expected_rows=expected, seed=cfg.seed)
        return _train(cfg, output_dir, store, run_id, sae, source, stream, heldout_chunks, resume_from)


def _train(cfg: DictConfig, output_dir: Path, store: Store | None, run_id: int | None, sae: torch.nn.Module,
           source: Source, stream: ActivationStream, heldout_chunks: list[ContextChunk], ckpt: Path | None) -> Result:
    heldout = torch.cat([chunk.acts for chunk in heldout_chunks])
    if store:
        store.update_run(run_id, d_in=sae.d_in, d_sae=sae.d_sae)
    if cfg.resample_every and not hasattr(sae, "b_enc"):
        raise ConfigError(f"resample_every={cfg.resample_every} needs an SAE with an encoder bias b_enc (relu, topk, "
                          f"batchtopk, jumprelu); {type(sae).__name__} has none: set resample_every=0")
    module = SAEModule(sae, instantiate(cfg.optimizer), b_dec_init=cfg.b_dec_init, dead_window=cfg.dead_window,
                       normalize_input=cfg.normalize_input, resample_every=cfg.resample_every, **cfg.schedule)
    checkpointer = Checkpointer(output_dir / CHECKPOINT_DIR, cfg.checkpoint_every, rows=lambda: stream.n_rows)
    if ckpt:
        step, epoch = checkpoint_step(ckpt)
        trim_curves(output_dir / CURVES_FILENAME, step)
        log.info(f"resuming run {run_id} from step {step} (epoch {epoch + 1} of {cfg.epochs}) saved in {ckpt}")
    elif cfg.resume is not None:
        (output_dir / CURVES_FILENAME).unlink(missing_ok=True)
        log.info(f"run {run_id} saved no checkpoint before it stopped; training it again from the start")
    # In this order: a NaN loss stops the run before anything records it, and an epoch's row is written
    # before its checkpoint.
    callbacks: list[L.Callback] = [StopOnNonFiniteLoss(cfg.checkpoint_every),
                                   MetricsRecorder(store, run_id, output_dir / CURVES_FILENAME), checkpointer]
    bars = bool(cfg.trainer.enable_progress_bar) and sys.stderr.isatty()  # piped output and logs carry none
    if bars:
        callbacks.append(ProgressBar())
    trainer = instantiate(cfg.trainer, default_root_dir=str(output_dir), logger=make_loggers(cfg, output_dir) or False,
                          callbacks=callbacks, enable_progress_bar=bars)
    stream.position = trainer_position(trainer)
    trainer.fit(module, train_dataloaders=DataLoader(stream, batch_size=None),
                val_dataloaders=DataLoader(list(heldout.split(cfg.batch_size)), batch_size=None), ckpt_path=ckpt)
    if trainer.interrupted:
        raise KeyboardInterrupt
    module.fold_input_scale()  # from here on the SAE takes raw activations
    # fit's teardown leaves the module on the CPU: analysis and evaluation run where training ran.
    module.to(trainer.strategy.root_device)
    info = run_info(OmegaConf.to_container(cfg, resolve=True), source.recipe.hook, source.n_layers())
    end = RunEnd(sae=module.sae, heldout=heldout_chunks, source=source, store=store, run_id=run_id,
                 output_dir=output_dir, info=info,
                 is_dead=(module.tokens_since_fired >= module.dead_window).cpu().tolist(),
                 dead_frac=float(module.dead_frac()), n_tokens=checkpointer.epoch_rows)
    done = finish(end, OmegaConf.to_container(cfg.analysis), OmegaConf.to_container(cfg.evaluate),
                  OmegaConf.to_container(cfg.export), progress=bars)
    checkpointer.discard()
    if store:
        store.update_run(run_id, n_tokens=checkpointer.epoch_rows)
    return Result(run_id=run_id, output_dir=output_dir, sae_dir=done.written.saelens, metrics=done.metrics,
                  seconds=0.0, sae=module.sae, frequency_bins=frequency_bins(done.analysed.analysis.stats.frequency.tolist()),
                  dead_window=module.dead_window)


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
        if several_hooks(cfg):
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
