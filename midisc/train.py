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

import hashlib
import logging
import os
import sys
import time
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path

import hydra
import lightning as L
import torch
from dotenv import load_dotenv
from lightning.pytorch.callbacks import TQDMProgressBar
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader

from midisc import corpus, lm
from midisc.activations import (ActivationStream, DiskCache, MemoryCache, cache_key, harvest, harvest_contexts,
                                keep_mask)
from midisc.callbacks import CURVES_FILENAME, Publisher, RunRecorder
from midisc.corpus import CorpusError
from midisc.export import run_info
from midisc.features import frequency_bins
from midisc.lm import ModelError
from midisc.module import SAEModule
from midisc.store import Store, StoreError, redact_url
from midisc.validate import ConfigError, check_config

USER_ERRORS = (ConfigError, ModelError, CorpusError, StoreError)


def short_dirname(name: str, limit: int = 120) -> str:
    """A sweep job's folder name: the overrides, or a readable prefix plus a hash when too long for a file name."""
    if len(name) <= limit:
        return name
    return f"{name[: limit - 17]}-{hashlib.sha1(name.encode()).hexdigest()[:16]}"


OmegaConf.register_new_resolver("midisc.dirname", short_dirname, replace=True)


@dataclass
class Result:
    run_id: int | None
    output_dir: Path
    sae_dir: Path
    metrics: dict[str, float]
    seconds: float
    sae: torch.nn.Module
    frequency_bins: dict[str, int]  # features per firing-frequency bin, over the held-out tokens


def recorded_config(cfg: DictConfig) -> dict:
    """The resolved config as plain data, database password hidden."""
    data = OmegaConf.to_container(cfg, resolve=True)
    if data.get("storage", {}).get("url"):
        data["storage"]["url"] = redact_url(data["storage"]["url"])
    return data


def load_corpus(cfg: DictConfig) -> tuple[list[str], list[str]]:
    return corpus.train_heldout(OmegaConf.to_container(cfg.data, resolve=True), cfg.seed, cfg.max_samples)


def build_sae(cfg: DictConfig, d_in: int, device: str = "cpu") -> torch.nn.Module:
    """The configured SAE; its constructor's checks (k within the width, l1_coef >= 0…) become ConfigErrors."""
    try:
        with torch.device(device):
            return instantiate(cfg.sae, d_in=d_in, seed=cfg.seed)
    except InstantiationException as err:  # Hydra wraps the constructor's ValueError
        cause = err.__cause__ if isinstance(err.__cause__, ValueError) else None
        if cause is None:
            raise
        raise ConfigError(f"sae: {cause}") from None


def make_cache(cfg: DictConfig, producer: dict) -> MemoryCache | DiskCache:
    if cfg.activations.cache == "memory":
        return MemoryCache()
    folder = Path(cfg.activations.cache_dir) / cache_key(**producer)
    return DiskCache(folder, dtype=cfg.activations.dtype)


def make_loggers(cfg: DictConfig, output_dir: Path) -> list:
    if "wandb" in cfg.logger and not os.environ.get("WANDB_API_KEY"):
        os.environ.setdefault("WANDB_MODE", "offline")  # files in the run folder; `wandb sync` uploads later
    return [instantiate(conf, save_dir=str(output_dir)) for conf in cfg.logger.values()]


def train(cfg: DictConfig, output_dir: Path) -> Result:
    started = time.time()
    check_config(cfg)
    train_texts, heldout_texts = load_corpus(cfg)
    store = Store(cfg.storage.url) if cfg.storage.url else None

    m = cfg.model
    source = lm.model_source(m.name, m.gguf_package, m.gguf_file)
    hf_config = lm.load_config(source)
    hook = lm.resolve_hook(hf_config, layer=cfg.layer, site=m.site, hooks=dict(m.hooks), hook=m.hook)
    if m.hook is None:  # the standard sites all output hidden_size: the SAE's own checks can run now
        build_sae(cfg, d_in=hf_config.hidden_size, device="meta")  # meta: no memory, no weights
    L.seed_everything(cfg.seed, verbose=False)

    run_id = None
    if store:
        run_id = store.start_run(model=m.name, hook=hook, layer=None if m.hook else cfg.layer,
                                 architecture=get_class(cfg.sae._target_).architecture, config=recorded_config(cfg),
                                 output_dir=str(output_dir))
    try:
        result = _fit(cfg, output_dir, store, run_id, hook, train_texts, heldout_texts)
    except (KeyboardInterrupt, SystemExit):  # Lightning turns Ctrl-C into SystemExit(1)
        if store:
            store.finish_run(run_id, "interrupted", error="interrupted by the user (Ctrl-C)")
        raise
    except BaseException as err:
        if store:
            error = str(err) if isinstance(err, USER_ERRORS) else "".join(traceback.format_exception(err))
            store.finish_run(run_id, "failed", error=error[-8000:])
        raise
    else:
        result.seconds = time.time() - started
        if store:
            store.finish_run(run_id, "completed", metrics=result.metrics)
    finally:
        if store:
            store.close()
    return result


def _fit(cfg: DictConfig, output_dir: Path, store: Store | None, run_id: int | None, hook: str,
         train_texts: list[str], heldout_texts: list[str]) -> Result:
    m, acts = cfg.model, cfg.activations
    loaded = lm.load_model(m.name, gguf_package=m.gguf_package, gguf_file=m.gguf_file, dtype=m.dtype,
                           device_map=m.device_map)
    module = dict(loaded.model.named_modules())[hook]
    separator, special = lm.special_token_ids(loaded.tokenizer, m.separator)
    bos = loaded.tokenizer.bos_token_id if m.prepend_bos else None
    train_ctx = corpus.pack(train_texts, loaded.tokenizer, cfg.context_size, separator, bos)
    heldout_ctx = corpus.pack(heldout_texts, loaded.tokenizer, cfg.context_size, separator, bos)

    options = dict(special_ids=special, batch_contexts=acts.lm_batch_size, outlier_factor=acts.outlier_factor,
                   store_dtype=acts.dtype)

    def harvest_from(contexts, progress=None):
        return harvest(loaded.model, module, contexts, progress=progress, **options)

    # Held-out activations keep their contexts: the feature analysis shows them as examples.
    heldout_chunks = list(harvest_contexts(loaded.model, module, heldout_ctx, progress="held-out activations",
                                           **options))
    heldout = torch.cat([chunk.acts for chunk in heldout_chunks])
    expected = int(keep_mask(train_ctx, special).sum())
    if expected < cfg.batch_size:
        raise ConfigError(f"the {len(train_ctx)} training contexts give at most {expected} activation vectors, "
                          f"fewer than one batch of batch_size={cfg.batch_size}; raise max_samples or lower batch_size")
    sae = build_sae(cfg, d_in=heldout.shape[1])
    if store:
        store.update_run(run_id, d_in=sae.d_in, d_sae=sae.d_sae)

    producer = dict(model=m.name, gguf=m.gguf_file, hook=hook, data=OmegaConf.to_container(cfg.data),
                    max_samples=cfg.max_samples, seed=cfg.seed, context_size=cfg.context_size, separator=m.separator,
                    bos=m.prepend_bos, outlier_factor=acts.outlier_factor, dtype=acts.dtype, model_dtype=m.dtype)
    stream = ActivationStream(lambda: harvest_from(train_ctx), make_cache(cfg, producer),
                              batch_size=cfg.batch_size, buffer_size=acts.buffer_size, expected_rows=expected,
                              seed=cfg.seed)
    heldout_batches = list(heldout.split(cfg.batch_size))
    recorder = RunRecorder(store, run_id, output_dir / CURVES_FILENAME, heldout_chunks, lm.token_texts(loaded.tokenizer),
                           analysis=OmegaConf.to_container(cfg.analysis), count_tokens=lambda: stream.n_rows)
    info = run_info(OmegaConf.to_container(cfg, resolve=True), hook, lm.num_layers(loaded.model.config))
    publisher = Publisher(store, recorder, output_dir, info, lambda: lm.unembedding(loaded.model),
                          OmegaConf.to_container(cfg.export))
    module_ = SAEModule(sae, instantiate(cfg.optimizer), b_dec_init=cfg.b_dec_init, dead_window=cfg.dead_window)
    callbacks: list[L.Callback] = [recorder, publisher]  # in this order: the publisher reads the recorder's results
    if cfg.trainer.enable_progress_bar:
        callbacks.append(TQDMProgressBar())  # Rich's bar draws nothing when output is not a terminal (CI, logs)
    trainer = instantiate(cfg.trainer, default_root_dir=str(output_dir), logger=make_loggers(cfg, output_dir) or False,
                          callbacks=callbacks)
    trainer.fit(module_, train_dataloaders=DataLoader(stream, batch_size=None),
                val_dataloaders=DataLoader(heldout_batches, batch_size=None))
    if trainer.interrupted:
        raise KeyboardInterrupt
    final = recorder.metrics
    if store:
        store.update_run(run_id, n_tokens=stream.n_rows)
    bins = frequency_bins(recorder.analysis.stats.frequency.tolist())
    return Result(run_id=run_id, output_dir=output_dir, sae_dir=publisher.written.saelens, metrics=final, seconds=0.0, sae=module_.sae,
                  frequency_bins=bins)


def summary(result: Result, db_url: str | None) -> str:
    m = result.metrics
    minutes, seconds = divmod(int(result.seconds), 60)
    head = f"run {result.run_id} completed" if result.run_id is not None else "run completed (storage=none)"
    lines = [f"{head} in {minutes}m{seconds:02d}s",
             f"  run folder: {result.output_dir}",
             f"  SAE:        {result.sae_dir}",
             f"  database:   {redact_url(db_url) if db_url else 'none'}",
             f"  held-out:   MSE {m['mse']:.4g}  FVU {m['fvu']:.3f}  L0 {m['l0']:.1f}  "
             f"dead {100 * m['dead_frac']:.1f}% ({int(m['alive_features'])} features alive)",
             f"  trained on: {int(m['n_tokens']):,} activation vectors per epoch",
             "  features by firing frequency (held-out): "
             + "  ".join(f"{name} {count}" for name, count in result.frequency_bins.items())]
    if result.run_id is not None:
        lines.append(f"  explore:    python -m midisc.explore top {result.run_id}")
    return "\n".join(lines)


def quiet_lightning() -> None:
    """Keep the console to the progress bar and our summary: Lightning's banners and tips say nothing here."""
    logging.getLogger("lightning.pytorch.utilities.rank_zero").setLevel(logging.WARNING)
    # The stream's length is exact up to dropped norm outliers, and it runs in the main process.
    warnings.filterwarnings("ignore", message=".*IterableDataset.*has `__len__` defined.*")
    warnings.filterwarnings("ignore", message=".*treespec.*LeafSpec.*")
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> None:
    quiet_lightning()
    output_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        result = train(cfg, output_dir)
    except USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted: the run is marked interrupted in the database", file=sys.stderr)
        sys.exit(130)
    print(summary(result, cfg.storage.url))


if __name__ == "__main__":
    load_dotenv(Path.cwd() / ".env")  # POSTGRES_* and MIDISC_DB_URL may live in a .env file
    main()
