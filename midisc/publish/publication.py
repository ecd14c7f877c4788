"""What a run publishes, gathered into one plain `Publication`, and the names its folders share."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from midisc.analysis import profiles
from midisc.analysis.profiles import Histograms, OutputEffects
from midisc.sae import SparseAutoencoder
from midisc.run_folder import EXPORTS_FOLDER, PACKAGE_SUFFIX

# A few held-out vectors and the SAE's outputs on them at the end of training: `verify` reloads the
# published folder and must reproduce them.
PROBE_VECTORS = 64


@dataclass
class FeatureTable:
    """One value per feature, measured over `n_tokens` analysed tokens."""

    frequency: list[float]                # fraction of tokens the feature fires on
    mean_activation: list[float | None]   # when firing; None if it never fired
    max_activation: list[float | None]
    is_dead: list[bool]                   # dead during training (no firing in the dead window)
    n_tokens: int

    @classmethod
    def of(cls, frequency: Sequence[float | None], mean_activation: Sequence[float], max_activation: Sequence[float],
           is_dead: Sequence[bool], n_tokens: int) -> FeatureTable:
        """From stored or measured columns; mean and max mean nothing (None) for a feature that never fired."""
        fired = [bool(f) for f in frequency]
        return cls(frequency=[f or 0.0 for f in frequency],
                   mean_activation=[m if f else None for m, f in zip(mean_activation, fired)],
                   max_activation=[m if f else None for m, f in zip(max_activation, fired)],
                   is_dead=[bool(d) for d in is_dead], n_tokens=int(n_tokens))


@dataclass
class Publication:
    sae: SparseAutoencoder       # on raw activations: any input normalisation already folded in
    run_id: int | None
    model: str                   # the model name as configured (hub id, path or bundled name)
    hook: str                    # module path of the hooked activations
    layer: int | None
    site: str                    # resid | mlp | attn | a raw hook
    n_layers: int
    metadata: dict[str, Any]     # SAELens cfg.json metadata: context size, BOS, dataset…
    settings: dict[str, Any]     # how it was trained: SAE hyperparameters, optimizer, batch, epochs…
    metrics: dict[str, float]    # final held-out metrics
    features: FeatureTable
    examples: list[dict[str, Any]] = field(default_factory=list)  # feature_examples rows
    activation_histograms: Histograms | None = None
    outputs: OutputEffects | None = None
    output_tokens: tuple[list[list[str]], list[list[str]]] | None = None  # (promoted, suppressed) texts
    similar: tuple[torch.Tensor, torch.Tensor] | None = None      # (indices, cosines) [d_sae, n]
    set_name: str | None = None  # Neuronpedia source-set name; derived from site, SAE and run when None

    @property
    def name(self) -> str:
        return f"run-{self.run_id}" if self.run_id is not None else "sae"


def run_info(config: dict[str, Any], hook: str, n_layers: int) -> dict[str, Any]:
    """The Publication fields known from a run's resolved config (plain data) before training ends."""
    m, data = config["model"], config["data"]
    dataset = {"bundled": f"{data.get('package')}/{data.get('subdir')}", "local": str(data.get("path")),
               "hf": str(data.get("name"))}.get(data["source"], data["source"])
    metadata = {"model_name": m["name"], "hook_name": hook, "hook_head_index": None,
                "context_size": config["context_size"], "prepend_bos": bool(m.get("prepend_bos")),
                "dataset_path": dataset, "seqpos_slice": [1, None], "exclude_special_tokens": True,
                "sequence_separator_token": m.get("separator")}
    keys = ("layer", "seed", "max_samples", "context_size", "batch_size", "epochs", "dead_window", "b_dec_init")
    settings = {"sae": config["sae"], "optimizer": config["optimizer"], **{key: config.get(key) for key in keys},
                "outlier_factor": config["activations"]["outlier_factor"]}
    raw = m.get("hook") is not None
    return dict(model=m["name"], hook=hook, layer=None if raw else config["layer"], site="hook" if raw else m["site"],
                n_layers=n_layers, metadata=metadata, settings=settings)


@torch.no_grad()
def write_probe(sae: SparseAutoencoder, x: torch.Tensor, path: Path) -> Path:
    from safetensors.torch import save_file

    x = x[:PROBE_VECTORS].to(sae.W_dec.device, torch.float32)
    out = sae(x)
    tensors = {"x": x, "codes": out.codes, "x_hat": out.x_hat}
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(path))
    return Path(path)


def slug(text: str) -> str:
    """Neuronpedia ids: lowercase letters, digits, '-' and '_' only."""
    return re.sub(r"[^a-z0-9_-]+", "-", text.lower()).strip("-") or "model"


def model_id(model: str) -> str:
    """`HuggingFaceTB/SmolLM2-135M-Instruct`, a local folder or a bundled name -> `smollm2-135m-instruct`."""
    return slug(Path(model.rstrip("/")).name)


def layer_number(pub: Publication) -> int:
    if pub.layer is not None:
        return pub.layer
    found = re.search(r"\d+", pub.hook)  # a raw hook like model.layers.3.mlp.down_proj
    return int(found.group()) if found else 0


def set_name(pub: Publication) -> str:
    if pub.set_name:
        return slug(pub.set_name).replace("__", "_")
    sae = pub.sae
    arch = f"{sae.architecture}{sae.k}" if hasattr(sae, "k") else sae.architecture  # topk32, batchtopk32
    run = f"-r{pub.run_id}" if pub.run_id is not None else ""
    return slug(f"{pub.site}-midisc-{arch}-{sae.d_sae}{run}").replace("__", "_")


def source_id(pub: Publication) -> str:
    return f"{layer_number(pub)}-{set_name(pub)}"


def dashboard_dir(output_dir: Path, pub: Publication) -> Path:
    return Path(output_dir) / EXPORTS_FOLDER / model_id(pub.model) / source_id(pub)


def package_dir(output_dir: Path, pub: Publication) -> Path:
    return Path(output_dir) / f"{pub.name}{PACKAGE_SUFFIX}"


def add_profiles(pub: Publication, batches: Sequence[torch.Tensor], unembed: torch.Tensor | None,
                 decode: Callable[[Sequence[int]], list[str]], *, n_tokens: int = 10) -> Publication:
    """Fill in what the dashboards show beyond statistics: activation histograms (over `batches`, raw
    activations [n, d_in]), output tokens through `unembed` [vocab, d_out] and similar features."""
    pub.activation_histograms = profiles.activation_histograms(pub.sae, batches)
    if unembed is not None and unembed.shape[1] == pub.sae.d_out:  # else the decoder does not write residual width
        pub.outputs = profiles.output_effects(pub.sae.W_dec.detach(), unembed, n=n_tokens)
        pub.output_tokens = (profiles.token_lists(pub.outputs.top_ids, decode),
                             profiles.token_lists(pub.outputs.bottom_ids, decode))
    pub.similar = profiles.similar_features(pub.sae.W_dec.detach())
    return pub
