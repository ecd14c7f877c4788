"""The Neuronpedia package `<run>_neuronpedia/`: the files researchers hand over with an SAE.

    neuronpedia_metadata.json   model, layer, hook, width, architecture, training settings, metrics
    decoder_weights.npy         float32 [d_sae, d_in], one feature direction per row
    feature_analysis.json       per feature: frequency, log10 density, mean/max activation, dead flag,
                                and the output tokens it promotes and suppresses most
    sae_model.pt                {"cfg": SAELens cfg dict, "state_dict": the tensors of sae_weights.safetensors}
"""

from __future__ import annotations

import json
import math
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from midisc.run_folder import ANALYSIS_FILENAME, DECODER_FILENAME, METADATA_FILENAME, MODEL_FILENAME

if TYPE_CHECKING:
    from midisc.publish.publication import Publication

PACKAGE_FILES = (METADATA_FILENAME, DECODER_FILENAME, ANALYSIS_FILENAME, MODEL_FILENAME)


def _number(value: float | None) -> float | None:
    """JSON has no NaN or inf: a missing or non-finite value is null."""
    return None if value is None or not math.isfinite(value) else float(value)


def metadata(pub: Publication) -> dict[str, Any]:
    from midisc.publish import saelens
    from midisc.publish.publication import model_id, set_name, source_id

    sae = pub.sae
    return {"model": pub.model, "neuronpedia_model_id": model_id(pub.model), "layer": pub.layer, "hook": pub.hook,
            "site": pub.site, "source_id": source_id(pub), "set_name": set_name(pub), "width": sae.d_sae,
            "d_in": sae.d_in, "architecture": sae.architecture, "hyperparameters": sae.hparams(),
            "training": pub.settings, "metrics": {k: _number(v) for k, v in pub.metrics.items()},
            "dataset": pub.metadata.get("dataset_path"), "context_size": pub.metadata.get("context_size"),
            "analysed_tokens": pub.features.n_tokens, "dead_features": sum(pub.features.is_dead),
            "run_id": pub.run_id, "midisc_version": saelens.midisc_version(),
            "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def feature_analysis(pub: Publication) -> dict[str, Any]:
    from midisc.publish.saelens import log10_density

    table = pub.features
    density = log10_density(table.frequency).tolist()
    rows = []
    for i in range(pub.sae.d_sae):
        row = {"index": i, "frequency": _number(table.frequency[i]), "log10_density": round(density[i], 6),
               "mean_activation": _number(table.mean_activation[i]), "max_activation": _number(table.max_activation[i]),
               "is_dead": bool(table.is_dead[i])}
        if pub.outputs is not None and pub.output_tokens is not None:
            row.update(promoted_tokens=pub.output_tokens[0][i],
                       promoted_values=[round(v, 5) for v in pub.outputs.top_values[i].tolist()],
                       suppressed_tokens=pub.output_tokens[1][i],
                       suppressed_values=[round(v, 5) for v in pub.outputs.bottom_values[i].tolist()])
        rows.append(row)
    return {"d_sae": pub.sae.d_sae, "analysed_tokens": table.n_tokens, "dead_features": sum(table.is_dead),
            "features": rows}


def write(pub: Publication, folder: Path) -> Path:
    from midisc.publish import saelens

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / METADATA_FILENAME).write_text(json.dumps(metadata(pub), indent=2, allow_nan=False) + "\n")
    np.save(folder / DECODER_FILENAME, pub.sae.W_dec.detach().to("cpu", torch.float32).numpy())
    (folder / ANALYSIS_FILENAME).write_text(json.dumps(feature_analysis(pub), allow_nan=False) + "\n")
    cfg = pub.sae.cfg_dict(saelens.cfg_metadata(pub))
    torch.save({"cfg": cfg, "state_dict": pub.sae.cpu_tensors()}, folder / MODEL_FILENAME)
    return folder
