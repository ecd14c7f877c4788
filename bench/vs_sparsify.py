"""midisc's TopK step against EleutherAI sparsify's, and the dense baseline of sae_step.py, in one run.

Why: issue 7 puts the leading trainer's TopK step at 14,100 tokens/s on SmolLM2's shape and asks for 2× the
dense step. Figures from another day or machine do not compare, so this measures all three in one process,
alternating rounds. sparsify's step is what its Trainer does per batch: `SparseCoder(x)`, its FVU loss,
backward, `remove_gradient_parallel_to_decoder_directions`, Adam, `set_decoder_norm_to_unit_norm` (AuxK off
on every side, as no feature is dead at the start).

sparsify is not a midisc dependency: install it in a separate environment, with midisc beside it.

    python -m venv /tmp/sparsify-env && /tmp/sparsify-env/bin/pip install torch==2.13.0 eai-sparsify
    /tmp/sparsify-env/bin/pip install --no-deps -e . && /tmp/sparsify-env/bin/python bench/vs_sparsify.py
"""

from __future__ import annotations

import argparse
import statistics
from contextlib import nullcontext

import torch

from midisc.sae import TopKSAE

from output import add_device, result, table
from sae_step import EXPANSION, K, LR, DenseSAE, dense_step, midisc_step, tokens_per_second


def sparsify_step(d_in: int, device: str):
    try:
        from sparsify import SparseCoder, SparseCoderConfig
    except ImportError:
        raise SystemExit("sparsify is not installed here; see this script's docstring for a separate environment")
    coder = SparseCoder(d_in, SparseCoderConfig(expansion_factor=EXPANSION, k=K), device=device)
    opt = torch.optim.Adam(coder.parameters(), lr=LR)

    def step(x: torch.Tensor) -> None:
        coder(x).fvu.backward()
        coder.remove_gradient_parallel_to_decoder_directions()
        opt.step()
        opt.zero_grad()
        coder.set_decoder_norm_to_unit_norm()
    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_device(parser)
    parser.add_argument("--d-in", type=int, default=576, help="SmolLM2's d_model by default")
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=5, help="steps per timed round")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    sae = TopKSAE(args.d_in, EXPANSION, k=K, seed=0).to(args.device)
    steps = {"midisc": midisc_step(sae, nullcontext), "sparsify": sparsify_step(args.d_in, args.device),
             "dense": dense_step(DenseSAE(sae, K), nullcontext)}
    generator = torch.Generator().manual_seed(0)
    batches = [torch.randn(args.batch, args.d_in, generator=generator).to(args.device) for _ in range(2)]
    speeds: dict[str, list[float]] = {name: [] for name in steps}
    for step in steps.values():
        tokens_per_second(step, batches, 2, args.device)  # warm-up
    for _ in range(args.rounds):
        for name, step in steps.items():
            speeds[name].append(tokens_per_second(step, batches, args.steps, args.device))
    median = {name: statistics.median(values) for name, values in speeds.items()}
    rows = [{"trainer": name, "tok_s": median[name], "vs_dense": median[name] / median["dense"],
             "midisc_vs": median["midisc"] / median[name]} for name in steps]
    table(f"TopK k={K} step, d_in {args.d_in}, expansion {EXPANSION}, batch {args.batch}, Adam, on {args.device} "
          f"(torch threads {torch.get_num_threads()})",
          ["trainer", "tok/s", "vs dense", "midisc is ×"], [[r["trainer"], r["tok_s"], r["vs_dense"], r["midisc_vs"]]
                                                              for r in rows])
    result({"rows": rows, "device": args.device, "d_in": args.d_in, "batch": args.batch})


if __name__ == "__main__":
    main()
