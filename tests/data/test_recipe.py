"""data/recipe.py: one recipe of a run's activations, the same from training and from a reopened run."""

import pytest
import torch
from omegaconf import OmegaConf

from conftest import compose_config, tiny_overrides
from midisc.data.cache import cache_key
from midisc.data.recipe import Recipe
from midisc.store import Store
from midisc.training.reopen import open_run


def test_the_cache_key_of_the_reference_setting_is_unchanged():
    # Caches on users' disks are found by this key: a change re-harvests every one of them. It changed once on
    # purpose, when data.dedupe (on by default) made the training texts drop the corpus's duplicate articles.
    cfg = OmegaConf.to_container(compose_config(["experiment=reference"]), resolve=True)
    assert cache_key(**Recipe.of(cfg, "model.layers.15").producer()) == "8047e687bf5bb454"


def test_a_reopened_run_has_the_recipe_training_built(trained_run, tiny_llama, text_folder):
    work, run_id = trained_run
    cfg = compose_config(tiny_overrides(tiny_llama, text_folder, work / "runs.db"))
    with Store(f"sqlite:///{work / 'runs.db'}") as store:
        run = open_run(store, run_id)
    assert run.recipe == Recipe.of(OmegaConf.to_container(cfg, resolve=True), "model.layers.1")


def test_a_reopened_run_stores_its_vectors_in_the_runs_dtype(tiny_llama, text_folder):
    # Tools used to harvest in float32 whatever the run stored: analysis of a bfloat16 run then differed.
    cfg = OmegaConf.to_container(compose_config([*tiny_overrides(tiny_llama, text_folder, None),
                                                 "activations.dtype=bfloat16"]), resolve=True)
    recipe = Recipe.of(cfg, "model.layers.1")
    source = recipe.open()
    chunks = list(source.chunks(source.heldout_contexts()[:4]))
    assert {chunk.acts.dtype for chunk in chunks} == {torch.bfloat16}
    assert sum(int(chunk.keep.sum()) for chunk in chunks) == sum(len(chunk.acts) for chunk in chunks) > 0
    assert not any(chunk.keep[:, 0].any() for chunk in chunks)  # position 0 is never a vector


@pytest.mark.parametrize("hook, width", [("model.layers.1", 32), ("model.layers.0.mlp.up_proj", 64),
                                         ("model.layers.2.self_attn.q_proj", 32)])
def test_the_width_of_a_hook_is_read_from_one_short_forward(tiny_llama, text_folder, hook, width):
    cfg = OmegaConf.to_container(compose_config(tiny_overrides(tiny_llama, text_folder, None)), resolve=True)
    recipe = Recipe.of(cfg, hook)
    source = recipe.open()
    assert source.width(source.heldout_contexts()) == width
