"""Neuronpedia dashboard files, in the layout its importer reads (`exports/<model>/<layer>-<set>/`).

Field names follow Neuronpedia's database (apps/webapp/prisma/schema.prisma in hijohnnylin/neuronpedia)
and SAEDashboard's writer (sae_dashboard/neuronpedia/neuronpedia_export.py), which its importer
(apps/webapp/app/api/admin/import/route.ts) inserts as they are:

    release.jsonl, model.jsonl, sourceset.jsonl, source.jsonl   one row each, plain JSON lines
    features/batch-N.jsonl.gz     one row per feature (table Neuron), features N*B .. N*B+B-1
    activations/batch-N.jsonl.gz  one row per example context of those features (table Activation)

Rules the importer imposes, kept here: it takes the column list from the first line of each file, so
every line has the same keys; `layer` holds the source id ("15-res-…"), not the layer number; `index`
is text; array columns are [] rather than null; an activation needs its own unique `id` (ours are
derived from model, source, feature, kind and rank, so importing twice does not duplicate rows).
"""

from __future__ import annotations

import gzip
import hashlib
import json
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from midisc.publish.publication import Publication

# Neuronpedia's seeded "bot" user, which SAEDashboard also uses when no creator is given.
BOT_CREATOR_ID = "clkht01d40000jv08hvalcvly"
META_FILES = ("release.jsonl", "model.jsonl", "sourceset.jsonl", "source.jsonl")

# The fields each batch row must carry, with their JSON types; `verify` checks every line against these.
FEATURE_FIELDS: dict[str, type | tuple[type, ...]] = {
    "modelId": str, "layer": str, "index": str, "sourceSetName": str, "creatorId": str,
    "maxActApprox": (int, float), "frac_nonzero": (int, float), "hookName": str,
    "pos_str": list, "pos_values": list, "neg_str": list, "neg_values": list,
    "freq_hist_data_bar_heights": list, "freq_hist_data_bar_values": list,
    "logits_hist_data_bar_heights": list, "logits_hist_data_bar_values": list,
    "topkCosSimIndices": list, "topkCosSimValues": list,
    "neuron_alignment_indices": list, "neuron_alignment_values": list, "neuron_alignment_l1": list,
}
ACTIVATION_FIELDS: dict[str, type | tuple[type, ...]] = {
    "id": str, "modelId": str, "layer": str, "index": str, "creatorId": str, "tokens": list, "values": list,
    "maxValue": (int, float), "maxValueTokenIndex": int, "minValue": (int, float),
    "binMin": (int, float), "binMax": (int, float), "binContains": (int, float), "qualifyingTokenIndex": int,
    "dfaValues": list, "lossValues": list,
}


def _round(values: list[float], digits: int = 5) -> list[float]:
    return [round(float(v), digits) for v in values]


@dataclass(frozen=True)
class Names:
    """The ids every row repeats, worked out once per export rather than once per row."""

    model: str   # Neuronpedia model id
    set: str     # source-set name
    source: str  # source id, "<layer>-<set>"

    @classmethod
    def of(cls, pub: Publication) -> Names:
        from midisc.publish.publication import model_id, set_name, source_id

        return cls(model=model_id(pub.model), set=set_name(pub), source=source_id(pub))


def metadata_rows(pub: Publication, names: Names, now: str) -> dict[str, dict[str, Any]]:
    from midisc.publish.publication import layer_number

    model, name, source = names.model, names.set, names.source
    sae = pub.sae
    title = f"midisc {sae.architecture} SAE, {sae.d_sae} features, {pub.model} {pub.hook}"
    release = {"name": f"{model}-{name}", "description": title, "descriptionShort": title, "creatorName": "midisc",
               "creatorNameShort": "midisc", "creatorId": BOT_CREATOR_ID, "visibility": "PUBLIC", "isNewUi": False,
               "featured": False, "urls": [], "defaultUmapSourceIds": [], "createdAt": now}
    model_row = {"id": model, "displayName": pub.model, "displayNameShort": model, "creatorId": BOT_CREATOR_ID,
                 "instruct": "instruct" in model or model.endswith("-it"), "dimension": sae.d_in,
                 "layers": pub.n_layers, "neuronsPerLayer": sae.d_in, "owner": "", "visibility": "PUBLIC",
                 "inferenceEnabled": False, "createdAt": now, "updatedAt": now}
    sourceset = {"modelId": model, "name": name, "creatorId": BOT_CREATOR_ID, "creatorName": "midisc",
                 "description": f"{pub.site} {sae.architecture} SAE, {sae.d_sae} features", "type": "sae",
                 "hasDashboards": True, "visibility": "PUBLIC", "releaseName": release["name"], "urls": [],
                 "createdAt": now}
    source = {"id": source, "modelId": model, "setName": name, "creatorId": BOT_CREATOR_ID, "hasDashboards": True,
              "visibility": "PUBLIC", "inferenceEnabled": False, "dataset": str(pub.metadata.get("dataset_path")),
              "num_tokens_in_prompt": int(pub.metadata.get("context_size") or 0),
              "notes": f"layer {layer_number(pub)}, hook {pub.hook}, trained with midisc", "createdAt": now}
    return {"release.jsonl": release, "model.jsonl": model_row, "sourceset.jsonl": sourceset, "source.jsonl": source}


def feature_row(pub: Publication, names: Names, i: int, now: str) -> dict[str, Any]:
    hist, outputs = pub.activation_histograms, pub.outputs
    logits = outputs.histograms if outputs is not None else None
    decoder = pub.sae.W_dec[i].detach().float().cpu()
    align = decoder.abs().topk(min(3, len(decoder)))
    similar_ids, similar_cos = pub.similar if pub.similar is not None else (None, None)
    return {
        "modelId": names.model, "layer": names.source, "index": str(i), "sourceSetName": names.set,
        "creatorId": BOT_CREATOR_ID, "createdAt": now,
        "maxActApprox": float(pub.features.max_activation[i] or 0.0),
        "frac_nonzero": float(pub.features.frequency[i]), "hookName": pub.hook, "hasVector": False, "vector": [],
        # Output tokens need a residual-width hook; other hooks get empty lists, as the importer expects.
        "pos_str": [] if outputs is None else pub.output_tokens[0][i],
        "pos_values": [] if outputs is None else _round(outputs.top_values[i].tolist(), 4),
        "neg_str": [] if outputs is None else pub.output_tokens[1][i],
        "neg_values": [] if outputs is None else _round(outputs.bottom_values[i].tolist(), 4),
        "freq_hist_data_bar_heights": [int(h) for h in hist.heights[i].tolist()],
        "freq_hist_data_bar_values": _round(hist.centres[i].tolist()),
        "logits_hist_data_bar_heights": [] if logits is None else [int(h) for h in logits.heights[i].tolist()],
        "logits_hist_data_bar_values": [] if logits is None else _round(logits.centres[i].tolist()),
        "topkCosSimIndices": [] if similar_ids is None else similar_ids[i].tolist(),
        "topkCosSimValues": [] if similar_cos is None else _round(similar_cos[i].tolist(), 4),
        # The residual dimensions the feature writes to most (SAEDashboard's "neuron alignment", top 3).
        "neuron_alignment_indices": align.indices.tolist(),
        "neuron_alignment_values": _round(decoder[align.indices].tolist()),
        "neuron_alignment_l1": _round((align.values / decoder.abs().sum().clamp_min(1e-12)).tolist()),
        "decoder_weights_dist": [],
    }


def activation_row(pub: Publication, names: Names, example: dict[str, Any], now: str) -> dict[str, Any]:
    model, source, i = names.model, names.source, int(example["feature_index"])
    values = [float(v) for v in example["values"]]
    peak = max(values)
    top = example["kind"] == "top"
    key = f"{model}/{source}/{i}/{example['kind']}/{example['rank']}"
    return {
        "id": "md" + hashlib.sha1(key.encode()).hexdigest()[:23], "modelId": model, "layer": source, "index": str(i),
        "creatorId": BOT_CREATOR_ID, "createdAt": now, "tokens": list(example["tokens"]), "values": _round(values),
        "maxValue": round(peak, 5), "maxValueTokenIndex": values.index(peak), "minValue": round(min(values), 5),
        # SAEDashboard marks its top-activation group with bin -1; our other group is a uniform sample of
        # all firing tokens, i.e. the bin [0, max] holding the feature's whole firing fraction.
        "binMin": -1.0 if top else 0.0,
        "binMax": round(float(pub.features.max_activation[i] or peak), 5),
        "binContains": -1.0 if top else float(pub.features.frequency[i]),
        "qualifyingTokenIndex": int(example["max_token_index"]),
        "dataSource": None, "dataIndex": None, "dfaValues": [], "lossValues": [],
    }


def _write_gz(path: Path, rows: list[dict[str, Any]]) -> None:
    text = "".join(json.dumps(row, allow_nan=False, ensure_ascii=False) + "\n" for row in rows)
    path.write_bytes(gzip.compress(text.encode(), compresslevel=5))


def write(pub: Publication, folder: Path, *, features_per_batch: int = 128) -> Path:
    if features_per_batch < 1:
        raise ValueError(f"features_per_batch must be >= 1, got {features_per_batch}")
    folder = Path(folder)
    (folder / "features").mkdir(parents=True, exist_ok=True)
    (folder / "activations").mkdir(parents=True, exist_ok=True)
    for stale in [*folder.glob("features/batch-*.jsonl.gz"), *folder.glob("activations/batch-*.jsonl.gz")]:
        stale.unlink()  # a re-export with another batch size must not leave old batches behind
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    names = Names.of(pub)
    for name, row in metadata_rows(pub, names, now).items():
        (folder / name).write_text(json.dumps(row, allow_nan=False) + "\n")
    by_feature: dict[int, list[dict[str, Any]]] = {}
    for example in pub.examples:
        by_feature.setdefault(int(example["feature_index"]), []).append(example)
    for batch, start in enumerate(range(0, pub.sae.d_sae, features_per_batch)):
        indices = range(start, min(start + features_per_batch, pub.sae.d_sae))
        _write_gz(folder / "features" / f"batch-{batch}.jsonl.gz", [feature_row(pub, names, i, now) for i in indices])
        _write_gz(folder / "activations" / f"batch-{batch}.jsonl.gz",
                  [activation_row(pub, names, ex, now) for i in indices for ex in by_feature.get(i, [])])
    return folder


def check_row(row: Any, fields: dict[str, type | tuple[type, ...]]) -> str | None:
    """Why a parsed line lacks a required field or has the wrong type; None when it is fine."""
    if not isinstance(row, dict):
        return f"a line is {type(row).__name__}, not an object"
    for name, kind in fields.items():
        if name not in row:
            return f"field {name!r} is missing"
        value = row[name]
        if isinstance(value, bool) or not isinstance(value, kind):
            return f"field {name!r} is {type(value).__name__}, expected {getattr(kind, '__name__', kind)}"
    return None
