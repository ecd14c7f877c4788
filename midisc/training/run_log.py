"""The run's log: what the terminal shows, kept in the run folder's train.log without the progress bars.

Everything a run says goes through `logging`: the config summary at the start, one line per epoch, the
warnings (Python's too, through `logging.captureWarnings`), the closing summary. Hydra's job logging
(`hydra.job_logging` in conf/train.yaml) sends each record to the console, as plain text, and to
train.log, with a time. Progress bars write to the terminal only. An error, which the command prints
on stderr itself, reaches the file alone through `FILE_ONLY`.
"""

from __future__ import annotations

import logging
import shutil
import warnings
from contextlib import contextmanager
from collections.abc import Mapping
from pathlib import Path

HYDRA_FILES = ".hydra"  # the config Hydra saves into every folder it makes

FILE_ONLY = "midisc.run_log.file"  # the logger Hydra's job logging sends to train.log alone
logging.getLogger(FILE_ONLY).addHandler(logging.NullHandler())  # outside Hydra (tests): nowhere, not stderr


class ConsoleFormatter(logging.Formatter):
    """The message as the terminal shows it: plain, with `warning:` or `error:` in front where it is one."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        return text if record.levelno < logging.WARNING else f"{record.levelname.lower()}: {text}"


def to_file_only(message: str, level: int = logging.ERROR) -> None:
    """`message` into train.log and nowhere else: for what the command has already printed itself."""
    logging.getLogger(FILE_ONLY).log(level, message)


def epoch_line(epoch: int, epochs: int, step: int, metrics: Mapping[str, float], dead_frac: float,
               dead_window: int) -> str:
    """One epoch as a line: the epoch's training averages, the held-out figures, and dead as training counts it
    at the epoch's end."""
    def figure(name: str, fmt: str) -> str:
        return format(metrics[name], fmt) if name in metrics else "-"

    line = (f"epoch {epoch + 1}/{epochs} (step {step:,}): train loss {figure('train/loss', '.4g')}  "
            f"FVU {figure('train/fvu', '.3f')}  L0 {figure('train/l0', '.1f')}")
    if "val/fvu" in metrics:
        line += f"  | held-out FVU {figure('val/fvu', '.3f')}  L0 {figure('val/l0', '.1f')}"
    return line + f"  | dead {100 * dead_frac:.2f}% (not fired in the last {dead_window:,} training tokens)"


def _file_handlers_in(folder: Path) -> list[logging.FileHandler]:
    # Root's handlers: the file-only logger shares the same handler object.
    return [h for h in logging.getLogger().handlers
            if isinstance(h, logging.FileHandler) and Path(h.baseFilename).parent == folder]


def _remove_empty(folder: Path) -> None:
    for path in (folder, folder.parent):  # the time folder, then the date folder when nothing else is in it
        try:
            path.rmdir()
        except OSError:
            break


def log_into_run_folder(fresh: Path, run_folder: Path) -> None:
    """Send a resume's log to the resumed run's train.log and remove the folder Hydra made for the resume.

    Hydra gives every invocation a new outputs/<date>/<time>/ folder; a resume trains in the run's own
    folder, so the new one would hold nothing but its log and .hydra/ (the resume's two overrides).
    """
    for handler in _file_handlers_in(fresh):
        old = Path(handler.baseFilename)
        handler.close()
        target = run_folder / old.name
        if old.is_file():  # what was logged before the resume knew its run
            with open(target, "a") as log_file:
                log_file.write(old.read_text())
            old.unlink()
        handler.baseFilename, handler.mode = str(target), "a"  # reopened there at the next record
    shutil.rmtree(fresh / HYDRA_FILES, ignore_errors=True)
    _remove_empty(fresh)


def remove_unused_run_folder(folder: Path) -> bool:
    """Remove a run folder that holds nothing but Hydra's config and the log: a config refused before training
    leaves no empty outputs/<date>/<time>/ behind (the terminal showed the refusal). True if removed."""
    folder = Path(folder)
    logs = {Path(h.baseFilename).name for h in _file_handlers_in(folder)}
    if not folder.is_dir() or any(p.name not in {HYDRA_FILES, *logs} for p in folder.iterdir()):
        return False
    for handler in _file_handlers_in(folder):
        handler.close()
        # Dropped, so that a later record (the error, written to the log too) opens no file in a removed folder.
        logging.getLogger().removeHandler(handler)
        logging.getLogger(FILE_ONLY).removeHandler(handler)
    if not logging.getLogger(FILE_ONLY).handlers:  # else logging's last resort would print the record on stderr
        logging.getLogger(FILE_ONLY).addHandler(logging.NullHandler())
    shutil.rmtree(folder / HYDRA_FILES, ignore_errors=True)
    for name in logs:
        (folder / name).unlink(missing_ok=True)
    _remove_empty(folder)
    return not folder.exists()


@contextmanager
def logging_into(path: Path):
    """Everything logged meanwhile goes to `path` too (each run of a job of several hooks keeps its own log)."""
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S"))
    logging.getLogger().addHandler(handler)
    try:
        yield
    finally:
        logging.getLogger().removeHandler(handler)
        handler.close()


def quiet_lightning() -> None:
    """Keep the console to the progress bar and our summary: Lightning's banners and tips say nothing here."""
    logging.getLogger("lightning.pytorch.utilities.rank_zero").setLevel(logging.WARNING)
    # The stream's length is exact up to dropped norm outliers, and it runs in the main process.
    warnings.filterwarnings("ignore", message=".*IterableDataset.*has `__len__` defined.*")
    warnings.filterwarnings("ignore", message=".*treespec.*LeafSpec.*")
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    # A resumed run replays the epoch's seeded order and skips what was trained (see checkpoints.py).
    warnings.filterwarnings("ignore", message=".*resuming from a checkpoint that ended before the epoch ended.*")
    # Under DDP every rank validates on all held-out vectors (the same figures on each), and rank 0's training
    # averages stand for the run's: syncing them every step would cost an all-reduce per metric.
    warnings.filterwarnings("ignore", message=".*sync_dist=True.*when logging on epoch level in distributed.*")
