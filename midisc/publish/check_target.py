"""What `verify` checks: a run's published folders and its records, read lazily, and how a check reports.

A check raises `Failure` (the reason it failed) or `Skipped` (why it cannot run here); the readers below
turn a missing or damaged file into a Failure naming it.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file
from midisc.run_folder import CFG_FILENAME, DECODER_FILENAME, MODEL_FILENAME, SPARSITY_FILENAME, WEIGHTS_FILENAME


PASS, FAIL, SKIP = "PASS", "FAIL", "SKIP"


class Failure(Exception):
    """Raised inside a check: the message is the reason it failed."""


class Skipped(Exception):
    """Raised inside a check that cannot run here: the message says why."""


@dataclass
class Check:
    name: str
    status: str
    reason: str


@dataclass
class Target:
    """What to verify: the run's folders and, when the run is in the database, its records."""

    output_dir: Path
    sae_dir: Path
    package_dir: Path | None = None
    dashboard_dir: Path | None = None
    expect_neuronpedia: bool = True
    run: dict[str, Any] | None = None       # training_runs row
    saved: dict[str, Any] | None = None     # its sae_models row
    features: list[dict[str, Any]] | None = None
    measure_fvu: Callable[[], tuple[float, int]] | None = None  # (FVU, tokens) on fresh activations
    db: str = ""                            # the ` --db …` a suggested command needs to read the run's database
    fvu_tolerance: float = 0.05

    # --- the files, read once ------------------------------------------------------------
    @cached_property
    def cfg(self) -> dict[str, Any]:
        return read_json(self.sae_dir / CFG_FILENAME)

    @cached_property
    def weights(self) -> dict[str, torch.Tensor]:
        return read_tensors(self.sae_dir / WEIGHTS_FILENAME)

    @cached_property
    def sparsity(self) -> torch.Tensor:
        found = read_tensors(self.sae_dir / SPARSITY_FILENAME)
        if "sparsity" not in found:
            raise Failure(f"{SPARSITY_FILENAME} has no 'sparsity' tensor (has {sorted(found)})")
        return found["sparsity"]

    def package_file(self, name: str) -> Path:
        if self.package_dir is None:
            raise Skipped("no Neuronpedia package folder (*_neuronpedia) next to the SAE")
        return self.package_dir / name

    @cached_property
    def decoder_npy(self) -> torch.Tensor:
        path = self.package_file(DECODER_FILENAME)
        try:
            return torch.from_numpy(np.load(path, allow_pickle=False))
        except (OSError, ValueError) as err:
            raise Failure(f"{path.name} does not load: {err}") from None

    @cached_property
    def model_pt(self) -> dict[str, torch.Tensor]:
        path = self.package_file(MODEL_FILENAME)
        try:
            saved = torch.load(path, map_location="cpu", weights_only=True)
            return dict(saved["state_dict"])
        except Exception as err:  # torch raises many kinds on a damaged pickle
            raise Failure(f"{path.name} does not load: {err}") from None

    def rows(self, relative: str) -> list[Any]:
        if self.dashboard_dir is None:
            raise Skipped("no dashboard export folder (exports/<model>/<source>/)")
        return read_jsonl(self.dashboard_dir / relative)


def read_json(path: Path) -> Any:
    if not path.is_file():
        raise Failure(f"{path} is missing")
    try:
        return json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise Failure(f"{path.name} is not valid JSON: {err}") from None


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise Failure(f"{path} is missing")
    try:
        return load_file(str(path))
    except Exception as err:  # safetensors raises its own error types on a damaged header
        raise Failure(f"{path.name} does not load: {err}") from None


def read_jsonl(path: Path) -> list[Any]:
    if not path.is_file():
        raise Failure(f"{path} is missing")
    try:
        data = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
        return [json.loads(line) for line in data.decode().splitlines() if line.strip()]
    except (OSError, ValueError, EOFError) as err:
        raise Failure(f"{path.name} does not parse: {err}") from None


def need_record(t: Target) -> None:
    if t.run is None or t.saved is None:
        raise Skipped("no database record for this folder (pass the run id, or --db for its database)")
