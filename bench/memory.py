"""Peak memory of a training run as the text grows: 10k, 100k and 1M tokens, RAM cache against disk cache.

Why: a run must stay within the machine's memory however large the corpus: the shuffling buffer
(activations.buffer_size), the batch and the held-out set should bound it, not the number of tokens. Only
`activations.cache=memory` keeps every training vector in RAM (N x d_model x 4 bytes) and grows by design;
`activations.cache=disk` writes them to a file and must stay flat. The target is judged on the disk rows.

Each run is `python -m midisc.train` in its own process (SmolLM2, the default SAE, epochs=2 so the second epoch
reads the cache back; SQLite and the cache in a temporary folder), and its peak RSS is the kernel's own
account from `os.wait4`. The knob is `max_samples`: the number of training documents, chosen here by tokenising
the training split so that they hold at least N tokens. The disk cache is read with pread into fresh buffers, so
RSS holds no pages of the cache file; the peak of anonymous memory is shown beside it.

`--set KEY=VALUE` adds overrides to every run. `--set layer=1` measures the same buffers and cache (d_model
576 either way) with a forward pass 8× shorter than block 15's: the 1M-token runs then take minutes, not half
an hour each.

    python bench/memory.py [--quick] [--set KEY=VALUE]...   # --quick: tiny random Llama, disk cache, 2 sizes
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from midisc.data import corpus, lm

import tiny
from output import add_overrides, result, table

REPO = Path(__file__).resolve().parents[1]
TARGET = 1.25  # peak RSS at the largest size / at the one before it, with the disk cache
SIZES, QUICK_SIZES = (10_000, 100_000, 1_000_000), (2_000, 8_000)
# SmolLM2 runs: a second epoch reads the cache back; a smaller held-out set and evaluation shorten the end of the
# run, whose memory does not depend on the corpus either.
SMOLLM2 = ["epochs=2", "data.holdout_texts=10", "evaluate.contexts=2", "trainer.enable_progress_bar=false"]


def document_tokens(overrides: list[str]) -> list[int]:
    """Tokens (with its separator) of each training document the run will read, in the order it reads them."""
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    m = cfg.model
    texts = corpus.train_heldout(OmegaConf.to_container(cfg.data, resolve=True), cfg.seed, max_samples=10**9).train
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(lm.model_source(m.name, m.gguf_package, m.gguf_file))
    return [len(ids) + 1 for ids in tokenizer(texts)["input_ids"]]


def samples_for(lengths: list[int], n_tokens: int) -> tuple[int, int]:
    """(max_samples, tokens they hold): the fewest training documents with at least n_tokens tokens."""
    total = 0
    for i, length in enumerate(lengths):
        total += length
        if total >= n_tokens:
            return i + 1, total
    print(f"note: the training split holds {total:,} tokens, fewer than {n_tokens:,}; using all of it")
    return len(lengths), total


def start(overrides: list[str], folder: Path) -> subprocess.Popen:
    folder.mkdir(parents=True)
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    with open(folder / "stdout", "w") as out, open(folder / "stderr", "w") as err:
        return subprocess.Popen([sys.executable, "-m", "midisc.train", *overrides, f"hydra.run.dir={folder}/run"],
                                cwd=folder, stdout=out, stderr=err, env=env)


def watch(processes: list[subprocess.Popen]) -> list[dict]:
    """Wait for the runs; per run its peak RSS (the kernel's account, from wait4) and its peak anonymous memory.

    The anonymous part (RSS minus file-backed and shared pages, sampled every 0.2 s with psutil when installed)
    leaves out pages of memory-mapped files, such as the disk cache read back in epoch 2: RSS counts those
    while they stay mapped, though the kernel may drop them at any time.
    """
    try:
        import psutil
    except ImportError:
        psutil = None
    found = [{"peak_anon_mb": 0.0 if psutil else None} for _ in processes]
    waiting = set(range(len(processes)))
    try:
        while waiting:
            for i in sorted(waiting):
                pid, status, usage = os.wait4(processes[i].pid, os.WNOHANG)
                if pid:
                    processes[i].returncode = os.waitstatus_to_exitcode(status)
                    found[i]["peak_rss_mb"] = usage.ru_maxrss / (1024 if sys.platform != "darwin" else 2**20)
                    waiting.discard(i)
                elif psutil:
                    with contextlib.suppress(psutil.Error):
                        memory = psutil.Process(processes[i].pid).memory_info()
                        found[i]["peak_anon_mb"] = max(found[i]["peak_anon_mb"], (memory.rss - memory.shared) / 2**20)
            time.sleep(0.2)
    finally:
        for i in waiting:  # interrupted (Ctrl-C): stop the runs we started rather than leave them running
            processes[i].kill()
            processes[i].wait()
    return found


def check(process: subprocess.Popen, folder: Path) -> int:
    """The training vectors per epoch a finished run reports; its stderr's tail if it failed."""
    if process.returncode:
        raise SystemExit(f"{' '.join(process.args)} failed:\n{(folder / 'stderr').read_text()[-3000:]}")
    vectors = re.search(r"trained on: ([\d,]+)", (folder / "stdout").read_text())
    return int(vectors.group(1).replace(",", "")) if vectors else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny random Llama, disk cache, two small sizes (tests)")
    add_overrides(parser, "layer=1")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if args.quick:
            base = [*tiny.run_overrides(tmp, 400), "data.holdout_texts=6"]
        else:
            base = list(SMOLLM2)
        base += [f"storage.url=sqlite:///{tmp / 'runs.db'}", f"activations.cache_dir={tmp / 'cache'}", *args.set]
        sizes = QUICK_SIZES if args.quick else SIZES
        lengths = document_tokens(base)
        plan = {n: samples_for(lengths, n) for n in sizes}
        caches = ("disk",) if args.quick else ("memory", "disk")  # --quick: each run costs seconds of imports
        jobs = []
        for (n, (samples, tokens)), cache in itertools.product(plan.items(), caches):
            overrides = [*base, f"max_samples={samples}", f"activations.cache={cache}"]
            jobs.append(({"cache": cache, "tokens_asked": n, "tokens": tokens, "max_samples": samples}, overrides))
        rows = []
        # Side by side in --quick (RSS is per process, so running them together changes no figure); one at a
        # time otherwise, so six SmolLM2 runs never need the machine's memory at once.
        for batch in ([jobs] if args.quick else [[job] for job in jobs]):
            folders = [tmp / f"{row['cache']}-{row['tokens_asked']}" for row, _ in batch]
            processes = [start(overrides, folder) for (_, overrides), folder in zip(batch, folders)]
            for (row, _), process, folder, peaks in zip(batch, processes, folders, watch(processes)):
                rows.append({**row, "vectors": check(process, folder), **peaks})
    verdicts = {}
    for cache in caches:
        mine = [r for r in rows if r["cache"] == cache]
        growth = mine[-1]["peak_rss_mb"] / mine[-2]["peak_rss_mb"]
        anon = mine[-1]["peak_anon_mb"] / mine[-2]["peak_anon_mb"] if mine[-2]["peak_anon_mb"] else None
        verdicts[cache] = {"growth": growth, "anon_growth": anon, "pass": growth <= TARGET if cache == "disk" else None}
        for r in mine:
            r["growth"] = growth if r is mine[-1] else None
    table(f"peak RSS of python -m midisc.train ({'tiny random Llama' if args.quick else 'SmolLM2'}), "
          f"largest / next size, target ≤ {TARGET}× with the disk cache",
          ["cache", "tokens", "max_samples", "vectors/epoch", "peak RSS MB", "peak anon MB", "growth", "result"],
          [[r["cache"], r["tokens"], r["max_samples"], r["vectors"], r["peak_rss_mb"], r["peak_anon_mb"], r["growth"],
            ("" if r["growth"] is None else "grows by design" if r["cache"] == "memory" else
             verdicts["disk"]["pass"])] for r in rows])
    result({"rows": rows, "growth": verdicts, "target": TARGET, "targets_met": bool(verdicts["disk"]["pass"])})


if __name__ == "__main__":
    main()
