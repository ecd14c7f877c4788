"""Harvest throughput: `midisc.data.activations.harvest_contexts` against bare transformers forwards of the same batches.

Why: the README says the forward stops at the hooked layer (`midisc.data.lm.capture`), so harvesting block 8 of 30
costs about a third of a full forward, and filtering plus the copy to the CPU should add next to nothing.

- harvest: `harvest_contexts(model, model.model.layers[L], batch, ...)`, one batch of 32 contexts at a time,
  everything it does included (early-exit forward, keep mask, outlier filter, copy of kept rows to the CPU).
- truncated: the base model (`model.model`) with its block list cut to `layers[:L + 1]`, called directly:
  embeddings, L + 1 blocks and the final RMSNorm, no LM head. That is the cheapest honest bare forward that
  reaches block L; a config with num_hidden_layers = L + 1 sharing the weights runs the same modules, and
  `output_hidden_states` on it would only add bookkeeping. Its one extra RMSNorm costs next to nothing.
- full: `model(input_ids, output_hidden_states=True)`, every block and the LM head: the naive way to get a
  layer's activations from transformers.

Batches are timed round-robin, so a busy machine slows every variant alike. Tokens/s counts every position.

    python bench/harvest.py [--quick] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from midisc.data import corpus, lm, packing
from midisc.data.activations import harvest_contexts

import tiny
from output import add_device, result, table

REPO = Path(__file__).resolve().parents[1]
CONTEXT, BATCH = 128, 32           # tokens per context, contexts per forward (activations.lm_batch_size)
TARGET_TRUNCATED, TARGET_FULL = 0.95, 2.5  # harvest / truncated for every layer; harvest / full for the first


def smollm2(n_contexts: int):
    m = OmegaConf.load(REPO / "conf/model/smollm2.yaml")
    loaded = lm.load_model(m.name, gguf_package=m.gguf_package, gguf_file=m.gguf_file, device_map=None)
    data = OmegaConf.to_container(OmegaConf.load(REPO / "conf/data/bbc.yaml"))
    texts = corpus.train_heldout(data, seed=0, max_samples=max(40, n_contexts // 2)).train
    return loaded, texts, m.separator, (8, 15)


def tiny_llama(n_contexts: int, folder: Path):
    loaded = lm.load_model(str(tiny.build_model(folder, layers=8)), device_map=None)
    return loaded, tiny.make_texts(n_contexts * 2), None, (2, 4)


def timed(run, device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    run()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a tiny random Llama, a few batches (for tests)")
    add_device(parser)
    parser.add_argument("--batches", type=int, help="timed batches of 32 contexts (default 8 on cpu, 24 on cuda)")
    args = parser.parse_args()
    n_batches = args.batches or (2 if args.quick else 24 if args.device == "cuda" else 8)
    with tempfile.TemporaryDirectory() as tmp:
        loaded, texts, separator, layers = tiny_llama(BATCH * (n_batches + 1), Path(tmp)) if args.quick else \
            smollm2(BATCH * (n_batches + 1))
    model = loaded.model.to(args.device)
    sep, special = lm.special_token_ids(loaded.tokenizer, separator)
    contexts = packing.pack(texts, loaded.tokenizer, CONTEXT, sep)
    if len(contexts) < BATCH * (n_batches + 1):
        raise SystemExit(f"the texts gave only {len(contexts)} contexts of {CONTEXT}; need {BATCH * (n_batches + 1)}")
    batches = list(contexts.split(BATCH))[:n_batches + 1]
    base, blocks = model.model, model.model.layers

    def run_harvest(layer, tokens):
        return lambda: list(harvest_contexts(model, blocks[layer], tokens, special_ids=special, batch_contexts=BATCH))

    def run_truncated(layer, tokens):
        def run():
            base.layers = blocks[:layer + 1]
            try:
                base(input_ids=tokens.to(args.device), use_cache=False)
            finally:
                base.layers = blocks
        return run

    def run_full(tokens):
        return lambda: model(input_ids=tokens.to(args.device), use_cache=False, output_hidden_states=True)

    seconds = {"full": 0.0, **{(kind, layer): 0.0 for layer in layers for kind in ("harvest", "truncated")}}
    with torch.inference_mode():
        for i, tokens in enumerate(batches):  # batch 0 warms up every variant and is not counted
            runs = {"full": run_full(tokens)}
            for layer in layers:
                runs[("harvest", layer)] = run_harvest(layer, tokens)
                runs[("truncated", layer)] = run_truncated(layer, tokens)
            for key, run in runs.items():
                spent = timed(run, args.device)
                seconds[key] += spent if i else 0.0
    tokens = n_batches * BATCH * CONTEXT
    full = tokens / seconds["full"]
    rows = []
    for j, layer in enumerate(layers):
        harvest, truncated = tokens / seconds[("harvest", layer)], tokens / seconds[("truncated", layer)]
        ok = harvest / truncated >= TARGET_TRUNCATED and (j > 0 or harvest / full >= TARGET_FULL)
        rows.append({"layer": layer, "harvest_tok_s": harvest, "truncated_tok_s": truncated, "full_tok_s": full,
                     "vs_truncated": harvest / truncated, "vs_full": harvest / full, "pass": ok})
    name = "tiny random Llama" if args.quick else loaded.name
    table(f"harvest of {n_batches} batches x {BATCH} contexts x {CONTEXT} tokens, {name} "
          f"({lm.num_layers(model.config)} blocks) on {args.device}",
          ["layer", "harvest tok/s", "truncated tok/s", "full tok/s", "vs truncated", "vs full", "targets", "result"],
          [[r["layer"], r["harvest_tok_s"], r["truncated_tok_s"], r["full_tok_s"], r["vs_truncated"], r["vs_full"],
            f"≥ {TARGET_TRUNCATED}×" + (f", ≥ {TARGET_FULL}× full" if j == 0 else ""), r["pass"]]
           for j, r in enumerate(rows)])
    result({"rows": rows, "targets_met": all(r["pass"] for r in rows), "model": name, "device": args.device,
            "tokens": tokens})


if __name__ == "__main__":
    main()
