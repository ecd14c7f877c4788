"""The three exports: SAELens folder round trips (folded normalisation included), the Neuronpedia
package, and dashboard files in the layout and field names Neuronpedia's importer reads."""

import gzip
import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from midisc.publish import publication as export
from midisc.publish.publication import FeatureTable, Publication, add_profiles
from midisc.publish.write import write_all
from midisc.publish.dashboard import ACTIVATION_FIELDS, FEATURE_FIELDS, META_FILES, check_row
from midisc.sae import ReluSAE, TopKSAE, load_sae
from midisc.sae.gated import GatedSAE

D_IN = 8


def strict_json(text):
    def refuse(constant):
        raise ValueError(f"{constant} in JSON")
    return json.loads(text, parse_constant=refuse)


def make_pub(sae, *, run_id=3, n_examples=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    d_sae = sae.d_sae
    frequency = torch.rand(d_sae, generator=g).tolist()
    frequency[0] = 0.0  # one feature never fired
    peaks = [None if f == 0 else 1 + 4 * f for f in frequency]
    examples = [{"feature_index": f, "kind": kind, "rank": r, "activation": 2.0, "context_index": r,
                 "token_index": 5, "max_token_index": 1, "tokens": ["a", " b", " c"], "values": [0.0, 2.0, 0.5]}
                for f in range(1, d_sae) for kind in ("top", "quantile") for r in range(n_examples)]
    pub = Publication(
        sae=sae, run_id=run_id, model="HuggingFaceTB/SmolLM2-135M-Instruct", hook="model.layers.2", layer=2,
        site="resid", n_layers=4,
        metadata={"model_name": "HuggingFaceTB/SmolLM2-135M-Instruct", "hook_name": "model.layers.2",
                  "context_size": 16, "prepend_bos": False, "dataset_path": "texts"},
        settings={"batch_size": 64}, metrics={"fvu": 0.25, "l0": 4.0, "odd": float("nan")},
        features=FeatureTable(frequency=frequency, mean_activation=[p and p / 2 for p in peaks],
                              max_activation=peaks, is_dead=[f < 0.05 for f in frequency], n_tokens=1000),
        examples=examples)
    add_profiles(pub, torch.randn(300, D_IN, generator=g).split(100), torch.randn(50, D_IN, generator=g),
                 lambda ids: [f"tok{i}" for i in ids], n_tokens=5)
    return pub


@pytest.mark.parametrize("make", [lambda: TopKSAE(D_IN, 4, k=3, seed=1), lambda: ReluSAE(D_IN, 4, seed=1)])
def test_saelens_folder_round_trips_with_sparsity_and_metadata(tmp_path, make):
    sae = make()
    with torch.no_grad():
        sae.b_enc.normal_()
        sae.b_dec.normal_()
    pub = make_pub(sae)
    written = write_all(pub, tmp_path)
    reloaded = load_sae(written.saelens)
    x = torch.randn(32, D_IN)
    assert torch.equal(reloaded(x).x_hat, sae(x).x_hat) and torch.equal(reloaded(x).codes, sae(x).codes)
    sparsity = load_file(str(written.saelens / "sparsity.safetensors"))["sparsity"]
    assert sparsity.shape == (sae.d_sae,) and torch.isfinite(sparsity).all()
    assert sparsity[0] == pytest.approx(-10.0) and sparsity[1] == pytest.approx(math.log10(pub.features.frequency[1]))
    cfg = json.loads((written.saelens / "cfg.json").read_text())
    meta = cfg["metadata"]
    assert meta["sae_lens_version"] == "6.0.0" and meta["model_class_name"] == "AutoModelForCausalLM"
    assert meta["hook_name"] == "model.layers.2" and meta["context_size"] == 16
    assert meta["neuronpedia_id"] == "smollm2-135m-instruct/2-resid-midisc-" + (
        "topk3-32-r3" if cfg["architecture"] == "topk" else "standard-32-r3")


@pytest.mark.parametrize("make", [lambda: TopKSAE(D_IN, 4, k=3, seed=2), lambda: ReluSAE(D_IN, 4, seed=2)])
def test_folded_input_scale_gives_the_same_reconstruction_of_raw_activations(tmp_path, make):
    sae, scale = make(), 0.037
    with torch.no_grad():
        sae.b_enc.normal_()
        sae.b_dec.normal_()
    x = torch.randn(64, D_IN) * 30
    trained = sae(x * scale)  # what training saw: normalised inputs
    sae.fold_input_scale(scale)
    folded = sae(x)
    assert torch.allclose(folded.x_hat, trained.x_hat / scale, rtol=1e-5, atol=1e-4)
    assert torch.allclose(folded.codes, trained.codes / scale, rtol=1e-5, atol=1e-4)
    assert torch.equal((folded.codes > 0), (trained.codes > 0))
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(sae.d_sae))  # unit rows survive folding
    reloaded = load_sae(write_all(make_pub(sae), tmp_path).saelens)  # the folder works on raw activations
    assert torch.allclose(reloaded(x).x_hat, trained.x_hat / scale, rtol=1e-5, atol=1e-4)
    with pytest.raises(ValueError, match="must be a finite number > 0, got 0"):
        sae.fold_input_scale(0)


def test_saelens_loads_the_folder_with_identical_outputs(tmp_path):
    sae_lens = pytest.importorskip("sae_lens")  # not a dependency; checked where it is installed
    sae = TopKSAE(D_IN, 4, k=3, seed=3)
    folder = write_all(make_pub(sae), tmp_path).saelens
    theirs = sae_lens.SAE.load_from_disk(str(folder))
    x = torch.randn(16, D_IN)
    assert torch.allclose(theirs(x), sae(x).x_hat, atol=1e-6)
    assert theirs.cfg.metadata.hook_name == "model.layers.2"


def test_neuronpedia_package_holds_the_weights_and_plain_json(tmp_path):
    sae = ReluSAE(D_IN, 4, seed=4)
    pub = make_pub(sae)
    folder = write_all(pub, tmp_path).package
    assert folder.name == "run-3_neuronpedia"
    assert np.array_equal(np.load(folder / "decoder_weights.npy"), sae.W_dec.detach().numpy())
    saved = torch.load(folder / "sae_model.pt", weights_only=True)
    assert saved["cfg"]["d_sae"] == 32 and torch.equal(saved["state_dict"]["W_enc"], sae.W_enc.detach())
    meta = strict_json((folder / "neuronpedia_metadata.json").read_text())
    assert (meta["model"], meta["layer"], meta["hook"], meta["width"], meta["architecture"]) == \
        ("HuggingFaceTB/SmolLM2-135M-Instruct", 2, "model.layers.2", 32, "standard")
    assert meta["metrics"] == {"fvu": 0.25, "l0": 4.0, "odd": None} and meta["training"] == {"batch_size": 64}
    analysis = strict_json((folder / "feature_analysis.json").read_text())
    rows = analysis["features"]
    assert [r["index"] for r in rows] == list(range(32)) and analysis["dead_features"] == sum(pub.features.is_dead)
    assert rows[0]["mean_activation"] is None and rows[0]["log10_density"] == -10.0
    assert len(rows[5]["promoted_tokens"]) == 5 and rows[5]["promoted_tokens"][0].startswith("tok")


def read_gz(path):
    return [strict_json(line) for line in gzip.decompress(path.read_bytes()).decode().splitlines()]


def test_dashboard_files_carry_the_importers_fields(tmp_path):
    sae = TopKSAE(D_IN, 4, k=3, seed=5)
    pub = make_pub(sae)
    folder = write_all(pub, tmp_path, features_per_batch=12).dashboard
    assert folder == tmp_path / "exports" / "smollm2-135m-instruct" / "2-resid-midisc-topk3-32-r3"
    meta = {name: [strict_json(line) for line in (folder / name).read_text().splitlines()] for name in META_FILES}
    assert all(len(rows) == 1 for rows in meta.values())
    source, model = meta["source.jsonl"][0], meta["model.jsonl"][0]
    assert source["id"] == "2-resid-midisc-topk3-32-r3" and source["setName"] == meta["sourceset.jsonl"][0]["name"]
    assert model["id"] == "smollm2-135m-instruct" and model["layers"] == 4 and model["instruct"] is True
    assert meta["sourceset.jsonl"][0]["releaseName"] == meta["release.jsonl"][0]["name"]
    batches = sorted(p.name for p in (folder / "features").iterdir())
    assert batches == ["batch-0.jsonl.gz", "batch-1.jsonl.gz", "batch-2.jsonl.gz"]
    seen, ids = [], set()
    for name in batches:
        features, acts = read_gz(folder / "features" / name), read_gz(folder / "activations" / name)
        assert len({tuple(r) for r in features}) == 1 and len({tuple(r) for r in acts}) == 1  # same keys per line
        assert all(check_row(r, FEATURE_FIELDS) is None for r in features)
        assert all(check_row(r, ACTIVATION_FIELDS) is None for r in acts)
        assert {r["index"] for r in acts} <= {r["index"] for r in features}
        seen += [int(r["index"]) for r in features]
        ids |= {r["id"] for r in acts}
        for r in acts:
            assert r["layer"] == source["id"] and r["values"][r["maxValueTokenIndex"]] == r["maxValue"] == 2.0
    assert seen == list(range(32)) and len(ids) == len(pub.examples)
    row = read_gz(folder / "features" / "batch-0.jsonl.gz")[5]
    assert row["frac_nonzero"] == pytest.approx(pub.features.frequency[5])
    assert sum(row["freq_hist_data_bar_heights"]) > 0 and len(row["pos_str"]) == 5
    assert row["pos_values"] == sorted(row["pos_values"], reverse=True) and 5 not in row["topkCosSimIndices"]
    # Importing twice must not duplicate examples: the ids are the same on a re-export, and a bigger
    # batch size leaves no stale batch files behind.
    again = write_all(pub, tmp_path, features_per_batch=100).dashboard
    assert sorted(p.name for p in (again / "features").iterdir()) == ["batch-0.jsonl.gz"]
    assert {r["id"] for r in read_gz(again / "activations" / "batch-0.jsonl.gz")} == ids


def test_check_row_names_the_missing_or_mistyped_field():
    row = {name: ([] if kind is list else "x" if kind is str else 1) for name, kind in FEATURE_FIELDS.items()}
    assert check_row(row, FEATURE_FIELDS) is None
    assert "'pos_str' is missing" in check_row({k: v for k, v in row.items() if k != "pos_str"}, FEATURE_FIELDS)
    assert "'index' is int" in check_row({**row, "index": 5}, FEATURE_FIELDS)


def test_names_for_neuronpedia():
    assert export.model_id("HuggingFaceTB/SmolLM2-135M-Instruct") == "smollm2-135m-instruct"
    assert export.model_id("/tmp/models/My Model/") == "my-model" and export.model_id("microsoft/phi-2") == "phi-2"
    pub = make_pub(TopKSAE(D_IN, 4, k=3), run_id=None)
    assert export.source_id(pub) == "2-resid-midisc-topk3-32" and pub.name == "sae"
    pub.set_name = "Res__32K"
    assert export.source_id(pub) == "2-res_32k"  # "__" would end Neuronpedia's set name early
    pub.layer, pub.hook = None, "model.layers.7.mlp.down_proj"
    assert export.layer_number(pub) == 7


def test_exports_carry_the_gated_tensors(tmp_path):
    sae = GatedSAE(D_IN, 4, seed=3)
    written = write_all(make_pub(sae), tmp_path)
    package = torch.load(written.package / "sae_model.pt", weights_only=True)
    assert package["cfg"]["architecture"] == "gated"
    saved = set(load_file(str(written.saelens / "sae_weights.safetensors")))
    assert set(package["state_dict"]) == saved == {"W_enc", "W_dec", "b_dec", "b_gate", "r_mag", "b_mag"}
    assert "-midisc-gated-32-" in json.loads((written.saelens / "cfg.json").read_text())["metadata"]["neuronpedia_id"]
    x = torch.randn(16, D_IN)
    with torch.no_grad():
        assert torch.equal(load_sae(written.saelens)(x).x_hat, sae(x).x_hat)
