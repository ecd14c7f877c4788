"""Scaling out: one pass of the model for several hooks, and data-parallel training through Lightning's DDP.

Why: `python -m midisc.train layers=[4,8,15,24]` promises to run the language model once per batch, up to the
deepest hooked block, where four separate runs each load the model, tokenise the corpus and run it up to their
own block (data/prefill.py); and `trainer=ddp` promises that two processes at batch_size=B train the SAE that one
process at batch_size=2B trains.

(a) Several hooks, two ways:
- harvest, in this process: one 4-hook pass (read the texts, tokenise, load the model once, `prefill` with the
  four sources sharing it) against four separate harvests, each doing what a run of `layer=N` does before it
  trains (read the texts, tokenise, load the model, `Source.chunks` for the held-out contexts and
  `Source.vectors` for the training ones). The one pass must give each hook exactly the vectors its separate
  harvest gives (the "same rows" column). Target: one pass / separate ≤ 0.35. Hooked after block L, a harvest
  runs L + 1 blocks: the pass runs 25 where the four run 5 + 9 + 16 + 25 = 55, so with the weights loading from
  midisc's fp32 copy in a fraction of a second and the texts tokenising in one or two, 25/55 = 0.45 is about as
  low as the ratio gets for these layers.
- commands, end to end: `python -m midisc.train layers=[4,8,15,24]` against `layer=4`, `layer=8`, … run one
  after another, each a fresh process (its own folder, the same SQLite file). Target: the separate commands take
  at least 2× the job's wall time. The table splits each side into the database's run durations (from its
  `started_at` to `ended_at`: the separate runs' include their harvest) and the rest.
(b) DDP: `trainer=ddp trainer.accelerator=cpu` (2 processes, gloo, batch_size=B=128 each) against one process
  at batch_size=2B, both with `activations.cache=disk` in one folder that an untimed run of the single process
  filled first, so both read the same vectors and neither harvests: the wall time compares training and the
  fixed costs (launch, load, analysis, evaluation), not harvests. `max_vectors` is a multiple of 2 x 4096: a
  rank reads whole 4096-row blocks, as many as the other rank, and the rest of the cache sits the epoch out
  (ActivationStream._shared_blocks), so on a cache of 12k vectors DDP would train on 8k and the two FVUs would
  differ by the data, not by DDP. Target: held-out FVU (the database's training_runs.fvu) within 0.03 of each
  other. The wall-time ratio has no target: Lightning gives each rank cores / ranks threads, the single
  process takes torch's default of every core; when that is more than one, a third run of the single process
  with OMP_NUM_THREADS=1 shows how much of the ratio is threads rather than DDP.

Full mode sizes, reduced so that four separate runs take minutes, not hours: (a) runs the default
config (`model=smollm2`, `data=bbc`, TopK k=32 x8) at layers 4, 8, 15 and 24 with `max_samples=120` (of 540
training documents: about 60k vectors per hook instead of 265k), `epochs=1` (of 3) and `evaluate.contexts=4`
(of 16); what a run does besides harvesting (training, analysis, evaluation, export) shrinks with them, but
not in proportion. On this project's 2-core machine, with other processes holding a load average of 3-5, the
full mode took 45 minutes, two thirds of it SmolLM2 forwards (the in-process harvests, then the commands'),
which grow with max_samples. (b) uses the tiny random Llama of bench/tiny.py (8 blocks, d=64) with 400 texts, `experiment=tiny` otherwise: SmolLM2 under DDP would load the model in each
rank and train for minutes per run on 2 cores, and the FVU comparison needs more SAE steps than a few minutes
of SmolLM2 give. `--quick` runs both parts on the tiny model (layers 1, 3, 5, 7; 60 texts): it checks the
script, its figures say nothing about speed.

    python bench/scale.py [--quick] [--set KEY=VALUE ...]   # --set: extra overrides for every run of (a)
"""

from __future__ import annotations

import argparse
import gc
import os
import sqlite3
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf

import midisc.config  # noqa: F401  registers the resolvers conf/ uses
from midisc.data import lm
from midisc.data.activations import MemoryCache
from midisc.data.prefill import prefill
from midisc.data.recipe import Recipe
from midisc.run import load_corpus

import tiny
from output import add_overrides, result, table

REPO = Path(__file__).resolve().parents[1]
TARGET_HARVEST, TARGET_SPEEDUP, TARGET_FVU = 0.35, 2.0, 0.03
FULL_LAYERS, QUICK_LAYERS = (4, 8, 15, 24), (1, 3, 5, 7)
FULL_SIZE = ["max_samples=120", "epochs=1", "evaluate.contexts=4"]
DDP_BATCH = 128  # B: per rank under DDP; the single process runs 2B
DDP_TEXTS = {True: 60, False: 400}  # quick, full
# A multiple of 2 ranks x 4096-row blocks: each rank reads whole blocks, as many as the other, and leaves the
# rest of the cache out of the epoch (ActivationStream._shared_blocks); at this many vectors both sides see all.
DDP_VECTORS = {True: 2 * 4096, False: 16 * 4096}
QUIET = ["trainer.enable_progress_bar=false"]


def compose_config(overrides: list[str]) -> DictConfig:
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose(config_name="train", overrides=overrides)


def recipe_of(cfg: DictConfig, hf_config) -> Recipe:
    m = cfg.model
    hook = lm.resolve_hook(hf_config, layer=cfg.layer, site=m.site, hooks=dict(m.hooks), hook=m.hook)
    return Recipe.of(OmegaConf.to_container(cfg, resolve=True), hook)


def model_config(cfg: DictConfig):
    m = cfg.model
    return lm.load_config(lm.model_source(m.name, m.gguf_package, m.gguf_file))


def harvest_alone(cfg: DictConfig) -> dict:
    """What a run of one layer does before it trains: texts, tokens, its own model, its own harvest."""
    start = time.perf_counter()
    split = load_corpus(cfg)
    recipe = recipe_of(cfg, model_config(cfg))
    tokens = recipe.tokens()
    train_ctx, heldout_ctx = tokens.pack(split.train), tokens.pack(split.heldout)
    tokenised = time.perf_counter()
    source = recipe.open(tokens)
    loaded = time.perf_counter()
    heldout = torch.cat([chunk.acts for chunk in source.chunks(heldout_ctx)])
    vectors = torch.cat(list(source.vectors(train_ctx)))
    done = time.perf_counter()
    del source
    gc.collect()
    return {"prepare_s": tokenised - start, "load_s": loaded - tokenised, "harvest_s": done - loaded,
            "seconds": done - start, "vectors": len(vectors), "heldout": heldout, "train": vectors}


def harvest_together(cfgs: list[DictConfig]) -> dict:
    """What `layers=[…]` does before its runs train: texts and tokens once, one model, one pass (prefill)."""
    start = time.perf_counter()
    split = load_corpus(cfgs[0])
    hf_config = model_config(cfgs[0])
    recipes = [recipe_of(cfg, hf_config) for cfg in cfgs]
    tokens = recipes[0].tokens()
    train_ctx, heldout_ctx = tokens.pack(split.train), tokens.pack(split.heldout)
    tokenised = time.perf_counter()
    first = recipes[0].open(tokens)
    sources = [first, *(recipe.open(tokens, first.loaded) for recipe in recipes[1:])]
    loaded = time.perf_counter()
    caches = [MemoryCache() for _ in sources]
    heldout = prefill(sources, caches, train_ctx, heldout_ctx, cfgs[0].max_vectors)
    done = time.perf_counter()
    del sources, first
    gc.collect()
    return {"prepare_s": tokenised - start, "load_s": loaded - tokenised, "harvest_s": done - loaded,
            "seconds": done - start, "vectors": sum(len(c) for c in caches),
            "heldout": [torch.cat([chunk.acts for chunk in chunks]) for chunks in heldout],
            "train": [cache.rows for cache in caches]}


def command(args: list[str], cwd: Path, env: dict | None = None) -> float:
    """Wall seconds of `python -m midisc.train ARGS` run in cwd; a failure stops the benchmark with its stderr."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
           **(env or {})}
    env.setdefault("HF_HUB_OFFLINE", "1")
    cwd.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "midisc.train", *args], cwd=cwd, capture_output=True, text=True,
                          env=env)
    seconds = time.perf_counter() - start
    if proc.returncode:
        raise SystemExit(f"python -m midisc.train {' '.join(args)} failed (exit {proc.returncode}):\n"
                         f"{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return seconds


def recorded_runs(db: Path, after: int = 0) -> list[dict]:
    """The database's runs with id > after: layer, status, held-out FVU and recorded seconds."""
    with sqlite3.connect(db) as connection:
        rows = connection.execute("SELECT id, layer, status, fvu, n_tokens, started_at, ended_at FROM training_runs "
                                  "WHERE id > ? ORDER BY id", (after,)).fetchall()
    runs = []
    for run_id, layer, status, fvu, n_tokens, started, ended in rows:
        if status != "completed":
            raise SystemExit(f"run {run_id} (layer {layer}) is {status} in {db}")
        seconds = (datetime.fromisoformat(str(ended)) - datetime.fromisoformat(str(started))).total_seconds()
        runs.append({"id": run_id, "layer": layer, "fvu": fvu, "vectors": n_tokens, "seconds": seconds})
    return runs


def harvests(base: list[str], layers: tuple[int, ...], model_name: str) -> tuple[dict, dict]:
    """(a), in this process: four separate harvests, then one pass; the rows, and the ratio."""
    cfgs = [compose_config([*base, f"layer={layer}"]) for layer in layers]
    m = cfgs[0].model
    # Untimed: a packaged GGUF becomes an fp32 folder on the first load, and the first read of the weights
    # fills the page cache; either would count against whichever side ran first.
    lm.load_model(m.name, gguf_package=m.gguf_package, gguf_file=m.gguf_file, device_map=None)
    gc.collect()
    alone = [harvest_alone(cfg) for cfg in cfgs]
    together = harvest_together(cfgs)
    same = all(torch.equal(a["train"], t) and torch.equal(a["heldout"], h)
               for a, t, h in zip(alone, together["train"], together["heldout"]))
    separate = {k: sum(a[k] for a in alone) for k in ("prepare_s", "load_s", "harvest_s", "seconds", "vectors")}
    ratio = together["seconds"] / separate["seconds"]
    rows = [{"part": "harvest", "side": f"{len(layers)} separate harvests", **_figures(separate), "same_rows": same,
             "per_hook_s": [a["seconds"] for a in alone]},
            {"part": "harvest", "side": f"one {len(layers)}-hook pass", **_figures(together), "same_rows": same,
             "ratio": ratio, "target": f"≤ {TARGET_HARVEST}", "pass": ratio <= TARGET_HARVEST}]
    table(f"(a) one pass for layers {','.join(map(str, layers))} of {model_name} against separate harvests "
          f"({separate['vectors'] // len(layers):,} training vectors per hook)",
          ["harvest", "texts, tokens s", "load model s", "forward s", "total s", "per hook s", "same rows", "ratio",
           "target", "result"],
          [[r["side"], r["prepare_s"], r["load_s"], r["harvest_s"], r["seconds"],
            " ".join(f"{t:.1f}" for t in r.get("per_hook_s", [])), r["same_rows"], r.get("ratio"), r.get("target"),
            r.get("pass")] for r in rows])
    return rows, {"harvest_ratio": ratio}


def commands(base: list[str], layers: tuple[int, ...], size: str, tmp: Path) -> tuple[list[dict], dict]:
    """(a), end to end: `layer=N` for each layer, one after another, then one `layers=[…]` job."""
    db = tmp / "runs.db"
    common = [*base, f"storage.url=sqlite:///{db}", f"activations.cache_dir={tmp / 'cache'}"]
    separate_s = sum(command([*common, f"layer={layer}"], tmp / "separate") for layer in layers)
    separate_runs = recorded_runs(db)
    hooks = ",".join(map(str, layers))
    job_s = command([*common, f"layers=[{hooks}]"], tmp / "job")
    job_runs = recorded_runs(db, after=separate_runs[-1]["id"])
    speedup = separate_s / job_s
    rows = [{"part": "commands", "side": f"{len(layers)} commands layer=N", "seconds": separate_s,
             "runs_s": sum(r["seconds"] for r in separate_runs), "per_run_s": [r["seconds"] for r in separate_runs],
             "fvu": [r["fvu"] for r in separate_runs]},
            {"part": "commands", "side": f"one command layers=[{hooks}]", "seconds": job_s,
             "runs_s": sum(r["seconds"] for r in job_runs), "per_run_s": [r["seconds"] for r in job_runs],
             "fvu": [r["fvu"] for r in job_runs],
             "ratio": speedup, "target": f"≥ {TARGET_SPEEDUP}× faster", "pass": speedup >= TARGET_SPEEDUP}]
    table(f"(a) the commands, end to end (each a fresh `python -m midisc.train` process, {size})",
          ["commands", "wall s", "in the runs s", "per run s", "outside the runs s", "held-out FVU", "speed-up",
           "target", "result"],
          [[r["side"], r["seconds"], r["runs_s"], " ".join(f"{t:.0f}" for t in r["per_run_s"]),
            r["seconds"] - r["runs_s"], " ".join(f"{f:.3f}" for f in r["fvu"]), r.get("ratio"), r.get("target"),
            r.get("pass")] for r in rows])
    print("  in the runs: started_at to ended_at in the database; a separate run's includes its own load and harvest, "
          "a job's runs start once the one pass has filled their caches")
    return rows, {"total_speedup": speedup}


def _figures(side: dict) -> dict:
    return {k: side[k] for k in ("prepare_s", "load_s", "harvest_s", "seconds", "vectors")}


def ddp(quick: bool, tmp: Path) -> tuple[list[dict], dict]:
    folder = tmp / "ddp"
    texts, vectors = DDP_TEXTS[quick], DDP_VECTORS[quick]
    base = ["experiment=tiny", f"model.name={tiny.build_model(folder / 'model', layers=8)}",
            f"data.path={tiny.write_texts(folder / 'texts', texts)}", f"max_samples={texts}",
            f"max_vectors={vectors}", *QUIET,
            "activations.cache=disk", f"activations.cache_dir={folder / 'cache'}"]
    db = folder / "runs.db"
    single = [*base, f"storage.url=sqlite:///{db}", f"batch_size={2 * DDP_BATCH}"]
    command(single, folder / "fill")  # untimed: fills the cache both timed runs read
    filled = recorded_runs(db)[-1]["id"]
    single_s = command(single, folder / "single")
    ddp_s = command([*base, f"storage.url=sqlite:///{db}", f"batch_size={DDP_BATCH}", "trainer=ddp",
                     "trainer.accelerator=cpu"], folder / "ddp")
    (one, two) = recorded_runs(db, after=filled)
    diff, ratio = two["fvu"] - one["fvu"], ddp_s / single_s
    threads = torch.get_num_threads()
    rows = [{"part": "ddp", "side": f"1 process, batch_size={2 * DDP_BATCH}", "seconds": single_s, "fvu": one["fvu"],
             "vectors": one["vectors"]},
            {"part": "ddp", "side": f"trainer=ddp: 2 processes, batch_size={DDP_BATCH}", "seconds": ddp_s,
             "fvu": two["fvu"], "vectors": two["vectors"], "fvu_diff": diff, "time_ratio": ratio,
             "target": f"|ΔFVU| ≤ {TARGET_FVU}", "pass": abs(diff) <= TARGET_FVU}]
    figures = {"ddp_fvu_diff": diff, "ddp_time_ratio": ratio}
    if threads > 1:
        # Lightning gives each rank cores / ranks threads (OMP_NUM_THREADS, unless set); the single process has
        # torch's default of every core. On ops this small, threads cost more than they give: this row shows
        # how much of the ratio is that rather than DDP.
        one_thread_s = command(single, folder / "single-1-thread", env={"OMP_NUM_THREADS": "1"})
        (alone,) = recorded_runs(db, after=two["id"])
        figures["ddp_time_ratio_vs_one_thread"] = ddp_s / one_thread_s
        rows.append({"part": "ddp", "side": f"1 process, batch_size={2 * DDP_BATCH}, OMP_NUM_THREADS=1",
                     "seconds": one_thread_s, "fvu": alone["fvu"], "vectors": alone["vectors"],
                     "time_ratio": figures["ddp_time_ratio_vs_one_thread"]})
        rows[0]["side"] += f", {threads} threads"
    table(f"(b) DDP on CPU (gloo), the tiny random Llama (8 blocks, d=64), {texts} texts, experiment=tiny, "
          f"max_vectors={vectors}, one cache filled beforehand; time ratio: DDP's wall time over that row's",
          ["training", "wall s", "vectors per epoch", "held-out FVU", "ΔFVU", "time ratio", "target", "result"],
          [[r["side"], r["seconds"], r["vectors"], r["fvu"], r.get("fvu_diff"), r.get("time_ratio"), r.get("target"),
            r.get("pass")] for r in rows])
    return rows, figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the tiny random Llama for both parts (for tests)")
    add_overrides(parser, "sae.expansion=4")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if args.quick:
            base = ["experiment=tiny", f"model.name={tiny.build_model(tmp / 'model', layers=8)}",
                    f"data.path={tiny.write_texts(tmp / 'texts', 60)}"]
            layers, name, size = QUICK_LAYERS, "the tiny random Llama (8 blocks)", "experiment=tiny"
        else:
            base, layers, name, size = FULL_SIZE, FULL_LAYERS, "SmolLM2-135M (30 blocks)", " ".join(FULL_SIZE)
        base = [*QUIET, *base, *args.set]
        harvest_rows, harvest_figures = harvests(base, layers, name)
        command_rows, command_figures = commands(base, layers, " ".join([size, *args.set]), tmp / "hooks")
        ddp_rows, ddp_figures = ddp(args.quick, tmp)
    rows = [*harvest_rows, *command_rows, *ddp_rows]
    result({"rows": rows, "targets_met": all(r["pass"] for r in rows if "pass" in r), **harvest_figures,
            **command_figures, **ddp_figures, "layers": list(layers), "model": name, "quick": args.quick})


if __name__ == "__main__":
    main()
