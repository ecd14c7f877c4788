"""Lightning callbacks for what must happen during `fit`: metrics as they come, and the progress bar."""

from __future__ import annotations

import csv
import logging
import math
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import TQDMProgressBar

from midisc.store import Store
from midisc.training.run_log import epoch_line

log = logging.getLogger(__name__)


CURVE_METRICS = ("train/loss", "train/mse", "train/fvu", "train/l0", "train/l1", "sparsity/dead_frac", "train/lr")


class MetricsRecorder(L.Callback):
    """Writes the metrics as training goes: a per-step curve file in the run folder (appended as it goes, so
    a crashed run keeps its curve), one line per epoch in the run's log, and one epoch_metrics row per epoch in
    the store (none with storage=none).
    What happens after training (analysis, evaluation, publishing) is `finish.py`'s."""

    def __init__(self, store: Store | None, run_id: int | None, curves: Path) -> None:
        self.store = store
        self.run_id = run_id
        self.curves = Path(curves)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.curves.parent.mkdir(parents=True, exist_ok=True)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        if not trainer.is_global_zero or trainer.global_step % trainer.log_every_n_steps and not trainer.is_last_batch:
            return  # rank 0 alone writes the curve of a distributed run
        logged = trainer.callback_metrics
        # A metric logged per step and per epoch is here as name_step; one logged per step only (the lr) bare.
        values = {name.removesuffix("_step"): float(value) for name, value in logged.items()
                  if name.removesuffix("_step") in CURVE_METRICS
                  and (name.endswith("_step") or name + "_step" not in logged)}
        write_header = not self.curves.exists()
        with open(self.curves, "a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["step", "epoch", *CURVE_METRICS], restval="")
            if write_header:
                writer.writeheader()
            writer.writerow({"step": trainer.global_step, "epoch": trainer.current_epoch,
                             **{k: v for k, v in values.items() if math.isfinite(v)}})

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Epoch aggregates (train/*_epoch) and the held-out validation (val/*) of this epoch.
        values = {name.removesuffix("_epoch"): float(value) for name, value in trainer.callback_metrics.items()
                  if not name.endswith("_step")}
        # Only group/name metrics: the progress bar's short aliases are not records.
        values = {k: v for k, v in values.items() if "/" in k and math.isfinite(v)}
        if trainer.is_global_zero:
            log.info(epoch_line(trainer.current_epoch, trainer.max_epochs, trainer.global_step, values,
                                float(pl_module.dead_frac()), pl_module.dead_window))
        if self.store is not None:
            self.store.add_epoch_metrics(self.run_id, trainer.current_epoch, trainer.global_step, values)


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
