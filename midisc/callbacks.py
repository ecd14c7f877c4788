"""Lightning callbacks that record a run: epoch metrics as they come, the SAE and its features at the end."""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import lightning as L
import torch

from midisc.features import feature_stats
from midisc.sae import WEIGHTS_FILENAME
from midisc.store import Store


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class RunRecorder(L.Callback):
    """Writes epoch metrics to the store; at the end saves the SAE folder and one row per feature.

    Works without a store too (storage=none): the SAE folder is still written.
    """

    def __init__(self, store: Store | None, run_id: int | None, sae_dir: Path, heldout: list[torch.Tensor],
                 metadata: dict) -> None:
        self.store = store
        self.run_id = run_id
        self.sae_dir = Path(sae_dir)
        self.heldout = heldout
        self.metadata = metadata
        self.checksum: str | None = None

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
        if self.store is None:
            return
        stats = feature_stats(sae, self.heldout)
        dead = pl_module.tokens_since_fired >= pl_module.dead_window
        self.store.add_features(self.run_id, stats.frequency.tolist(), stats.mean_activation.tolist(),
                                stats.max_activation.tolist(), dead.cpu().tolist())
        self.store.add_sae_model(self.run_id, path=str(self.sae_dir), d_in=sae.d_in, d_sae=sae.d_sae,
                                 architecture=sae.architecture, checksum=self.checksum)
