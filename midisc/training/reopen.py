"""Reopen a recorded run: its SAE, its language model and hook, its texts, harvested as it was trained.

The tools that come after training (analysis on demand, concept tests, feature details) start from a
run id in the database; the run's recorded config says how its activations were made, and this module
makes them again the same way: same model, hook, separator, token filter and held-out documents.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from midisc.data import corpus, lm
from midisc.data.activations import ContextChunk, harvest_contexts
from midisc.analysis.profiles import output_effects, token_lists
from midisc.sae import SparseAutoencoder, load_sae
from midisc.store import Store


class RunError(RuntimeError):
    """A run that cannot be reopened (no SAE saved, folder moved…); the message is one line."""


@dataclass
class OpenedRun:
    id: int
    row: dict[str, Any]     # the training_runs row
    config: dict[str, Any]  # the resolved config it was trained with
    sae: SparseAutoencoder
    sae_dir: Path


@dataclass
class RunModel:
    loaded: lm.LoadedModel
    module: torch.nn.Module  # the hooked module
    separator: int
    special: list[int]       # token ids never analysed
    bos: int | None          # prepended to each context when the model expects it


def open_run(store: Store, run_id: int, device: str = "cpu") -> OpenedRun:
    row = store.get_run(run_id)
    saved = store.sae_models(run_id)
    if not saved:
        raise RunError(f"run {run_id} has no saved SAE (status {row['status']}); only completed runs can be analysed")
    folder = Path(saved[-1]["path"])
    if not folder.is_dir():
        raise RunError(f"run {run_id}'s SAE folder {folder} does not exist (moved or deleted?)")
    try:
        sae = load_sae(folder, device=device)
    except (ValueError, FileNotFoundError) as error:  # a damaged, cut-short or edited SAE folder
        raise RunError(f"run {run_id}'s SAE does not load: {error}") from None
    return OpenedRun(id=run_id, row=row, config=row["config"], sae=sae, sae_dir=folder)


def open_model(run: OpenedRun) -> RunModel:
    m = run.config["model"]
    loaded = lm.load_model(m["name"], gguf_package=m.get("gguf_package"), gguf_file=m.get("gguf_file"),
                           dtype=m.get("dtype", "float32"), device_map=m.get("device_map"))
    modules = dict(loaded.model.named_modules())
    if run.row["hook"] not in modules:
        raise RunError(f"run {run.id}'s hook {run.row['hook']!r} is not a module of {m['name']}")
    separator, special = lm.special_token_ids(loaded.tokenizer, m.get("separator"))
    bos = loaded.tokenizer.bos_token_id if m.get("prepend_bos") else None
    return RunModel(loaded=loaded, module=modules[run.row["hook"]], separator=separator, special=special, bos=bos)


def run_texts(run: OpenedRun) -> tuple[list[str], list[str]]:
    """(training texts, held-out texts) exactly as the run split them."""
    cfg = run.config
    return corpus.train_heldout(cfg["data"], seed=cfg["seed"], max_samples=cfg["max_samples"])


def contexts(run: OpenedRun, model: RunModel, texts: list[str]) -> torch.Tensor:
    return corpus.pack(texts, model.loaded.tokenizer, run.config["context_size"], model.separator, model.bos,
                       run.config.get("max_doc_tokens"))  # runs recorded before the cap had none


def harvest_run(run: OpenedRun, model: RunModel, contexts_: torch.Tensor,
                progress: str | None = None) -> Iterator[ContextChunk]:
    acts = run.config["activations"]
    return harvest_contexts(model.loaded.model, model.module, contexts_, special_ids=model.special,
                            batch_contexts=acts["lm_batch_size"], outlier_factor=acts["outlier_factor"],
                            progress=progress)


def logit_effects(store: Store, run_id: int, feature: int, n: int = 10) -> dict[str, list] | str:
    """The output tokens a feature's decoder direction boosts and suppresses most, as the dashboards show them.

    Loads the run's model; when that cannot be done the reason comes back as a string to show instead.
    """
    try:
        run = open_run(store, run_id)
        loaded = open_model(run).loaded
    except (RunError, lm.ModelError) as err:
        return f"not shown: {err}"
    try:
        effects = output_effects(run.sae.W_dec[feature:feature + 1].detach(), lm.unembedding(loaded.model), n=n)
    except ValueError as err:
        return f"not shown: {err}"
    decode = lm.token_texts(loaded.tokenizer)
    return {"boosted": list(zip(token_lists(effects.top_ids, decode)[0], effects.top_values[0].tolist())),
            "suppressed": list(zip(token_lists(effects.bottom_ids, decode)[0], effects.bottom_values[0].tolist()))}
