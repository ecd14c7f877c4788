"""Lightning callbacks that record a run (metrics as they come, the feature analysis at the end) and publish it."""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import TQDMProgressBar
from tqdm.auto import tqdm

from midisc.data.activations import ContextChunk
from midisc.analysis.saebench import EVAL_TYPE, core_report, headline, reconstruction
from midisc.publish.publication import FeatureTable, Publication, add_profiles, write_probe
from midisc.publish.write import Written, sha256, write_all
from midisc.analysis.features import FeatureAnalysis, analyze, example_rows
from midisc.analysis.metrics import evaluate
from midisc.analysis.splice import splice_totals
from midisc.store import Store
from midisc.run_folder import EVALUATION_FILENAME, PROBE_FILENAME, WEIGHTS_FILENAME


CURVE_METRICS = ("train/loss", "train/mse", "train/fvu", "train/l0", "train/l1", "sparsity/dead_frac", "train/lr")


def record_analysis(store: Store | None, run_id: int | None, analysis: FeatureAnalysis, examples: list[dict],
                    is_dead: Sequence[bool]) -> int:
    """Write a feature analysis: one statistics row and its example rows per feature. Returns examples written."""
    if store is None:
        return 0
    stats = analysis.stats
    store.add_features(run_id, stats.frequency.tolist(), stats.mean_activation.tolist(),
                       stats.max_activation.tolist(), list(is_dead))
    return store.add_feature_examples(run_id, examples)


class RunRecorder(L.Callback):
    """Writes epoch metrics (and a per-step curve file) as training goes; at the end analyses every feature.

    The analysis runs over the held-out contexts (statistics and examples per feature, see
    `features.py`) and goes to the store with the final held-out metrics. Works without a store too
    (storage=none): the `Publisher` after it still writes every file.
    """

    def __init__(self, store: Store | None, run_id: int | None, curves: Path, heldout: list[ContextChunk],
                 decode: Callable[[Sequence[int]], list[str]], analysis: dict, count_tokens: Callable[[], int]) -> None:
        self.store = store
        self.run_id = run_id
        self.curves = Path(curves)
        self.heldout = heldout
        self.decode = decode
        self.options = analysis
        self.count_tokens = count_tokens
        self.analysis: FeatureAnalysis | None = None
        self.examples: list[dict] = []
        self.is_dead: list[bool] = []
        self.metrics: dict[str, float] = {}

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.curves.parent.mkdir(parents=True, exist_ok=True)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        if trainer.global_step % trainer.log_every_n_steps and not trainer.is_last_batch:
            return
        logged = trainer.callback_metrics
        # A metric logged per step and per epoch is here as name_step; one logged per step only (the lr) bare.
        values = {name.removesuffix("_step"): float(value) for name, value in logged.items()
                  if name.removesuffix("_step") in CURVE_METRICS
                  and (name.endswith("_step") or name + "_step" not in logged)}
        write_header = not self.curves.exists()
        with open(self.curves, "a", newline="") as f:  # appended as it goes: a crashed run keeps its curve
            writer = csv.DictWriter(f, fieldnames=["step", "epoch", *CURVE_METRICS], restval="")
            if write_header:
                writer.writeheader()
            writer.writerow({"step": trainer.global_step, "epoch": trainer.current_epoch,
                             **{k: v for k, v in values.items() if math.isfinite(v)}})

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.store is None:
            return
        # Epoch aggregates (train/*_epoch) and the held-out validation (val/*) of this epoch.
        values = {name.removesuffix("_epoch"): float(value) for name, value in trainer.callback_metrics.items()
                  if not name.endswith("_step")}
        # Only group/name metrics: the progress bar's short aliases are not records.
        values = {k: v for k, v in values.items() if "/" in k and math.isfinite(v)}
        self.store.add_epoch_metrics(self.run_id, trainer.current_epoch, trainer.global_step, values)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        sae = pl_module.sae
        progress = tqdm(self.heldout, desc="feature analysis", unit="batch", leave=False,
                        disable=not trainer.progress_bar_callback)
        self.analysis = analyze(sae, progress, **self.options)
        self.is_dead = (pl_module.tokens_since_fired >= pl_module.dead_window).cpu().tolist()
        self.examples = example_rows(self.analysis, self.decode)
        record_analysis(self.store, self.run_id, self.analysis, self.examples, self.is_dead)
        self.metrics = {**evaluate(sae, (chunk.acts for chunk in self.heldout)),
                        "dead_frac": float(pl_module.dead_frac()), "n_tokens": float(self.count_tokens()),
                        "alive_features": float(len(self.is_dead) - sum(self.is_dead)),
                        "analysed_tokens": float(self.analysis.stats.n_tokens)}


class Evaluator(L.Callback):
    """After the recorder: SAEBench's core evaluation over the held-out vectors, with the first `n_contexts`
    held-out contexts run through the model with the SAE spliced in. Stored, written to the run folder, and
    its headline (CE loss recovered, KL score) added to the run's final metrics."""

    def __init__(self, store: Store | None, recorder: RunRecorder, output_dir: Path, model: torch.nn.Module,
                 module: torch.nn.Module, special_ids: Sequence[int], outlier_factor: float | None,
                 n_contexts: int, config: dict) -> None:
        self.store, self.recorder, self.output_dir = store, recorder, Path(output_dir)
        self.model, self.module, self.special_ids, self.outlier_factor = model, module, special_ids, outlier_factor
        self.n_contexts = n_contexts
        self.config = config
        self.report: dict | None = None

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.n_contexts == 0:
            return
        sae = pl_module.sae
        contexts = torch.cat([chunk.tokens for chunk in self.recorder.heldout])[: self.n_contexts]
        totals = splice_totals(self.model, self.module, sae, contexts.split(8), special_ids=self.special_ids,
                               outlier_factor=self.outlier_factor,
                               progress="spliced forwards" if trainer.progress_bar_callback else None)
        recon = reconstruction(sae, [chunk.acts for chunk in self.recorder.heldout])
        self.report = core_report(recon, totals.scores(), totals.tokens,
                                  {**self.config, "n_contexts_spliced": len(contexts)})
        (self.output_dir / EVALUATION_FILENAME).write_text(json.dumps(self.report, indent=2, allow_nan=False))
        if self.store is not None:
            self.store.add_evaluation(self.recorder.run_id, EVAL_TYPE, totals.tokens, self.report)
        scores = headline(self.report)
        self.recorder.metrics.update({k: scores[k] for k in ("ce_loss_score", "kl_div_score") if scores[k] is not None})


class Publisher(L.Callback):
    """After the recorder: writes the SAELens folder, the Neuronpedia package and dashboard files, and
    records the saved SAE (path, shapes, checksum) in the store."""

    def __init__(self, store: Store | None, recorder: RunRecorder, output_dir: Path, info: dict,
                 unembed: Callable[[], torch.Tensor | None], options: dict) -> None:
        self.store = store
        self.recorder = recorder
        self.output_dir = Path(output_dir)
        self.info = info  # Publication fields known before training: model, hook, layer, metadata…
        self.unembed = unembed
        self.options = options
        self.written: Written | None = None

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        rec = self.recorder
        stats = rec.analysis.stats
        table = FeatureTable.of(stats.frequency.tolist(), stats.mean_activation.tolist(),
                                stats.max_activation.tolist(), rec.is_dead, stats.n_tokens)
        pub = Publication(sae=pl_module.sae, run_id=rec.run_id, metrics=rec.metrics, features=table,
                          examples=rec.examples, set_name=self.options["set_name"], **self.info)
        if self.options["neuronpedia"]:
            add_profiles(pub, [chunk.acts for chunk in rec.heldout], self.unembed(), rec.decode,
                         n_tokens=self.options["output_tokens"])
        write_probe(pl_module.sae, torch.cat([c.acts for c in rec.heldout[:4]]), self.output_dir / PROBE_FILENAME)
        self.written = write_all(pub, self.output_dir, neuronpedia=self.options["neuronpedia"],
                                 features_per_batch=self.options["features_per_batch"])
        if self.store is not None:
            sae = pl_module.sae
            # The architecture of the saved files: BatchTopK is saved as JumpReLU, as SAELens saves it.
            self.store.add_sae_model(self.recorder.run_id, path=str(self.written.saelens), d_in=sae.d_in,
                                     d_sae=sae.d_sae, architecture=getattr(sae, "saved_architecture", sae.architecture),
                                     checksum=sha256(self.written.saelens / WEIGHTS_FILENAME))


class ProgressBar(TQDMProgressBar):
    """Lightning's tqdm bar (Rich's draws nothing when output is not a terminal: CI, logs), moving every step but
    reading the logged metrics only on logging steps: reading them is a host sync on a GPU, and the stock bar
    reads them every step."""

    def __init__(self) -> None:
        super().__init__()
        self._shown: dict = {}

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict:
        every = trainer.log_every_n_steps
        if not self._shown or not trainer.training or not every or trainer.global_step % every == 0:
            self._shown = super().get_metrics(trainer, pl_module)
        return self._shown
