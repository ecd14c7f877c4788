"""Lightning callbacks that record a run: epoch metrics as they come, the SAE and its feature analysis at the end."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Sequence
from pathlib import Path

import lightning as L
from tqdm.auto import tqdm

from midisc.activations import ContextChunk
from midisc.features import FeatureAnalysis, analyze, example_rows
from midisc.sae import WEIGHTS_FILENAME
from midisc.store import Store


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def record_analysis(store: Store | None, run_id: int | None, analysis: FeatureAnalysis,
                    decode: Callable[[Sequence[int]], list[str]], is_dead: Sequence[bool]) -> int:
    """Write a feature analysis: one statistics row and its example rows per feature. Returns examples written."""
    if store is None:
        return 0
    stats = analysis.stats
    store.add_features(run_id, stats.frequency.tolist(), stats.mean_activation.tolist(),
                       stats.max_activation.tolist(), list(is_dead))
    return store.add_feature_examples(run_id, example_rows(analysis, decode))


class RunRecorder(L.Callback):
    """Writes epoch metrics to the store; at the end saves the SAE folder and analyses every feature.

    The analysis runs over the held-out contexts (statistics and examples per feature, see
    `features.py`). Works without a store too (storage=none): the SAE folder is still written.
    """

    def __init__(self, store: Store | None, run_id: int | None, sae_dir: Path, metadata: dict,
                 heldout: list[ContextChunk], decode: Callable[[Sequence[int]], list[str]], analysis: dict) -> None:
        self.store = store
        self.run_id = run_id
        self.sae_dir = Path(sae_dir)
        self.metadata = metadata
        self.heldout = heldout
        self.decode = decode
        self.options = analysis
        self.checksum: str | None = None
        self.analysis: FeatureAnalysis | None = None

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
        sae.save(self.sae_dir, self.metadata)
        self.checksum = sha256(self.sae_dir / WEIGHTS_FILENAME)
        progress = tqdm(self.heldout, desc="feature analysis", unit="batch", leave=False,
                        disable=not trainer.progress_bar_callback)
        self.analysis = analyze(sae, progress, **self.options)
        dead = pl_module.tokens_since_fired >= pl_module.dead_window
        record_analysis(self.store, self.run_id, self.analysis, self.decode, dead.cpu().tolist())
        if self.store is not None:
            self.store.add_sae_model(self.run_id, path=str(self.sae_dir), d_in=sae.d_in, d_sae=sae.d_sae,
                                     architecture=sae.architecture, checksum=self.checksum)
