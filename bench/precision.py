"""bf16 autocast against float32: the same run's held-out FVU, and its SAE step time.

Why: under `trainer.precision=bf16-mixed` the SAE's dense products run in bf16 (on a GPU, and on CPUs with
bf16 instructions: AVX512-BF16, AMX), while weights, optimizer state and the sparse sums stay float32. The
issue asks for bf16 only where the held-out FVU stays within 1 % of float32's: this measures both (a
lower FVU under bf16 passes too).

The two runs go through `midisc.train.train(cfg, folder)` in this process, with the real config composed as
the CLI composes it, the same seed, data and SAE; only `trainer.precision` differs. They share a disk
activation cache in a temporary folder, and the step time counts only the epochs after the first (which
harvests in the first run and reads the cache in the second): from a batch's start to its end, so the
forward, backward and optimizer step, median over steps.

    python bench/precision.py [--quick] [--set KEY=VALUE ...]   # default: experiment=reference (about 10 min)
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from unittest import mock

import lightning as L
from hydra import compose, initialize_config_dir

import midisc.train

import tiny
from output import add_overrides, result, table

REPO = Path(__file__).resolve().parents[1]
PRECISIONS = ("32-true", "bf16-mixed")
MAX_FVU_CHANGE = 0.01  # bf16's held-out FVU at most 1 % above float32's


class StepTimer(L.Callback):
    """Seconds per training step, for the epochs after the first."""

    def __init__(self) -> None:
        self.seconds: list[float] = []
        self.start = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.current_epoch > 0:
            self.seconds.append(time.perf_counter() - self.start)


def run(overrides: list[str], folder: Path) -> dict:
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    timer = StepTimer()
    fit = L.Trainer.fit

    def timed_fit(trainer, *args, **kwargs):
        trainer.callbacks.append(timer)
        return fit(trainer, *args, **kwargs)

    start = time.perf_counter()
    with mock.patch.object(L.Trainer, "fit", timed_fit):
        outcome = midisc.train.train(cfg, folder)
    if not timer.seconds:
        raise SystemExit("no step after the first epoch was timed: run with epochs >= 2 (--set epochs=2)")
    step = statistics.median(timer.seconds)
    return {"fvu": outcome.metrics["fvu"], "l0": outcome.metrics["l0"], "dead_frac": outcome.metrics["dead_frac"],
            "step_s": step, "tokens_per_s": cfg.batch_size / step, "run_s": time.perf_counter() - start}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the tiny random Llama (for tests)")
    add_overrides(parser, "sae=relu")
    args = parser.parse_args()
    midisc.train.quiet_lightning()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        base = [f"storage.url=sqlite:///{tmp / 'runs.db'}", "trainer.enable_progress_bar=false",
                "activations.cache=disk", f"activations.cache_dir={tmp / 'cache'}"]
        if args.quick:
            base += [*tiny.run_overrides(tmp, 60), "epochs=2"]
        else:
            base += ["experiment=reference"]
        base += args.set
        runs = {p: run([*base, f"trainer.precision={p}"], tmp / p) for p in PRECISIONS}
    fp32, bf16 = runs["32-true"], runs["bf16-mixed"]
    change = (bf16["fvu"] - fp32["fvu"]) / fp32["fvu"]
    speedup = fp32["step_s"] / bf16["step_s"]
    table(f"trainer.precision on {'the tiny random Llama' if args.quick else 'the reference setting'}"
          f"{' ' + ' '.join(args.set) if args.set else ''}",
          ["precision", "held-out FVU", "L0", "dead", "step s", "tok/s", "run s"],
          [[p, r["fvu"], r["l0"], r["dead_frac"], r["step_s"], r["tokens_per_s"], r["run_s"]] for p, r in runs.items()])
    passed = change <= MAX_FVU_CHANGE
    print(f"bf16-mixed: FVU {change:+.2%} against float32 ({'within' if passed else 'more than'} 1 %), "
          f"step {speedup:.2f}x as fast")
    result({"runs": runs, "fvu_change": change, "step_speedup": speedup, "max_fvu_change": MAX_FVU_CHANGE,
            "pass": passed})


if __name__ == "__main__":
    main()
