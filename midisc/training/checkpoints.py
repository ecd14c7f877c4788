"""Checkpoints that let a run outlive a crash, `kill -9` or Ctrl-C: `python -m midisc.train resume=RUN`.

A run saves `checkpoints/last.ckpt` every `every_n_steps` optimizer steps, at each epoch end and on
Ctrl-C, always to a temporary file renamed over the old one, so a kill in mid-save leaves the previous
checkpoint whole. The one before it stays as `previous.ckpt`: a resume that finds `last.ckpt` damaged
(a full disk, a bad copy) goes on from there.

A resumed run continues from the exact batch: Lightning restores the weights, the optimizer and its
counters, and `trainer_position` tells the activation stream which epoch it serves and how many of that
epoch's batches were already trained on; the stream replays that epoch's seeded order and skips them,
since a plain iterable cannot be rewound. The sums behind the epoch's training averages travel in the
checkpoint too (`epoch_totals`), which Lightning does not save.
"""

from __future__ import annotations

import csv
import fcntl
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.utilities.exceptions import SIGTERMException

from midisc.run_folder import CHECKPOINT_DIR, DAMAGED_SUFFIX, LAST, LOCK_FILENAME, PREVIOUS

EPOCH_TOTALS_KEY = "midisc_epoch_totals"
EPOCH_ROWS_KEY = "midisc_epoch_rows"


class CheckpointError(RuntimeError):
    """No checkpoint of the run can be read; the message (one line) says which file and how to start over."""


def last_checkpoint(output_dir: Path) -> Path | None:
    path = Path(output_dir) / CHECKPOINT_DIR / LAST
    return path if path.is_file() else None


def resume_checkpoint(output_dir: Path, warn: Callable[[str], None]) -> Path | None:
    """The newest checkpoint of the run in `output_dir` that can be read; None when it saved none.

    A damaged `last.ckpt` is renamed `last.ckpt.damaged`, with a warning, so the next save does not
    push it over the good `previous.ckpt`; CheckpointError when no checkpoint can be read.
    """
    folder = Path(output_dir) / CHECKPOINT_DIR
    found = [folder / name for name in (LAST, PREVIOUS) if (folder / name).is_file()]
    damaged: list[str] = []
    for path in found:
        try:
            checkpoint_step(path)
        except Exception as error:  # torch.load fails with RuntimeError, EOFError, UnpicklingError…
            damaged.append(f"{path} ({type(error).__name__}: {str(error).splitlines()[0][:120]})")
            continue
        if damaged:
            folder.joinpath(LAST).replace(folder / (LAST + DAMAGED_SUFFIX))
            warn(f"checkpoint {damaged[0]} cannot be read; resuming from the one before it, {path} "
                 f"(the damaged file is kept as {LAST + DAMAGED_SUFFIX})")
        return path
    if damaged:
        raise CheckpointError(f"no checkpoint of this run can be read: {'; '.join(damaged)}. To train it again from "
                              f"the start, remove {folder} and resume again")
    return None


def checkpoint_step(path: Path) -> tuple[int, int]:
    """(global step, epoch) a checkpoint was saved at; memory-mapped, so the weights are not read."""
    state = torch.load(path, map_location="cpu", mmap=True, weights_only=False)
    return int(state["global_step"]), int(state["epoch"])


def trim_curves(path: Path, last_step: int) -> None:
    """Drop the rows of a curve file logged after `last_step`: the resumed run logs those steps again."""
    if not Path(path).is_file():
        return
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    kept = rows[:1] + [row for row in rows[1:] if row and int(row[0]) <= last_step]
    tmp = Path(path).with_suffix(".trimming")
    with open(tmp, "w", newline="") as f:
        csv.writer(f).writerows(kept)
    tmp.replace(path)


class Checkpointer(L.Callback):
    """Saves `last.ckpt` every `every_n_steps` steps, at every epoch end and on Ctrl-C.

    `rows` is the activation stream's vectors per epoch (0 until epoch 1 has run), kept in the checkpoint too:
    a run killed after its last epoch resumes into no epoch at all, and would otherwise record 0.
    """

    def __init__(self, folder: Path, every_n_steps: int, rows: Callable[[], int] | None = None) -> None:
        self.folder = Path(folder)
        self.every_n_steps = every_n_steps
        self.rows = rows
        self._carried: dict | None = None  # epoch totals read from the checkpoint a run resumes from
        self._restored_rows = 0

    @property
    def epoch_rows(self) -> int:
        """Vectors per epoch: as the stream counted them, else as the checkpoint the run resumed from did."""
        return (self.rows() if self.rows else 0) or self._restored_rows

    def save(self, trainer: L.Trainer) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = self.folder / f".{LAST}.partial"
        trainer.save_checkpoint(tmp, weights_only=False)  # the optimizer and loop state too: resume needs them
        if not trainer.is_global_zero:  # every rank of a distributed run calls save_checkpoint; rank 0 writes
            return
        if (self.folder / LAST).is_file():
            os.replace(self.folder / LAST, self.folder / PREVIOUS)
        os.replace(tmp, self.folder / LAST)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        if self._carried is not None:  # a step after a resume has logged: its epoch totals exist now
            if self._carried["epoch"] == trainer.current_epoch:
                # A metric a step logs only sometimes (AuxK's loss, while features are dead) waits for its first.
                self._carried["totals"] = carry_epoch_totals(trainer, self._carried["totals"])
            if self._carried["epoch"] != trainer.current_epoch or not self._carried["totals"]:
                self._carried = None
        if trainer.global_step % self.every_n_steps == 0:
            self.save(trainer)

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        # The sums behind this epoch's train/* averages: without them, a resumed epoch's row in epoch_metrics
        # would average only the steps after the resume.
        checkpoint[EPOCH_TOTALS_KEY] = {"epoch": trainer.current_epoch, "totals": epoch_totals(trainer)}
        checkpoint[EPOCH_ROWS_KEY] = self.epoch_rows

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        self._carried = checkpoint.get(EPOCH_TOTALS_KEY)
        self._restored_rows = int(checkpoint.get(EPOCH_ROWS_KEY) or 0)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.save(trainer)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        # Only Ctrl-C and SIGTERM (a scheduler's stop): after a crash (NaN loss, a bug) the last periodic
        # checkpoint is the one worth keeping.
        if isinstance(exception, (KeyboardInterrupt, SIGTERMException)) and trainer.global_step > 0:
            self.save(trainer)

    def discard(self) -> None:
        """Remove the checkpoints once the run has completed: its SAE is in sae/ and they are large."""
        shutil.rmtree(self.folder, ignore_errors=True)


def epoch_totals(trainer: L.Trainer) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{metric: (weighted sum, count)} of every mean logged on_epoch by the training step so far this epoch.

    Lightning keeps these in the epoch loop's result collection, which it does not checkpoint.
    """
    results = trainer.fit_loop.epoch_loop._results
    return {key: (metric.value.detach().cpu().clone(), metric.cumulated_batch_size.detach().cpu().clone())
            for key, metric in results.items()
            if key.startswith("training_step.") and metric.is_tensor and metric.meta.on_epoch
            and metric.meta.is_mean_reduction}


def carry_epoch_totals(trainer: L.Trainer, totals: dict[str, tuple[torch.Tensor, torch.Tensor]]
                       ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Add the totals of the steps before a resume to this epoch's, as if the run had never stopped; returns those
    of metrics not logged since the resume yet, to be carried once they are."""
    results = trainer.fit_loop.epoch_loop._results
    waiting = {}
    for key, (value, count) in totals.items():
        if key in results:
            metric = results[key]
            metric.value = metric.value + value.to(metric.value.device)
            metric.cumulated_batch_size = metric.cumulated_batch_size + count.to(metric.cumulated_batch_size.device)
        else:
            waiting[key] = (value, count)
    return waiting


def trainer_position(trainer: L.Trainer) -> Callable[[], tuple[int, int]]:
    """(epoch, batches of it already trained on), read when the activation stream starts an epoch.

    Read then, not in a hook: on a resume Lightning restores its counters only as the epoch loop starts,
    after `on_train_start`, and before it asks the stream for the first batch.
    """
    return lambda: (trainer.current_epoch, trainer.fit_loop.epoch_loop.batch_progress.current.completed)


class RunLock:
    """An exclusive lock on a run folder while a process trains in it, so `resume=` cannot start a second
    process on a run that is still alive. The operating system frees it when the process dies, kill -9 included."""

    def __init__(self, output_dir: Path) -> None:
        self.path = Path(output_dir) / LOCK_FILENAME
        self._file = None

    def acquire(self) -> bool:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            self._file = open(self.path, "a+")
            try:
                fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                self._file.close()
                self._file = None
                return False
            # The holder removes the file as it lets go: a lock taken on the removed file holds nothing.
            try:
                same = os.stat(self.path).st_ino == os.fstat(self._file.fileno()).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            self._file.close()
        self._file.seek(0)
        self._file.truncate()
        self._file.write(str(os.getpid()))
        self._file.flush()
        return True

    def holder(self) -> str:
        try:
            return self.path.read_text().strip() or "?"
        except OSError:
            return "?"

    def release(self) -> None:
        """Let go and remove the file: a finished run's folder keeps no lock (a killed one's is taken over)."""
        if self._file is not None:
            self.path.unlink(missing_ok=True)  # while still holding it, so no one locks the file being removed
            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()
            self._file = None
