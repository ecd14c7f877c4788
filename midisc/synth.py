"""`python -m midisc.synth`: every architecture scored on activations made from a known sparse dictionary.

    python -m midisc.synth                               # 256 true features in R^64, every architecture
    python -m midisc.synth --sae topk,matryoshka --steps 3000 --json

Each SAE (the defaults of its conf/sae/*.yaml, as wide as the true dictionary, TopK-like ones at k = the true
mean number active) trains with the training loop midisc uses on real activations (SAEModule in Lightning)
on fresh samples each step, then is scored on held-out samples against the truth (analysis/ground_truth.py):
MCC of matched decoder directions, feature F1, FVU, L0. The same architecture at initialisation is the
random-dictionary baseline. It runs on the CPU in minutes.
"""

from __future__ import annotations

import argparse
import logging
import warnings
from collections.abc import Iterator
from pathlib import Path

import lightning as L
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from torch.utils.data import DataLoader, IterableDataset
from tqdm.auto import tqdm

from midisc.analysis.ground_truth import GroundTruth, feature_f1, make_ground_truth, match, sample
from midisc.analysis.metrics import fvu, l0
from midisc.cli import UsageError, make_console, make_table, print_json, run_tool
from midisc.training.module import SAEModule

CONF = Path(__file__).resolve().parents[1] / "conf"
ARCHITECTURES = ("topk", "batchtopk", "matryoshka", "relu", "jumprelu", "gated")


class Samples(IterableDataset):
    """`steps` fresh batches [batch, d] of the synthetic data: an SAE never sees a sample twice."""

    def __init__(self, truth: GroundTruth, steps: int, batch: int, seed: int) -> None:
        self.truth, self.steps, self.batch, self.seed = truth, steps, batch, seed

    def __iter__(self) -> Iterator[torch.Tensor]:
        generator = torch.Generator().manual_seed(self.seed)
        for _ in range(self.steps):
            yield sample(self.truth, self.batch, generator)[0]

    def __len__(self) -> int:
        return self.steps


def build(arch: str, d: int, width: int, k: int, seed: int) -> tuple[torch.nn.Module, dict]:
    """The architecture's SAE with its conf/sae defaults (k set to the true mean active), and the optimizer's."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[f"sae={arch}"])
    settings = {key: value for key, value in cfg.sae.items() if key not in ("expansion", "kind", "skip")}
    if "k" in settings:
        settings["k"] = k
    sae = instantiate(settings, d_in=d, expansion=width // d, seed=seed)
    return sae, cfg


def score(sae: torch.nn.Module, truth: GroundTruth, x: torch.Tensor, active: torch.Tensor) -> dict[str, float]:
    with torch.no_grad():
        sae.eval()
        out = sae(x)
    latent, cosine = match(sae.W_dec.detach(), truth.directions)
    return {"mcc": float(cosine.mean()), "f1": float(feature_f1(out.codes, active, latent).mean()),
            "fvu": float(fvu(x, out.x_hat)), "l0": float(l0(out.codes))}


def train_and_score(arch: str, truth: GroundTruth, heldout: tuple[torch.Tensor, torch.Tensor], *, steps: int,
                    batch: int, k: int, seed: int) -> dict:
    d = truth.directions.shape[1]
    sae, cfg = build(arch, d, truth.n_features, k, seed)
    baseline = score(sae, truth, *heldout)  # at initialisation: a random dictionary
    sae.train()
    module = SAEModule(sae, instantiate(cfg.optimizer), b_dec_init=cfg.b_dec_init, dead_window=20 * batch,
                       normalize_input=cfg.normalize_input, **cfg.schedule)
    trainer = L.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu", log_every_n_steps=50)
    trainer.fit(module, DataLoader(Samples(truth, steps, batch, seed + 1), batch_size=None))
    module.fold_input_scale()
    return {"sae": arch, **score(module.sae, truth, *heldout),
            **{f"random_{key}": value for key, value in baseline.items() if key in ("mcc", "f1")}}


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m midisc.synth", description=__doc__.split("\n")[0])
    parser.add_argument("--sae", default=",".join(ARCHITECTURES),
                        help=f"architectures, comma-separated (default: all: {','.join(ARCHITECTURES)})")
    parser.add_argument("--features", type=int, default=256, help="true features, and the SAEs' width (256)")
    parser.add_argument("--d", type=int, default=64, help="dimension of the activations (64)")
    parser.add_argument("--active", type=float, default=4.0, help="true features active per sample, on average (4)")
    parser.add_argument("--steps", type=int, default=1000, help="training steps per SAE (1000)")
    parser.add_argument("--batch", type=int, default=1024, help="samples per step (1024)")
    parser.add_argument("--heldout", type=int, default=20_000, help="held-out samples scored (20,000)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    return parser.parse_args(argv)


def check(args: argparse.Namespace) -> list[str]:
    chosen = [a.strip() for a in args.sae.split(",") if a.strip()]
    unknown = [a for a in chosen if a not in ARCHITECTURES]
    if unknown or not chosen:
        raise UsageError(f"--sae {args.sae!r}: unknown {', '.join(unknown) or 'empty'}; choose from "
                         f"{', '.join(ARCHITECTURES)}")
    for name in ("features", "d", "steps", "batch", "heldout"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.features % args.d:
        raise UsageError(f"--features {args.features} must be a multiple of --d {args.d} (the SAEs' expansion)")
    if not 0 < args.active < args.features:
        raise UsageError(f"--active must be between 0 and --features ({args.features}), got {args.active}")
    return chosen


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    chosen = check(args)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*(does not have many workers|IterableDataset|LeafSpec|val_dataloader).*")
    truth = make_ground_truth(args.features, args.d, mean_active=args.active, seed=args.seed)
    heldout = sample(truth, args.heldout, torch.Generator().manual_seed(args.seed + 10_000))
    rows = [train_and_score(arch, truth, heldout, steps=args.steps, batch=args.batch,
                            k=max(1, round(args.active)), seed=args.seed)
            for arch in tqdm(chosen, desc="architectures", unit="SAE", disable=None if not args.json else True)]
    if args.json:
        print_json({"features": args.features, "d": args.d, "active": args.active, "steps": args.steps,
                    "rows": rows})
        return 0
    console = make_console()
    table = make_table(console, "sae", "MCC", "random MCC", "feature F1", "random F1", "FVU", "L0",
                       right=("MCC", "random MCC", "feature F1", "random F1", "FVU", "L0"),
                       title=f"{args.features} true features in R^{args.d}, {args.active:g} active on average, "
                             f"{args.steps:,} steps of {args.batch:,}")
    for row in rows:
        table.add_row(row["sae"], *(f"{row[key]:.3f}" for key in ("mcc", "random_mcc", "f1", "random_f1", "fvu")),
                      f"{row['l0']:.1f}")
    console.print(table)
    return 0


if __name__ == "__main__":
    run_tool(main)
