"""Transcoders end to end: an MLP's input and output captured in one forward, the transcoder spliced in place of
the MLP, and a tiny run trained, recorded, evaluated, published and verified as an SAE's run is."""

from __future__ import annotations

import copy
import json
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from conftest import compose_config, tiny_overrides
from midisc import concepts, verify
from midisc.analysis.splice import splice_totals
from midisc.config import ConfigError
from midisc.data import lm
from midisc.store import Store
from midisc.train import train

TRANSCODER = ("sae=batchtopk", "sae.k=8", "sae.kind=transcoder", "sae.skip=true", "model.site=mlp")


@pytest.fixture(scope="module")
def tiny(tiny_llama):
    loaded = lm.load_model(str(tiny_llama), device_map=None)
    contexts = torch.randint(3, 200, (6, 16), generator=torch.Generator().manual_seed(0))
    return loaded.model, loaded.model.model.layers[1], contexts


def test_capture_puts_the_mlps_input_beside_its_output(tiny):
    model, layer, contexts = tiny
    both = lm.capture(model, layer.mlp, contexts, transcode=True)
    normed = lm.capture(model, layer.post_attention_layernorm, contexts)  # what the MLP reads in a Llama block
    out = lm.capture(model, layer.mlp, contexts)
    assert both.shape == (6, 16, 64)
    assert torch.equal(both[..., :32], normed) and torch.equal(both[..., 32:], out)


class MLPItself(nn.Module):
    """A stand-in transcoder that predicts the MLP's output by running the MLP on the input half: perfect."""

    is_transcoder = True

    def __init__(self, mlp: nn.Module, d: int, scale: float = 1.0) -> None:
        super().__init__()
        # A copy: the hooked MLP itself would run the splice's hook again inside it.
        self.mlp, self.d_in, self.d_out, self.scale = copy.deepcopy(mlp), d, d, scale
        self.W_dec = nn.Parameter(torch.zeros(1, d))

    def forward(self, x):
        return SimpleNamespace(x_hat=self.mlp(x[..., :self.d_in]) * self.scale)


@pytest.mark.parametrize("scale, score", [(1.0, 1.0), (0.0, 0.0)])
def test_splicing_replaces_the_mlps_output_with_the_prediction_from_its_input(tiny, scale, score):
    model, layer, contexts = tiny
    scores = splice_totals(model, layer.mlp, MLPItself(layer.mlp, 32, scale), contexts.split(4), special_ids=[0],
                           outlier_factor=None).scores()
    assert scores["ce_loss_score"] == pytest.approx(score, abs=1e-5)
    assert scores["kl_div_score"] == pytest.approx(score, abs=1e-5)
    assert scores["ce_loss_with_ablation"] != scores["ce_loss_without_sae"]  # zeroing the MLP changes the model


@pytest.fixture(scope="module")
def transcoder_run(tmp_path_factory, tiny_llama, text_folder):
    work = tmp_path_factory.mktemp("transcoder")
    url = f"sqlite:///{work / 'runs.db'}"
    result = train(compose_config(tiny_overrides(tiny_llama, text_folder, work / "runs.db", sae=TRANSCODER)),
                   work / "out")
    return result, url


def test_a_skip_transcoder_trains_records_and_publishes_in_saelens_form(transcoder_run):
    result, url = transcoder_run
    store = Store(url)
    run = store.get_run(result.run_id)
    assert run["status"] == "completed" and run["architecture"] == "batchtopk_transcoder"
    assert run["hook"].endswith("layers.1.mlp") and run["config"]["sae"]["kind"] == "transcoder"
    (saved,) = store.sae_models(result.run_id)
    assert saved["architecture"] == "jumprelu_skip_transcoder"
    cfg = json.loads((result.sae_dir / "cfg.json").read_text())
    assert (cfg["architecture"], cfg["d_in"], cfg["d_out"], cfg["apply_b_dec_to_input"]) == \
        ("jumprelu_skip_transcoder", 32, 32, False)
    # Scored on the MLP's output: measured FVU 0.29 and KL score 0.70 here; a transcoder at its start scores far worse.
    assert result.metrics["fvu"] < 0.6 and result.metrics["kl_div_score"] > 0.3
    (evaluation,) = store.evaluations(result.run_id)
    assert evaluation["result"]["eval_result_metrics"]["model_behavior_preservation"]["kl_div_score"] == \
        pytest.approx(result.metrics["kl_div_score"])
    assert len(store.features(result.run_id)) == result.sae.d_sae  # analysed as an SAE's features are
    store.close()


def test_the_published_transcoder_passes_every_check(transcoder_run, capsys):
    result, url = transcoder_run
    code = verify.main([str(result.run_id), "--db", url, "--json"])
    report = json.loads(capsys.readouterr().out)
    results = {c["name"]: c for c in report["checks"]}
    assert code == 0 and report["passed"], results
    assert {name for name, c in results.items() if c["status"] == "SKIP"} <= {"SAELens loads it"}
    assert "d_out 32" not in results["shapes agree"]["reason"]  # d_out equals d_in on an MLP


def test_concept_testing_reads_the_transcoders_input(transcoder_run, tmp_path, capsys):
    result, url = transcoder_run
    (tmp_path / "sport.txt").write_text("the team won the match\nfans sang after a late goal\n")
    code = concepts.main([str(result.run_id), "--all", "--db", url, "--modules", str(tmp_path), "--json"])
    assert code == 0
    assert "sport" in capsys.readouterr().out


@pytest.mark.parametrize("overrides, message", [
    (("sae=topk", "sae.kind=transcoder"), r"sae.kind=transcoder is not offered for TopKSAE"),
    (TRANSCODER + ("resample_every=5",), r"^resample_every=5 restarts dead features .* set resample_every=0"),
])
def test_refusals_are_one_line(tmp_path, tiny_llama, text_folder, overrides, message):
    cfg = compose_config(tiny_overrides(tiny_llama, text_folder, None, sae=overrides))
    with pytest.raises(ConfigError, match=message):
        train(cfg, tmp_path / "out")
