"""Reopen a recorded run: its row, its config and its SAE, and the recipe of its activations.

The tools that come after training (analysis on demand, evaluation, export, concept tests, feature
details) start from a run id in the database. The run's recorded config says how its activations were
made; `OpenedRun.recipe` is the same `data.recipe.Recipe` training built from it, so a tool harvests
exactly as the run did: same model, hook, separator, token filter, storage dtype and held-out documents.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any


from midisc.data import lm
from midisc.data.recipe import Recipe
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

    @property
    def recipe(self) -> Recipe:
        """How the run made its activations (see `data/recipe.py`)."""
        return Recipe.of(self.config, self.row["hook"])


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


def logit_effects(store: Store, run_id: int, feature: int, n: int = 10) -> dict[str, list] | str:
    """The output tokens a feature's decoder direction boosts and suppresses most, as the dashboards show them.

    Loads the run's model; when that cannot be done the reason comes back as a string to show instead.
    """
    try:
        run = open_run(store, run_id)
        loaded = run.recipe.open().loaded
    except (RunError, lm.ModelError) as err:
        return f"not shown: {err}"
    try:
        effects = output_effects(run.sae.W_dec[feature:feature + 1].detach(), lm.unembedding(loaded.model), n=n)
    except ValueError as err:
        return f"not shown: {err}"
    decode = lm.token_texts(loaded.tokenizer)
    return {"boosted": list(zip(token_lists(effects.top_ids, decode)[0], effects.top_values[0].tolist())),
            "suppressed": list(zip(token_lists(effects.bottom_ids, decode)[0], effects.bottom_values[0].tolist()))}
