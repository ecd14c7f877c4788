"""Load a saved SAE from a SAELens v6 folder (cfg.json + sae_weights.safetensors), whatever its architecture."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from midisc.sae.base import CFG_FILENAME, WEIGHTS_FILENAME, SparseAutoencoder
from midisc.sae.gated import GatedSAE
from midisc.sae.jumprelu import JumpReLUSAE
from midisc.sae.relu import ReluSAE
from midisc.sae.topk import TopKSAE
from midisc.sae.transcoder import SAVED_TRANSCODERS

__all__ = ["CFG_FILENAME", "WEIGHTS_FILENAME", "SAVED_ARCHITECTURES", "SAEFileError", "load_sae"]

# The architectures cfg.json may name; BatchTopK and Matryoshka BatchTopK are saved as JumpReLU with one shared
# threshold, their training settings (k, matryoshka_widths) kept in cfg.json for the record only.
SAVED_ARCHITECTURES = ("standard", "topk", "jumprelu", "gated", *SAVED_TRANSCODERS)

# cfg.json settings that would change the maths; we implement only these values, so refuse others
# instead of silently computing something different from SAELens. Missing keys mean the default.
_SUPPORTED_CFG = {
    "apply_b_dec_to_input": True,
    "normalize_activations": "none",
    "reshape_activations": "none",
    "rescale_acts_by_decoder_norm": False,
}


class SAEFileError(ValueError):
    """A saved SAE's weights file exists but cannot be read; the message names the file."""


def load_sae(folder: str | Path, device: str = "cpu") -> SparseAutoencoder:
    """Rebuild an SAE from a SAELens-layout folder; returns it on `device`, in eval mode."""
    folder = Path(folder)
    cfg_path, weights_path = folder / CFG_FILENAME, folder / WEIGHTS_FILENAME
    if not folder.is_dir():
        raise FileNotFoundError(f"no SAE folder at {folder}")
    for path in (cfg_path, weights_path):
        if not path.is_file():
            raise FileNotFoundError(f"SAE folder {folder} has no {path.name} (looked for {path})")
    cfg = json.loads(cfg_path.read_text())

    arch = cfg.get("architecture")
    if arch not in SAVED_ARCHITECTURES:
        raise ValueError(
            f"unknown SAE architecture {arch!r} in {cfg_path}; valid: {', '.join(map(repr, SAVED_ARCHITECTURES))}"
        )
    transcoder = arch in SAVED_TRANSCODERS
    for key, supported in _SUPPORTED_CFG.items():
        if key == "apply_b_dec_to_input" and transcoder:
            supported = False  # b_dec is in the output space (SAELens refuses True for a transcoder)
        if cfg.get(key, supported) != supported:
            raise ValueError(f"{key}={cfg[key]!r} in {cfg_path} is not supported; only {supported!r}")
    required = ("d_in", "d_sae") + (("k",) if arch == "topk" else ()) + (("d_out",) if transcoder else ())
    missing = [key for key in required if key not in cfg]
    if missing:
        raise ValueError(f"{cfg_path} lacks required key(s) {', '.join(missing)}")

    d_in, d_sae = int(cfg["d_in"]), int(cfg["d_sae"])
    # SAELens stores the width, not the expansion; recover it when d_sae is a whole multiple.
    expansion = max(1, d_sae // d_in)
    if transcoder:
        cls, skip = SAVED_TRANSCODERS[arch]
        record = {} if arch.startswith("jumprelu") else {"l1_coef": l1_coefficient(cfg)}
        sae: SparseAutoencoder = cls(d_in, expansion, d_sae=d_sae, d_out=int(cfg["d_out"]), skip=skip, **record)
    elif arch == "topk":
        sae = TopKSAE(d_in, expansion, k=int(cfg["k"]), d_sae=d_sae)
    elif arch == "standard":
        sae = ReluSAE(d_in, expansion, l1_coef=l1_coefficient(cfg), d_sae=d_sae)
    elif arch == "gated":
        sae = GatedSAE(d_in, expansion, l1_coef=l1_coefficient(cfg), d_sae=d_sae)
    else:  # jumprelu: everything inference needs (the thresholds) comes with the weights
        sae = JumpReLUSAE(d_in, expansion, d_sae=d_sae)

    try:
        tensors = load_file(str(weights_path))
    except Exception as error:  # safetensors' own SafetensorError on a damaged header, OSError on a short file
        reason = " ".join(str(error).split())[:160] or type(error).__name__
        raise SAEFileError(f"{weights_path} cannot be read ({reason}): it is damaged or cut short") from None
    state = {name: t.to(torch.float32) for name, t in tensors.items()}
    sae.load_tensors(state)
    return sae.to(device).eval()


def l1_coefficient(cfg: dict) -> float:
    """The training L1 coefficient a cfg.json keeps for the record (in metadata: see ReluSAE.cfg_dict); 0 if none."""
    return float((cfg.get("metadata") or {}).get("l1_coefficient", 0.0))
