"""The SAELens v6 folder: cfg.json, sae_weights.safetensors and sparsity.safetensors.

`SAE.load_from_disk(folder)` in SAELens gives the same outputs as midisc's `load_sae(folder)`: the
parameter names, shapes and cfg keys are SAELens's own, and the weights work on raw activations.
"""

from __future__ import annotations

import json
import math
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import save_file

from midisc.run_folder import CFG_FILENAME, SPARSITY_FILENAME

if TYPE_CHECKING:
    from midisc.publish.publication import Publication

# SAELens reads a cfg.json without metadata.sae_lens_version as a pre-6.0 file and rebuilds its metadata
# from top-level keys, losing ours; this marks the layout version we write (SAELens 6.54 loads it).
SAELENS_FORMAT = "6.0.0"
# SAELens adds this before log10 so that features that never fire get a finite density.
_DENSITY_EPS = 1e-10


def midisc_version() -> str:
    try:
        return version("midisc")
    except PackageNotFoundError:
        return "unknown"


def log10_density(frequency: list[float]) -> torch.Tensor:
    return torch.log10(torch.tensor(frequency, dtype=torch.float32) + _DENSITY_EPS)


def cfg_metadata(pub: Publication) -> dict[str, Any]:
    from midisc.publish.publication import model_id, source_id

    return {**pub.metadata, "model_class_name": "AutoModelForCausalLM", "sae_lens_version": SAELENS_FORMAT,
            "sae_lens_training_version": None, "midisc_version": midisc_version(), "midisc_run_id": pub.run_id,
            "neuronpedia_id": f"{model_id(pub.model)}/{source_id(pub)}"}


def write(pub: Publication, folder: Path, *, weights: bool = True) -> Path:
    """Write the folder; with weights=False only cfg.json and the sparsity file are (re)written."""
    folder = Path(folder)
    if weights:
        pub.sae.save(folder, cfg_metadata(pub))
    else:
        folder.mkdir(parents=True, exist_ok=True)
        cfg = pub.sae.cfg_dict(cfg_metadata(pub))
        (folder / CFG_FILENAME).write_text(json.dumps(cfg, indent=2) + "\n")
    density = log10_density(pub.features.frequency)
    if len(density) != pub.sae.d_sae or not all(math.isfinite(v) for v in density.tolist()):
        raise ValueError(f"feature densities: expected {pub.sae.d_sae} finite values, got {len(density)}")
    save_file({"sparsity": density}, str(folder / SPARSITY_FILENAME))
    return folder
