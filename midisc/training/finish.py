"""The end of a run as plain functions, in order: analyse every feature, evaluate the SAE, publish it.

`train.py` calls `finish` once `fit` has returned. The `analyze`, `evaluate` and `export` commands call the
step they redo (`analyze_features`, `evaluate`, `publish`, each with its `record_*`), so a step runs the same way
from training and from the command line. Each step takes plain values and returns what it made; the
`record_*` functions write it to the store (or do nothing with storage=none).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from midisc.analysis.features import FeatureAnalysis, analyze, example_rows
from midisc.analysis.metrics import reconstruction_metrics
from midisc.analysis.profiles import profile_rows
from midisc.analysis.saebench import EVAL_TYPE, core_report, headline, reconstruction
from midisc.analysis.splice import splice_totals
from midisc.data.activations import ContextChunk
from midisc.data.recipe import Source
from midisc.publish.publication import FeatureTable, Publication, add_profiles, run_info, write_probe
from midisc.publish.write import Written, sha256, write_all
from midisc.run_folder import EVALUATION_FILENAME, PROBE_FILENAME, SAE_FOLDER, WEIGHTS_FILENAME
from midisc.sae import SparseAutoencoder
from midisc.store import Store
from midisc.training.reopen import OpenedRun, RunError

SPLICE_BATCH = 8  # contexts per spliced forward: three vocab-wide logit tensors of this many are held at once


# --- analyze_features: statistics and examples of every feature ---------------------------------------
@dataclass
class Analysed:
    analysis: FeatureAnalysis
    examples: list[dict[str, Any]]  # feature_examples rows
    is_dead: list[bool]             # dead in training's last window, or (no training at hand) never fired here

    def table(self) -> FeatureTable:
        stats = self.analysis.stats
        return FeatureTable.of(stats.frequency.tolist(), stats.mean_activation.tolist(),
                               stats.max_activation.tolist(), self.is_dead, stats.n_tokens)


def analyze_features(sae: SparseAutoencoder, chunks: Iterable[ContextChunk], decode: Callable[[Sequence[int]], list[str]],
            options: dict[str, Any], is_dead: Sequence[bool] | None = None) -> Analysed:
    """What each feature fires on over `chunks` (see `analysis/features.py`); `options`: the `analysis:` group."""
    analysis = analyze(sae, chunks, **options)
    dead = list(is_dead) if is_dead is not None else (analysis.stats.frequency == 0).tolist()
    return Analysed(analysis, example_rows(analysis, decode), [bool(d) for d in dead])


def record_analysis(store: Store | None, run_id: int | None, analysed: Analysed) -> int:
    """One statistics row and its example rows per feature, replacing the run's earlier ones, and the tokens they
    were measured on in the run's metrics (which the exports publish). Returns examples."""
    if store is None:
        return 0
    stats = analysed.analysis.stats
    store.add_features(run_id, stats.frequency.tolist(), stats.mean_activation.tolist(),
                       stats.max_activation.tolist(), analysed.is_dead)
    written = store.add_feature_examples(run_id, analysed.examples)
    store.update_metrics(run_id, {"analysed_tokens": float(stats.n_tokens)})
    return written


# --- evaluate: SAEBench's core evaluation -----------------------------------------------------------
def evaluation_config(hook: str, model: str, layer: int | None, context_size: int,
                      run_id: int | None) -> dict[str, Any]:
    """The `eval_config` part of a core report: what was evaluated, on what."""
    return {"model_name": model, "hook_name": hook, "layer": layer, "context_size": context_size,
            "dataset": "held-out texts of the run", "exclude_special_tokens_from_reconstruction": True,
            "run_id": run_id}


def evaluate(sae: SparseAutoencoder, source: Source, heldout: Sequence[ContextChunk], n_contexts: int,
             config: dict[str, Any], progress: bool = True) -> dict:
    """Reconstruction and sparsity over every held-out vector; CE loss recovered and KL over the first
    `n_contexts` held-out contexts run through the model with the SAE spliced in (three forwards each)."""
    contexts = torch.cat([chunk.tokens for chunk in heldout])[:n_contexts]
    totals = splice_totals(source.model, source.module, sae, contexts.split(SPLICE_BATCH),
                           special_ids=source.tokens.special, outlier_factor=source.recipe.outlier_factor,
                           progress="spliced forwards" if progress else None)
    recon = reconstruction(sae, [chunk.acts for chunk in heldout])
    return core_report(recon, totals.scores(), totals.tokens, {**config, "n_contexts_spliced": len(contexts)})


def record_evaluation(store: Store | None, run_id: int | None, folder: Path, report: dict) -> None:
    """The report in the run folder (evaluation_core.json) and in the store, replacing earlier ones."""
    if Path(folder).is_dir():
        (Path(folder) / EVALUATION_FILENAME).write_text(json.dumps(report, indent=2, allow_nan=False))
    if store is not None:
        tokens = report["eval_result_metrics"]["token_stats"]["total_tokens_eval_reconstruction"]
        store.add_evaluation(run_id, EVAL_TYPE, tokens, report)
        scores = headline(report)  # the run's headline spliced-in scores are the latest evaluation's
        store.update_metrics(run_id, {k: scores[k] for k in ("ce_loss_score", "kl_div_score") if scores[k] is not None})


# --- publish: the SAELens folder, the Neuronpedia package, the dashboards -------------------------------
def publish(pub: Publication, out: Path, acts: Sequence[torch.Tensor], source: Source | None, *,
            neuronpedia: bool, features_per_batch: int, output_tokens: int, weights: bool = True) -> Written:
    """Write `pub` under `out`. The dashboards need the language model (`source`): activation histograms
    over `acts` and the output tokens of each decoder direction; without it they are skipped."""
    if neuronpedia and source is not None:
        add_profiles(pub, acts, source.unembedding(), source.tokens.decode(), n_tokens=output_tokens)
    return write_all(pub, out, neuronpedia=neuronpedia, weights=weights, features_per_batch=features_per_batch)


def record_profiles(store: Store | None, run_id: int | None, pub: Publication) -> int:
    """Each feature's dashboard profile (density, output tokens, similar features) in the store, for the feature
    browser, replacing earlier ones; nothing when publishing measured none (no model at hand). Returns rows."""
    if store is None or pub.activation_histograms is None:
        return 0
    return store.add_feature_profiles(run_id, profile_rows(pub.sae.d_sae, pub.activation_histograms, pub.outputs,
                                                           pub.output_tokens, pub.similar))


EXPORT_DEFAULTS = {"neuronpedia": True, "set_name": None, "features_per_batch": 128, "output_tokens": 10}


def republish(store: Store, run: OpenedRun, source: Source | None, heldout: list[torch.Tensor] | None = None,
              out: Path | None = None, *,
              set_name: str | None = None, features_per_batch: int | None = None, neuronpedia: bool = True,
              db: str = "") -> Written:
    """Publish a recorded run again from its rows (statistics, examples, the analysed tokens in its metrics), into
    its own folder unless `out` says otherwise: after a re-analysis, a new set name, or for an older run.
    The dashboards' activation histograms are measured over the held-out texts when `source` is given: over
    `heldout`, their activations, when the caller has them, else harvested again.
    `db` ends the command a refusal suggests (the ` --db …` of the run's database)."""
    export = {**EXPORT_DEFAULTS, **(run.config.get("export") or {})}
    rows = store.features(run.id)
    if len(rows) != run.sae.d_sae:
        raise RunError(f"run {run.id} has {len(rows)} feature rows for {run.sae.d_sae} features; "
                       f"analyse it first: python -m midisc.analyze {run.id}{db}")
    metrics = store.get_run(run.id).get("metrics") or {}  # read now: an analysis may just have changed it
    table = FeatureTable.of([r["frequency"] for r in rows], [r["mean_activation"] for r in rows],
                            [r["max_activation"] for r in rows], [r["is_dead"] for r in rows],
                            int(metrics.get("analysed_tokens") or 0))
    pub = Publication(sae=run.sae, run_id=run.id, metrics=metrics, features=table,
                      examples=store.feature_examples(run.id), set_name=set_name or export["set_name"],
                      **run_info(run.config, run.row["hook"], source.n_layers() if source else 0))
    acts = heldout or []
    if source is not None and heldout is None:
        acts = [chunk.acts for chunk in source.chunks(source.heldout_contexts(), progress="activation histograms")]
    out = Path(out or run.row["output_dir"])
    # Into the run's own folder the recorded weights stay untouched (their checksum is on record).
    same = (out / SAE_FOLDER).resolve() == run.sae_dir.resolve()
    written = publish(pub, out, acts, source, neuronpedia=neuronpedia,
                      features_per_batch=features_per_batch or export["features_per_batch"],
                      output_tokens=export["output_tokens"], weights=not same)
    record_profiles(store, run.id, pub)
    return written


def record_sae(store: Store | None, run_id: int | None, sae: SparseAutoencoder, written: Written) -> None:
    """The saved SAE on record: path, shapes, checksum. BatchTopK is saved as JumpReLU, as SAELens saves it."""
    if store is not None:
        store.add_sae_model(run_id, path=str(written.saelens), d_in=sae.d_in, d_sae=sae.d_sae,
                            architecture=getattr(sae, "saved_architecture", sae.architecture),
                            checksum=sha256(written.saelens / WEIGHTS_FILENAME))


# --- the whole end of a run -----------------------------------------------------------------------
@dataclass
class RunEnd:
    """A run whose training has just ended, as the steps after it see it."""

    sae: SparseAutoencoder          # on raw activations: the input scale folded in
    heldout: list[ContextChunk]     # held-out activations with their contexts
    source: Source                  # the language model and hook they came from
    store: Store | None
    run_id: int | None
    output_dir: Path
    info: dict[str, Any]            # the Publication fields known from the config (`run_info`)
    is_dead: list[bool]             # no firing in training's last dead window
    dead_frac: float
    n_tokens: int                   # training vectors per epoch


@dataclass
class Finished:
    analysed: Analysed
    metrics: dict[str, float]       # the run's final held-out metrics, as stored with it
    evaluation: dict | None         # the core report, when evaluation ran
    written: Written


def finish(run: RunEnd, analysis: dict, evaluation: dict, export: dict, progress: bool = True) -> Finished:
    """Analyse, evaluate, publish and record `run`; the config groups `analysis:`, `evaluate:`, `export:`."""
    chunks = tqdm(run.heldout, desc="feature analysis", unit="batch", leave=False, disable=None if progress else True)
    analysed = analyze_features(run.sae, chunks, run.source.tokens.decode(), analysis, run.is_dead)
    record_analysis(run.store, run.run_id, analysed)
    metrics = {**reconstruction_metrics(run.sae, (chunk.acts for chunk in run.heldout)),
               "dead_frac": float(run.dead_frac), "n_tokens": float(run.n_tokens),
               "alive_features": float(len(run.is_dead) - sum(run.is_dead)),
               "analysed_tokens": float(analysed.analysis.stats.n_tokens)}
    report = None
    if evaluation["contexts"]:
        config = evaluation_config(run.info["hook"], run.info["model"], run.info["layer"],
                                   run.info["metadata"]["context_size"], run.run_id)
        report = evaluate(run.sae, run.source, run.heldout, evaluation["contexts"], config, progress)
        record_evaluation(run.store, run.run_id, run.output_dir, report)
        scores = headline(report)
        metrics.update({k: scores[k] for k in ("ce_loss_score", "kl_div_score") if scores[k] is not None})
    acts = [chunk.acts for chunk in run.heldout]
    # verify reloads the published SAE and must reproduce its outputs on these few held-out vectors
    write_probe(run.sae, torch.cat(acts[:4]), run.output_dir / PROBE_FILENAME)
    pub = Publication(sae=run.sae, run_id=run.run_id, metrics=metrics, features=analysed.table(),
                      examples=analysed.examples, set_name=export["set_name"], **run.info)
    written = publish(pub, run.output_dir, acts, run.source, neuronpedia=export["neuronpedia"],
                      features_per_batch=export["features_per_batch"], output_tokens=export["output_tokens"])
    record_sae(run.store, run.run_id, run.sae, written)
    record_profiles(run.store, run.run_id, pub)
    return Finished(analysed, metrics, report, written)
