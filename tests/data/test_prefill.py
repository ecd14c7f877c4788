"""One pass of the model fills several hooks' caches with the rows separate harvests would give."""

import pytest
import torch

from conftest import compose_config, tiny_overrides
from midisc.data.activations import MemoryCache
from midisc.data.prefill import prefill
from midisc.data.recipe import Recipe
from omegaconf import OmegaConf


def sources_of(tiny_llama, text_folder, hooks, *extra):
    config = OmegaConf.to_container(compose_config(tiny_overrides(tiny_llama, text_folder, None) + list(extra)),
                                    resolve=True)
    recipes = [Recipe.of(config, hook) for hook in hooks]
    tokens = recipes[0].tokens()
    first = recipes[0].open(tokens)
    return [first, *(r.open(tokens, first.loaded) for r in recipes[1:])], tokens, recipes


def test_prefill_gives_each_hook_the_rows_of_its_own_harvest(tiny_llama, text_folder):
    hooks = ["model.layers.2", "model.layers.0.mlp"]
    sources, tokens, recipes = sources_of(tiny_llama, text_folder, hooks)
    train_texts, heldout_texts = recipes[0].texts()
    train_ctx, heldout_ctx = tokens.pack(train_texts), tokens.pack(heldout_texts)
    caches = [MemoryCache(), MemoryCache()]
    heldout = prefill(sources, caches, train_ctx, heldout_ctx, max_vectors=None)
    for source, cache, chunks in zip(sources, caches, heldout):
        alone = torch.cat(list(source.vectors(train_ctx)))
        assert cache.complete and torch.equal(cache.rows, alone)
        for mine, theirs in zip(chunks, source.chunks(heldout_ctx)):
            assert torch.equal(mine.acts, theirs.acts) and torch.equal(mine.keep, theirs.keep)
            assert torch.equal(mine.tokens, theirs.tokens) and mine.first == theirs.first


def test_prefill_stops_at_max_vectors_for_every_hook(tiny_llama, text_folder):
    sources, tokens, recipes = sources_of(tiny_llama, text_folder, ["model.layers.0", "model.layers.1"])
    train_texts, heldout_texts = recipes[0].texts()
    caches = [MemoryCache(), MemoryCache()]
    prefill(sources, caches, tokens.pack(train_texts), tokens.pack(heldout_texts), max_vectors=300)
    assert [len(c) for c in caches] == [300, 300]
    assert torch.equal(caches[0].rows, torch.cat(list(sources[0].vectors(tokens.pack(train_texts))))[:300])


def test_a_prefill_cut_short_publishes_nothing(tiny_llama, text_folder):
    sources, tokens, recipes = sources_of(tiny_llama, text_folder, ["model.layers.0", "model.layers.1"])
    train_texts, heldout_texts = recipes[0].texts()

    class Breaks(MemoryCache):
        def append(self, chunk):
            if len(self) > 100:
                raise OSError("disk gone")
            super().append(chunk)

    caches = [MemoryCache(), Breaks()]
    with pytest.raises(OSError, match="disk gone"):
        prefill(sources, caches, tokens.pack(train_texts), tokens.pack(heldout_texts), max_vectors=None)
    assert not any(c.complete for c in caches) and [len(c) for c in caches] == [0, 0]
