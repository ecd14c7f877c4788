"""The core evaluation: spliced-model scores pinned by an identity and a zero "SAE", and the CLI on a real run."""

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from midisc.data import lm
from midisc.evaluate import main
from midisc.analysis.saebench import core_report, reconstruction
from midisc.analysis.splice import splice_totals
from midisc.store import Store
from midisc.run_folder import EVALUATION_FILENAME

SAEBENCH_GROUPS = {"model_behavior_preservation", "model_performance_preservation", "reconstruction_quality",
                   "shrinkage", "sparsity", "token_stats"}


class Scaled(nn.Module):
    """A stand-in SAE whose reconstruction is the input times `scale`: 1 is perfect, 0 is zero-ablation."""

    def __init__(self, d: int, scale: float) -> None:
        super().__init__()
        self.W_dec = nn.Parameter(torch.zeros(1, d))
        self.scale = scale

    def forward(self, x):
        return SimpleNamespace(x_hat=x * self.scale)


@pytest.fixture(scope="module")
def tiny(tiny_llama):
    loaded = lm.load_model(str(tiny_llama), device_map=None)
    contexts = torch.randint(3, 200, (6, 16), generator=torch.Generator().manual_seed(0))
    return loaded.model, loaded.model.model.layers[1], contexts


@pytest.mark.parametrize("scale, ce_score, kl_score", [(1.0, 1.0, 1.0), (0.0, 0.0, 0.0)])
def test_ce_loss_recovered_is_one_for_identity_and_zero_for_ablation(tiny, scale, ce_score, kl_score):
    model, module, contexts = tiny
    totals = splice_totals(model, module, Scaled(32, scale), contexts.split(4), special_ids=[0],
                           outlier_factor=None)
    scores = totals.scores()
    assert totals.tokens == 6 * 15
    assert scores["ce_loss_score"] == pytest.approx(ce_score, abs=1e-5)
    assert scores["kl_div_score"] == pytest.approx(kl_score, abs=1e-5)
    assert scores["ce_loss_with_ablation"] > scores["ce_loss_without_sae"]  # zeroing block 1 hurts the model


def test_a_half_scaled_reconstruction_lands_between(tiny):
    model, module, contexts = tiny
    scores = splice_totals(model, module, Scaled(32, 0.5), contexts.split(4), special_ids=[0],
                           outlier_factor=None).scores()
    assert 0 < scores["kl_div_with_sae"] < scores["kl_div_with_ablation"]


def test_reconstruction_of_a_perfect_sae():
    class Perfect(nn.Module):
        d_sae = 4
        W_dec = nn.Parameter(torch.zeros(4, 3))

        def forward(self, x):
            codes = torch.zeros(len(x), 4)
            codes[:, 0] = 1.0
            return SimpleNamespace(x_hat=x, codes=codes)

    recon = reconstruction(Perfect(), [torch.randn(10, 3), torch.randn(5, 3)])
    assert recon["tokens"] == 15 and recon["fvu"] == pytest.approx(0) and recon["cossim"] == pytest.approx(1)
    assert recon["l0"] == 1 and recon["dead_frac"] == 0.75 and recon["dense_frac"] == 0.25
    assert recon["relative_reconstruction_bias"] == pytest.approx(1)
    report = core_report(recon, {k: None for k in ("kl_div_score", "kl_div_with_ablation", "kl_div_with_sae",
                                                   "ce_loss_score", "ce_loss_with_ablation", "ce_loss_with_sae",
                                                   "ce_loss_without_sae")}, 0, {})
    assert set(report["eval_result_metrics"]) == SAEBENCH_GROUPS
    assert report["eval_result_metrics"]["shrinkage"]["l2_ratio"] == pytest.approx(1)


def test_cli_evaluates_a_run_stores_and_writes_the_result(planted_run, capsys):
    assert main([str(planted_run.run_id), "--db", planted_run.url, "--contexts", "4", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    metrics = printed["eval_result_metrics"]
    assert set(metrics) == SAEBENCH_GROUPS and metrics["token_stats"]["total_tokens_eval_reconstruction"] > 0
    ce = metrics["model_performance_preservation"]
    # A random tiny model: zeroing a block need not hurt it, so only the losses themselves are pinned here.
    assert min(ce["ce_loss_without_sae"], ce["ce_loss_with_sae"], ce["ce_loss_with_ablation"]) > 0
    with Store(planted_run.url) as store:
        (row,) = store.evaluations(planted_run.run_id)
        folder = Path(store.get_run(planted_run.run_id)["output_dir"])
    assert row["eval_type"] == "core" and row["result"]["eval_result_metrics"] == metrics
    assert json.loads((folder / EVALUATION_FILENAME).read_text())["eval_result_metrics"] == metrics
    assert main([str(planted_run.run_id), "--db", planted_run.url, "--contexts", "4"]) == 0  # again: replaced
    out = capsys.readouterr().out
    assert "ce_loss_score" in out
    tokens = metrics["token_stats"]["total_tokens_eval_sparsity_variance"]
    assert f"dead_frac: features that never fired on the {tokens:,} held-out tokens evaluated" in out
    with Store(planted_run.url) as store:
        assert len(store.evaluations(planted_run.run_id)) == 1
        # the run's headline spliced-in scores are the latest evaluation's
        recorded = store.get_run(planted_run.run_id)["metrics"] or {}
    scores = {"ce_loss_score": ce["ce_loss_score"], "kl_div_score": metrics["model_behavior_preservation"]["kl_div_score"]}
    assert any(v is not None for v in scores.values())
    assert {k: recorded.get(k) for k in scores} == scores
