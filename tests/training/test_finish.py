"""The end of a run (training/finish.py): each step gives the same result from training and from its command."""

import gzip
import json
import re

import torch

from conftest import compose_config, tiny_overrides
from midisc import analyze, export
from midisc.data.activations import ContextChunk
from midisc.evaluate import evaluate_run
from midisc.run_folder import EVALUATION_FILENAME
from midisc.sae import TopKSAE
from midisc.store import Store
from midisc.train import train
from midisc.training.finish import analyze_features


def rows(store, run_id):
    features = [{k: f[k] for k in ("feature_index", "frequency", "mean_activation", "max_activation", "is_dead")}
                for f in store.features(run_id)]
    examples = [{k: v for k, v in e.items() if k not in ("id", "run_id")} for e in store.feature_examples(run_id)]
    return features, examples


CREATED = re.compile(rb'"(created_?[aA]t|updatedAt)": "[^"]*"')


def package_contents(folder):
    """Every file under `folder`, creation times left out (a re-export is made now)."""
    contents = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        data = path.read_bytes()
        if path.suffix == ".gz":  # gzip's header holds the time of writing
            data = gzip.decompress(data)
        contents[path.relative_to(folder)] = CREATED.sub(rb'"\1": ""', data)
    return contents


def test_the_commands_redo_each_step_exactly_as_training_did(published, capsys):
    out, url, run_id = published
    trained_report = json.loads((out / EVALUATION_FILENAME).read_text())
    with Store(url) as store:
        run = store.get_run(run_id)
        trained_features, trained_examples = rows(store, run_id)
        n_contexts = run["config"]["evaluate"]["contexts"]
        report = evaluate_run(store, run_id, n_contexts, progress=False)
    assert report["eval_result_metrics"] == trained_report["eval_result_metrics"]  # bit for bit, on the CPU
    assert report["eval_config"] == trained_report["eval_config"]  # the same description, run id included

    assert analyze.main([str(run_id), "--db", url]) == 0
    with Store(url) as store:
        features, examples = rows(store, run_id)
    assert features == trained_features and len(examples) == len(trained_examples) > 0
    assert examples == trained_examples

    package, dashboards = next(out.glob("*_neuronpedia")), out / "exports"
    before = package_contents(package), package_contents(dashboards)
    assert export.main([str(run_id), "--db", url]) == 0
    after = package_contents(package), package_contents(dashboards)
    assert after == before and before[1]
    capsys.readouterr()


def test_a_run_without_store_or_evaluation_still_publishes(tmp_path, tiny_llama, text_folder):
    cfg = compose_config([*tiny_overrides(tiny_llama, text_folder, None), "evaluate.contexts=0",
                          "export.neuronpedia=false"])
    result = train(cfg, tmp_path / "out")
    assert result.run_id is None and "ce_loss_score" not in result.metrics and 0 < result.metrics["fvu"] < 1
    assert not (tmp_path / "out" / EVALUATION_FILENAME).exists()
    assert (result.sae_dir / "sae_weights.safetensors").is_file()
    assert not list((tmp_path / "out").glob("*_neuronpedia"))  # export.neuronpedia=false: the SAELens folder only
    assert result.metrics["analysed_tokens"] > 0 and result.metrics["alive_features"] <= result.sae.d_sae


def test_analyse_counts_a_feature_that_never_fired_as_dead_only_without_training_to_say_so():
    sae = TopKSAE(4, expansion=2, k=1, seed=0)
    with torch.no_grad():
        sae.W_enc.zero_()
        sae.W_enc[0, 0] = 1.0  # only feature 0 can fire, on inputs with a positive first coordinate
        sae.b_enc.fill_(-0.5)
        sae.b_dec.zero_()
    tokens = torch.arange(1, 9).reshape(2, 4)
    keep = torch.ones(2, 4, dtype=torch.bool)
    acts = torch.zeros(8, 4)
    acts[:, 0] = torch.linspace(0, 2, 8)
    chunk = ContextChunk(tokens=tokens, keep=keep, acts=acts, first=0)
    decode = lambda ids: [str(i) for i in ids]  # noqa: E731
    options = dict(n_top=2, n_quantile=1, before=1, after=1)
    fresh = analyze_features(sae, [chunk], decode, options)
    assert fresh.is_dead == [False] + [True] * 7 and fresh.table().frequency[0] > 0
    trained = analyze_features(sae, [chunk], decode, options, is_dead=[False] * 8)
    assert trained.is_dead == [False] * 8  # training's dead window is the word on dead features
    assert {e["feature_index"] for e in fresh.examples} == {0}
