"""SAE training-step throughput: midisc's ReLU and TopK SAEs against a plain dense PyTorch step.

Why: the README claims TopK trains with a sparse decoder (an embedding bag over each token's k rows) that
beats the dense sums, and ReLU must cost no more than the textbook step. Both sides start from the same
weights, see the same batches and take the same optimizer; the only difference is how the loss and its
gradients are computed.

- midisc: `out = sae(x); out.loss.backward(); sae.remove_parallel_grad(); opt.step(); opt.zero_grad();
  sae.normalize_decoder()`, what SAEModule does per step (AuxK is left out: it runs only once features die).
- dense baseline, written here: encoder matmul, ReLU (or topk + scatter into dense codes), dense decoder
  matmul, MSE (+ the same decoder-norm-weighted L1), backward, the same decoder-norm upkeep, Adam step.

Rounds alternate the two sides so a busy machine slows both alike; each figure is the median over rounds.
Every size runs in float32 and under bf16 autocast (on a CPU too: those with bf16 instructions gain from it);
the last column is what autocast buys midisc's step. Whether bf16 keeps the FVU is bench/precision.py's question.

    python bench/sae_step.py [--quick] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import statistics
import time
from contextlib import nullcontext

import torch
from torch import nn

from midisc.sae import ReluSAE, SparseAutoencoder, TopKSAE

from output import add_device, result, table

EXPANSION, K, L1_COEF, LR = 8, 32, 1e-3, 1e-3  # conf/sae/{topk,relu}.yaml and conf/optimizer/adam.yaml
TARGETS = {"relu": 1.0, "topk": 2.0}  # minimum midisc / dense throughput


class DenseSAE(nn.Module):
    """The textbook SAE step, its parameters copied from a midisc SAE so both start from the same weights."""

    def __init__(self, sae: SparseAutoencoder, k: int | None) -> None:
        super().__init__()
        for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
            setattr(self, name, nn.Parameter(getattr(sae, name).detach().clone()))
        self.k = k

    def loss(self, x: torch.Tensor) -> torch.Tensor:
        pre = (x - self.b_dec) @ self.W_enc + self.b_enc  # [B, d_sae]
        if self.k is None:
            codes = torch.relu(pre)
        else:
            top = pre.topk(self.k, dim=-1)
            codes = torch.zeros_like(pre).scatter(-1, top.indices, torch.relu(top.values))
        x_hat = codes @ self.W_dec + self.b_dec
        mse = (x_hat - x).pow(2).mean()
        if self.k is not None:
            return mse
        return mse + L1_COEF * (codes * self.W_dec.norm(dim=1)).sum(-1).mean()

    @torch.no_grad()
    def drop_parallel_grad(self) -> None:
        rows = self.W_dec / self.W_dec.norm(dim=1, keepdim=True)
        self.W_dec.grad -= (self.W_dec.grad * rows).sum(1, keepdim=True) * rows

    @torch.no_grad()
    def normalize(self) -> None:
        self.W_dec /= self.W_dec.norm(dim=1, keepdim=True)


def midisc_step(sae: SparseAutoencoder, autocast):
    opt = torch.optim.Adam(sae.parameters(), lr=LR)

    def step(x: torch.Tensor) -> None:
        with autocast():
            out = sae(x)
        out.loss.backward()
        sae.remove_parallel_grad()
        opt.step()
        opt.zero_grad()
        sae.normalize_decoder()
    return step


def dense_step(dense: DenseSAE, autocast):
    opt = torch.optim.Adam(dense.parameters(), lr=LR)

    def step(x: torch.Tensor) -> None:
        with autocast():
            loss = dense.loss(x)
        loss.backward()
        dense.drop_parallel_grad()
        opt.step()
        opt.zero_grad()
        dense.normalize()
    return step


def tokens_per_second(step, batches: list[torch.Tensor], n: int, device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for i in range(n):
        step(batches[i % len(batches)])
    if device == "cuda":
        torch.cuda.synchronize()
    return n * len(batches[0]) / (time.perf_counter() - start)


def measure(arch: str, d_in: int, bf16: bool, args) -> dict:
    row = {"arch": arch, "d_in": d_in, "d_sae": EXPANSION * d_in, "dtype": "bf16-autocast" if bf16 else "float32"}
    # Built on the CPU (its seeded generator is a CPU one), then moved, as training does.
    sae = (TopKSAE(d_in, EXPANSION, k=K, seed=0) if arch == "topk" else
           ReluSAE(d_in, EXPANSION, l1_coef=L1_COEF, seed=0)).to(args.device)
    dense = DenseSAE(sae, K if arch == "topk" else None)
    generator = torch.Generator().manual_seed(0)
    batches = [torch.randn(args.batch, d_in, generator=generator).to(args.device) for _ in range(2)]
    autocast = (lambda: torch.autocast(args.device, dtype=torch.bfloat16)) if bf16 else nullcontext
    steps = {"midisc": midisc_step(sae, autocast), "dense": dense_step(dense, autocast)}
    speeds: dict[str, list[float]] = {name: [] for name in steps}
    try:
        for name, step in steps.items():
            tokens_per_second(step, batches, args.warmup, args.device)
        for _ in range(args.rounds):
            for name, step in steps.items():
                speeds[name].append(tokens_per_second(step, batches, args.steps, args.device))
    except RuntimeError as err:  # e.g. an op refusing bf16 under autocast: a finding, not a crash
        return {**row, "error": str(err).splitlines()[0][:200], "target": TARGETS[arch], "pass": False}
    midisc, base = statistics.median(speeds["midisc"]), statistics.median(speeds["dense"])
    return {**row, "midisc_tok_s": midisc, "dense_tok_s": base, "ratio": midisc / base, "target": TARGETS[arch],
            "pass": midisc / base >= TARGETS[arch]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, a few seconds (for tests)")
    add_device(parser)
    args = parser.parse_args()
    on_gpu = args.device == "cuda"
    if args.quick:
        sizes, args.batch, args.warmup, args.steps, args.rounds = (32, 64), 256, 1, 2, 1
    else:
        sizes, args.batch, args.warmup = (576, 1024, 2560) if on_gpu else (576, 1024), 4096, 3
        args.steps, args.rounds = (20, 5) if on_gpu else (5, 3)
    rows = [measure(arch, d_in, bf16, args) for bf16 in (False, True) for d_in in sizes for arch in ("relu", "topk")]
    float32 = {(r["arch"], r["d_in"]): r.get("midisc_tok_s") for r in rows if r["dtype"] == "float32"}
    for r in rows:  # what bf16 autocast buys midisc's own step
        base = float32[r["arch"], r["d_in"]]
        r["vs_float32"] = r["midisc_tok_s"] / base if base and r.get("midisc_tok_s") else None
    table(f"SAE training step, batch {args.batch}, expansion {EXPANSION}, k={K}, on {args.device} "
          f"(torch threads {torch.get_num_threads()})",
          ["arch", "d_in", "d_sae", "dtype", "midisc tok/s", "dense tok/s", "ratio", "target", "result",
           "midisc vs float32"],
          [[r["arch"], r["d_in"], r["d_sae"], r["dtype"], r.get("midisc_tok_s"), r.get("dense_tok_s"),
            r.get("ratio", r.get("error")), f"≥ {r['target']}×", r["pass"], r["vs_float32"]] for r in rows])
    result({"rows": rows, "targets_met": all(r["pass"] for r in rows), "device": args.device, "batch": args.batch})


if __name__ == "__main__":
    main()
