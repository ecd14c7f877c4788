"""One run, from its config to a recorded, trained and published SAE: check the config, record the run, harvest
(or find) the activations, fit the SAE with Lightning, then analyse, evaluate and publish it (training/finish.py).

`python -m midisc.train` calls `train` once, once per hook of a job of several hooks (with what the job
prepared for all of them), or, in a rank after the first of a distributed run, `_fit` alone. Like the
commands, this module sees the DictConfig; everything it calls takes plain values.
"""


from __future__ import annotations

import logging
import os
import re
import sys
import time
import traceback
from contextlib import nullcontext
from dataclasses import dataclass, replace
from datetime import timedelta
from pathlib import Path

import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader

from midisc.analysis.features import frequency_bins
from midisc.cli import user_errors
from midisc.config import (DISTRIBUTED_STRATEGIES, ConfigError, check_config, check_fits_in_memory, harvest_part,
                           sae_class, world_size)
from midisc.data import corpus, lm
from midisc.data.activations import ActivationCache, ActivationStream, ContextChunk, MemoryCache, keep_mask
from midisc.data.cache import SharedCache, cache_bytes
from midisc.data.prefill import prefill
from midisc.data.recipe import Recipe, Source, Tokens
from midisc.jobs import plan, recorded_config, sweep_of_job, sync_command
from midisc.publish.publication import run_info
from midisc.run_folder import CHECKPOINT_DIR, CURVES_FILENAME, PENDING_FILENAME
from midisc.store import Store, storage_argument
from midisc.store.journal import Journal
from midisc.store.redaction import redact_text
from midisc.training.callbacks import MetricsRecorder, ProgressBar
from midisc.training.checkpoints import (CheckpointError, Checkpointer, RunLock, checkpoint_step, last_checkpoint,
                                        resume_checkpoint, trainer_position, trim_curves)
from midisc.training.finish import RunEnd, finish
from midisc.training.module import SAEModule, StopOnNonFiniteLoss
from midisc.training.outcome import Result
from midisc.training.ranks import RUN_ID_ENV, RankFailed, is_secondary, lost_a_rank
from midisc.training.run_log import remove_unused_run_folder, to_file_only

log = logging.getLogger(__name__)


def load_corpus(cfg: DictConfig) -> corpus.Split:
    return corpus.train_heldout(OmegaConf.to_container(cfg.data, resolve=True), cfg.seed, cfg.max_samples)


def build_sae(cfg: DictConfig, d_in: int, device: str = "cpu", d_out: int | None = None) -> torch.nn.Module:
    """The configured SAE (d_out: a transcoder's output width). Its constructor is the one place its
    hyperparameters are checked (k within the width, l1_coef >= 0…): a refusal becomes a ConfigError naming the
    key, e.g. `sae.k=0 is too small`."""
    cls = sae_class(cfg)
    settings = OmegaConf.to_container(cfg.sae, resolve=True)
    settings.pop("kind", None)
    skip = settings.pop("skip", False)
    settings["_target_"] = f"{cls.__module__}.{cls.__qualname__}"
    if cls.is_transcoder:
        settings.update(d_out=d_out, skip=skip)
    try:
        with torch.device(device):
            return instantiate(settings, d_in=d_in, seed=cfg.seed)
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
        if harvest_part(cfg):
            raise ConfigError(f"activations.part={cfg.activations.part} is for python -m midisc.harvest; training reads "
                              "the whole harvest (merge the parts with python -m midisc.cache merge), so leave it null")
        split = load_corpus(cfg)
        train_texts, heldout_texts = split.train, split.heldout
        store = Store(cfg.storage.url) if cfg.storage.url else None

        m = cfg.model
        source = lm.model_source(m.name, m.gguf_package, m.gguf_file)
        hf_config = lm.load_config(source)
        hook = lm.resolve_hook(hf_config, layer=cfg.layer, site=m.site, hooks=dict(m.hooks), hook=m.hook)
        if m.hook is None:  # the standard sites all output hidden_size: the SAE's own checks can run now
            width = hf_config.hidden_size
            sae = build_sae(cfg, d_in=width, device="meta", d_out=width)  # meta: no memory, no weights
            check_fits_in_memory(sae, OmegaConf.to_container(cfg.analysis))
        # (a raw hook's width is known once the model has run one context: _fit builds the SAE then)
    except BaseException:
        if cfg.resume is None:
            remove_unused_run_folder(output_dir)
        raise
    L.seed_everything(cfg.seed, verbose=False)
    if sae_class(cfg).is_transcoder and m.hook is None and m.site != "mlp":
        log.warning(f"sae.kind=transcoder predicts the output of {hook} (site {m.site}) from its input; a transcoder "
                    "usually stands in for an MLP: model.site=mlp")

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
                                 architecture=sae_class(cfg).architecture, config=recorded_config(cfg),
                                 output_dir=str(output_dir), sweep_id=sweep_id, overrides=overrides)
        store = Journal(store, output_dir / PENDING_FILENAME, run_id)
    try:  # from here on the run is recorded: whatever stops it (Ctrl-C in the plan's line too) marks it
        log.info(plan(cfg, hook, run_id, split))
        if run_id is not None and world_size(cfg) > 1:
            os.environ[RUN_ID_ENV] = str(run_id)  # the ranks Lightning launches inherit it
        result = fit(cfg, output_dir, store, run_id, hook, train_texts, heldout_texts, resume_from, prepared)
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
        if store and world_size(cfg) > 1 and lost_a_rank(err):
            raise lost_rank(store, run_id, output_dir, err) from None
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


def lost_rank(store: Journal, run_id: int, output_dir: Path, err: BaseException) -> RankFailed:
    """Rank 0's error when a collective failed because another rank crashed: that rank has marked the run failed
    with its own error (kept), or stopped answering (rank 0 marks it). One line, naming the ranks' logs."""
    first = str(err).strip().splitlines()[0][:300] if str(err).strip() else type(err).__name__
    logs = ", ".join(sorted(p.name for p in Path(output_dir).glob("train_ddp_process_*.log"))) or "their logs"
    recorded = store.get_run(run_id)
    if recorded["status"] == "failed" and recorded.get("error"):
        said = recorded["error"].strip().splitlines()[-1][:300]
        return RankFailed(f"run {run_id} failed on another rank ({said}); see {logs} in {output_dir}")
    store.finish_run(run_id, "failed", error=redact_text(f"rank 0 lost another rank: {first}"))
    return RankFailed(f"run {run_id} failed: another rank stopped answering ({first}); see {logs} in {output_dir}")


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


def fit(cfg: DictConfig, output_dir: Path, store: Store | None, run_id: int | None, hook: str,
         train_texts: list[str], heldout_texts: list[str], resume_from: Path | None,
         prepared: Prepared | None = None) -> Result:
    recipe = Recipe.of(OmegaConf.to_container(cfg, resolve=True), hook)
    if is_secondary():  # rank 0 harvests (the cache is complete when this rank starts): the LM need not take GPUs
        recipe = replace(recipe, device_map=None)
    if prepared is None:
        # The tokenizer first: the data can refuse the batch size before the weights take their time to load.
        tokens = recipe.tokens()
        train_ctx, heldout_ctx = tokens.pack(train_texts), tokens.pack(heldout_texts)
        expected = expected_rows(cfg, tokens, train_ctx)
        source = recipe.open(tokens)
    else:
        tokens, train_ctx, heldout_ctx, source = prepared.tokens, prepared.train_ctx, prepared.heldout_ctx, prepared.source
        expected = len(prepared.cache)
    d_in, d_out = source.widths(heldout_ctx) if recipe.transcode else (source.width(heldout_ctx), None)
    sae = build_sae(cfg, d_in=d_in, d_out=d_out)  # before the harvest: a raw hook's checks run here
    if cfg.model.hook is not None:  # a standard site's SAE was checked on the meta device, before the weights
        check_fits_in_memory(sae, OmegaConf.to_container(cfg.analysis))
    width = sae.d_in + sae.d_out if recipe.transcode else sae.d_in  # a transcoder's vectors hold both
    need = cache_bytes(expected + heldout_ctx.numel(), width, recipe.dtype, tokens=heldout_ctx.numel())
    world = world_size(cfg)
    with (make_cache(cfg, recipe.producer(), need, several=world > 1) if prepared is None
          else nullcontext(prepared.cache)) as cache:
        if prepared is not None:
            heldout_chunks = prepared.heldout
        elif getattr(cache, "complete", False):
            log.info(f"reusing cached activations from {cache.folder} ({cache.describe()}); "
                     "the language model does not run")
            heldout_chunks = cache.load_heldout()
        elif world > 1:  # the ranks split one complete cache between them: harvest it whole first
            heldout_chunks = prefill([source], [cache], train_ctx, heldout_ctx, cfg.max_vectors)[0]
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
    if cfg.resample_every and sae.is_transcoder:
        raise ConfigError(f"resample_every={cfg.resample_every} restarts dead features on inputs an SAE reconstructs; "
                          "a transcoder's inputs and outputs differ: set resample_every=0 (AuxK revives them)")
    if cfg.resample_every and not hasattr(sae, "b_enc"):
        raise ConfigError(f"resample_every={cfg.resample_every} needs an SAE with an encoder bias b_enc (relu, topk, "
                          f"batchtopk, matryoshka, jumprelu); {type(sae).__name__} has none: set resample_every=0")
    module = SAEModule(sae, instantiate(cfg.optimizer), b_dec_init=cfg.b_dec_init, dead_window=cfg.dead_window,
                       normalize_input=cfg.normalize_input, resample_every=cfg.resample_every, **cfg.schedule,
                       auxk_window=cfg.get("auxk_window"))
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
                          callbacks=callbacks, enable_progress_bar=bars, strategy=strategy(cfg),
                          use_distributed_sampler=False)  # every rank validates on all held-out vectors
    stream.position = trainer_position(trainer)
    stream.shard = lambda: (trainer.global_rank, trainer.world_size)
    try:
        len(stream)  # a distributed run's blocks are counted now, not inside fit
    except ValueError as err:
        raise ConfigError(str(err)) from None
    trainer.fit(module, train_dataloaders=DataLoader(stream, batch_size=None),
                val_dataloaders=DataLoader(list(heldout.split(cfg.batch_size)), batch_size=None), ckpt_path=ckpt)
    if trainer.interrupted:
        raise KeyboardInterrupt
    if not trainer.is_global_zero:  # rank 0 analyses, evaluates and publishes the SAE all ranks trained
        return None
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


def strategy(cfg: DictConfig):
    """Lightning's strategy: `ddp` gets midisc's collective timeout, so a crashed rank fails the run rather
    than leaving the others waiting for Lightning's 30 minutes."""
    chosen = cfg.trainer.get("strategy", "auto")
    if chosen in DISTRIBUTED_STRATEGIES:
        return DDPStrategy(timeout=timedelta(seconds=cfg.ddp_timeout),
                           find_unused_parameters=chosen.endswith("_true"))
    return instantiate(chosen) if isinstance(chosen, DictConfig) else chosen
