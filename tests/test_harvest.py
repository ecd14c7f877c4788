"""`python -m midisc.harvest`: caches filled without training, whole or split into parts and merged."""

import logging

import pytest
import torch

from conftest import compose_config, run_cli, tiny_overrides
from midisc.config import ConfigError
from midisc.data.cache import SharedCache
from midisc.data.merge import merge_into
from midisc.harvest import harvest
from midisc.run import train


def config(tmp_path, tiny_llama, text_folder, *extra):
    return compose_config(tiny_overrides(tiny_llama, text_folder, tmp_path / "runs.db") + list(extra))


def rows(cache):
    with cache:
        return cache.block(0, len(cache))


def test_parts_merged_are_the_whole_harvest_and_training_reuses_them(tmp_path, tiny_llama, text_folder, caplog):
    whole = harvest(config(tmp_path, tiny_llama, text_folder, "layers=[0,2]",
                           f"activations.cache_dir={tmp_path / 'whole'}"))
    parts = [harvest(config(tmp_path, tiny_llama, text_folder, "layers=[0,2]", f"activations.part={i}/2",
                            f"activations.cache_dir={tmp_path / f'part{i}'}")) for i in range(2)]
    assert [len(p[0]) for p in parts] != [0, 0] and sum(len(p[0]) for p in parts) == len(whole[0])
    for hook in range(2):  # each hook's parts apart
        merged = merge_into([p[hook].folder for p in parts], tmp_path / "merged", log=lambda line: None)
        assert merged.name == whole[hook].folder.name  # the whole harvest's key: runs find it
        mine = SharedCache.open(tmp_path / "merged", whole[hook].producer, dtype="float32", max_bytes=None,
                                expected_bytes=0, log=print)
        assert mine.complete
        a, b = rows(mine), rows(SharedCache.open(tmp_path / "whole", whole[hook].producer, dtype="float32",
                                                 max_bytes=None, expected_bytes=0, log=print))
        # The same vectors, part 0's contexts then part 1's. Forwards of other batches of contexts may differ in
        # the last bits (and the outlier filter judges a batch by its median), so the sums compare, not the bits.
        assert len(a) == len(b)
        assert torch.allclose(a.double().sum(0), b.double().sum(0), rtol=1e-4, atol=1e-4)
        assert torch.allclose(a.double().pow(2).sum(), b.double().pow(2).sum(), rtol=1e-5)
    caplog.set_level(logging.INFO)
    result = train(config(tmp_path, tiny_llama, text_folder, "layer=2", "activations.cache=disk",
                          f"activations.cache_dir={tmp_path / 'merged'}"), tmp_path / "out")
    assert "the language model does not run" in caplog.text and result.metrics["fvu"] < 0.5


@pytest.mark.parametrize("extra, message", [
    (["activations.part=2/2"], "activations.part must be I/N with 0 <= I < N"),
    (["activations.part=half"], "activations.part must be I/N"),
    (["activations.part=0/2", "max_vectors=500"], "activations.part=0/2 with max_vectors=500"),
])
def test_bad_parts_are_refused(tmp_path, tiny_llama, text_folder, extra, message):
    with pytest.raises(ConfigError, match=message):
        harvest(config(tmp_path, tiny_llama, text_folder, *extra))


def test_training_refuses_a_part(tmp_path, tiny_llama, text_folder):
    with pytest.raises(ConfigError, match="activations.part=0/2 is for python -m midisc.harvest"):
        train(config(tmp_path, tiny_llama, text_folder, "activations.part=0/2"), tmp_path / "out")


def test_harvest_from_the_command_line(tmp_path, tiny_llama, text_folder):
    args = ["midisc.harvest", *tiny_overrides(tiny_llama, text_folder, None), "layers=[0,1]",
            f"activations.cache_dir={tmp_path / 'cache'}"]
    done = run_cli(args, tmp_path)
    assert done.returncode == 0, done.stderr
    assert "layer=0: harvested" in done.stdout and "layer=1: harvested" in done.stdout
    again = run_cli(args, tmp_path)
    assert "layer=0: already cached" in again.stdout
    assert not (tmp_path / "outputs").exists() or not any((tmp_path / "outputs").rglob("*.log"))
