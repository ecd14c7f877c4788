import pytest
import torch

from midisc.data import lm
from midisc.data.cache import SharedCache
from midisc.data.activations import (ActivationStream, MemoryCache, filter_activations, harvest, keep_mask,
                                shuffled_batches, take_rows)


def disk_cache(folder):
    return SharedCache.open(folder, {"test": 1}, dtype="float32", max_bytes=None, expected_bytes=0, log=lambda _: None)


def test_keep_mask_drops_position_zero_and_special_tokens():
    tokens = torch.tensor([[5, 6, 0, 7], [0, 8, 9, 1]])
    assert keep_mask(tokens, [0, 1]).tolist() == [[False, True, False, True], [False, True, True, False]]


def test_norm_outliers_are_dropped():
    acts = torch.ones(1, 6, 4)
    acts[0, 3] *= 1000  # a token with a huge norm, like SmolLM2's separators
    keep = torch.ones(1, 6, dtype=torch.bool)
    assert len(filter_activations(acts, keep, outlier_factor=4.0)) == 5
    assert len(filter_activations(acts, keep, outlier_factor=None)) == 6


def test_harvest_equals_hidden_states_without_first_positions_and_specials(tiny_llama):
    loaded = lm.load_model(str(tiny_llama), device_map=None)
    sep = loaded.tokenizer.eos_token_id
    contexts = torch.randint(3, 200, (5, 10))
    contexts[1, 4] = sep
    chunks = list(harvest(loaded.model, loaded.model.model.layers[1], contexts, special_ids=[sep],
                          batch_contexts=2, outlier_factor=None))
    got = torch.cat(chunks)
    with torch.no_grad():
        hidden = loaded.model(contexts, output_hidden_states=True).hidden_states[2]
    keep = torch.ones(5, 10, dtype=torch.bool)
    keep[:, 0] = False
    keep[1, 4] = False
    torch.testing.assert_close(got, hidden[keep])
    assert len(got) == 5 * 9 - 1
    assert not got.is_inference()  # usable by autograd later


def test_take_rows_stops_at_the_limit_and_pulls_no_further():
    pulled = []

    def chunks():
        for i in range(5):
            pulled.append(i)
            yield torch.full((4, 2), float(i))

    taken = torch.cat(list(take_rows(chunks(), 10)))
    assert taken.shape == (10, 2) and taken[8:, 0].tolist() == [2.0, 2.0] and pulled == [0, 1, 2]
    assert len(torch.cat(list(take_rows(chunks(), None)))) == 20
    pulled.clear()
    assert torch.cat(list(take_rows(chunks(), 8))).shape == (8, 2) and pulled == [0, 1]


def test_shuffled_batches_keep_every_row_but_the_tail_and_mix_chunks():
    chunks = [torch.full((10, 1), float(i)) for i in range(20)]  # each chunk is one "context"
    batches = list(shuffled_batches(chunks, batch_size=8, buffer_size=64, generator=torch.Generator().manual_seed(0)))
    assert all(b.shape == (8, 1) for b in batches)
    assert len(batches) == 200 // 8
    first = batches[0].flatten()
    assert len(set(first.tolist())) > 3  # a batch draws from many contexts, not one
    seen = torch.cat(batches).flatten()
    assert torch.bincount(seen.long(), minlength=20).max() <= 10  # no row appears twice


@pytest.mark.parametrize("make_cache", [lambda p: MemoryCache(), lambda p: disk_cache(p / "disk")])
def test_stream_harvests_once_then_reads_the_cache(tmp_path, make_cache):
    calls = []

    def source():
        calls.append(1)
        for i in range(10):
            yield torch.randn(30, 4) + i

    stream = ActivationStream(source, make_cache(tmp_path), batch_size=16, buffer_size=64, expected_rows=300, seed=0)
    assert len(stream) == 300 // 16
    epoch1 = torch.cat(list(stream))
    epoch2 = torch.cat(list(stream))
    assert calls == [1]  # the language model ran in epoch 1 only
    assert stream.n_rows == 300
    assert len(epoch1) == len(epoch2) == 18 * 16
    assert not torch.equal(epoch1, epoch2)  # a fresh order each epoch


@pytest.mark.parametrize("make_cache", [lambda p: MemoryCache(), lambda p: disk_cache(p / "disk")])
def test_a_first_epoch_cut_short_counts_its_rows_but_completes_no_cache(tmp_path, make_cache):
    cache = make_cache(tmp_path)
    stream = ActivationStream(lambda: iter(torch.randn(100, 4).split(10)), cache, batch_size=4, buffer_size=8,
                              expected_rows=100)
    batches = iter(stream)
    next(batches)
    batches.close()  # a trainer stopping at max_steps
    assert not cache.complete and stream.n_rows >= 8
    assert not list((tmp_path / "disk").glob("*.partial"))


def full_memory_cache(rows: torch.Tensor) -> MemoryCache:
    cache = MemoryCache()
    cache.append(rows)
    cache.finish()
    return cache


def test_ranks_read_disjoint_blocks_and_the_same_number_of_batches():
    rows = torch.arange(10_500, dtype=torch.float32).unsqueeze(1).repeat(1, 3)  # row i holds i: traceable
    cache = full_memory_cache(rows)
    streams = []
    for rank in range(2):
        stream = ActivationStream(lambda: iter(()), cache, batch_size=100, buffer_size=400, expected_rows=0,
                                  seed=3, block_rows=1000)
        stream.shard = lambda rank=rank: (rank, 2)
        streams.append(stream)
    # 2 ranks × 16 blocks at least: blocks of 10,500 // 32 = 328 rows, 32 of them full; 16 each.
    for epoch in range(2):
        seen = [torch.cat(list(stream))[:, 0].long() for stream in streams]
        assert [len(s) for s in seen] == [5200, 5200] and [len(stream) for stream in streams] == [52, 52]
        assert not set(seen[0].tolist()) & set(seen[1].tolist())
        blocks = {int(i) // 328 for s in seen for i in s}
        assert len(blocks) == 32 and 32 not in blocks  # whole blocks of full length, none twice
        assert sum(map(len, seen)) >= 10_500 * 15 / 16  # under 1/16 sits out
        if epoch == 0:
            first = set(seen[0].tolist())
        else:
            assert set(seen[0].tolist()) != first  # each epoch deals the blocks anew


def test_a_distributed_stream_refuses_an_unfilled_cache_and_too_few_blocks():
    stream = ActivationStream(lambda: iter(()), MemoryCache(), batch_size=8, buffer_size=16, expected_rows=100)
    stream.shard = lambda: (0, 2)
    with pytest.raises(RuntimeError, match="complete cache"):
        list(stream)
    small = ActivationStream(lambda: iter(()), full_memory_cache(torch.zeros(100, 2)), batch_size=64,
                             buffer_size=128, expected_rows=0, block_rows=1000)
    small.shard = lambda: (1, 2)
    with pytest.raises(ValueError, match="100 activation vectors are too few for 2 processes to get one batch of 64"):
        len(small)
