import errno
import multiprocessing
import os
import shutil
import signal
import time
from pathlib import Path

import pytest
import torch

from midisc.data import shards as shard_format
from midisc.data.cache import CacheError, SharedCache, cache_bytes, cache_key
from midisc.data.activations import ActivationStream, ContextChunk

PRODUCER = dict(model="tiny", hook="model.layers.1", data={"name": "bbc"}, context_size=8)
BIG = 10**12  # a budget that never binds


def open_cache(root, producer=PRODUCER, *, dtype="float32", max_bytes=BIG, expected_bytes=0, log=None,
               shard_rows=shard_format.SHARD_ROWS):
    lines = [] if log is None else log
    return SharedCache.open(root, producer, dtype=dtype, max_bytes=max_bytes, expected_bytes=expected_bytes,
                            log=lines.append, shard_rows=shard_rows)


def heldout_chunks(dtype=torch.float32, d=6):
    out = []
    for first in (0, 3):
        tokens = torch.randint(0, 100, (3, 5))
        keep = torch.rand(3, 5) > 0.3
        out.append(ContextChunk(tokens=tokens, keep=keep, acts=torch.randn(int(keep.sum()), d).to(dtype), first=first))
    return out


def fill(cache, rows, heldout=None):
    """Harvest as train.py does: held-out contexts first, then the training rows in chunks."""
    if heldout is not None:
        cache.save_heldout(heldout)
    cache.reset()
    for part in rows.split(16):
        cache.append(part)
    cache.finish()


def partials(root):
    return [p for p in Path(root).iterdir() if ".partial-" in p.name]


def test_cache_key_depends_on_every_producer_field():
    base = dict(model="m", hook="h", layer=1)
    assert cache_key(**base) == cache_key(**dict(base))
    assert cache_key(**base) != cache_key(**{**base, "layer": 2})


def test_cache_bytes_counts_vectors_and_heldout_tokens():
    assert cache_bytes(10, 4, "float32") == 160
    assert cache_bytes(10, 4, "bfloat16", tokens=3) == 80 + 27


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_round_trip_with_heldout_chunks(tmp_path, dtype):
    name = str(dtype).removeprefix("torch.")
    rows, heldout = torch.randn(50, 6).to(dtype), heldout_chunks(dtype)
    cache = open_cache(tmp_path, dtype=name)
    assert not cache.complete
    cache.save_heldout(heldout)
    cache.reset()
    cache.append(rows[:20])
    assert not open_cache(tmp_path / "elsewhere").complete and not (tmp_path / cache.key).exists()  # unpublished
    cache.append(rows[20:])
    cache.finish()
    cache.release()
    cache.release()  # twice is harmless

    lines = []
    with open_cache(tmp_path, dtype=name, log=lines) as again:
        assert again.complete and len(again) == 50 and again.d == 6 and lines == []
        assert torch.equal(torch.cat([again.block(0, 32), again.block(32, 50)]), rows)
        back = again.load_heldout()
        assert again.meta["producer"] == PRODUCER and again.meta["heldout"] and "50 vectors × 6" in again.describe()
    assert len(back) == len(heldout)
    for got, want in zip(back, heldout):
        assert got.first == want.first and got.acts.dtype == dtype
        assert torch.equal(got.tokens, want.tokens) and torch.equal(got.keep, want.keep)
        assert torch.equal(got.acts, want.acts)


def test_a_cut_off_harvest_leaves_nothing_readable_and_the_next_open_harvests_afresh(tmp_path):
    def broken():
        yield torch.randn(30, 4)
        raise RuntimeError("simulated crash in the language model")

    cache = open_cache(tmp_path)
    stream = ActivationStream(broken, cache, batch_size=8, buffer_size=16, expected_rows=60)
    with pytest.raises(RuntimeError, match="simulated crash"):
        list(stream)
    assert not (tmp_path / cache.key).exists() and partials(tmp_path) == []

    rows = torch.randn(40, 4)
    again = open_cache(tmp_path)  # the lock was released: no waiting
    assert not again.complete
    stream = ActivationStream(lambda: iter(rows.split(10)), again, batch_size=8, buffer_size=16, expected_rows=40)
    assert len(torch.cat(list(stream))) == 40 and len(torch.cat(list(stream))) == 40
    assert stream.n_rows == 40 and again.complete
    again.release()
    with open_cache(tmp_path) as reused:
        assert torch.equal(reused.block(0, 40), rows)


def test_a_stream_cut_short_does_not_publish(tmp_path):
    cache = open_cache(tmp_path)
    stream = ActivationStream(lambda: iter(torch.randn(100, 4).split(10)), cache, batch_size=4, buffer_size=8,
                              expected_rows=100)
    batches = iter(stream)
    next(batches)
    batches.close()  # what a trainer stopping at max_steps does to the epoch
    assert stream.n_rows > 0 and not cache.complete and partials(tmp_path) == []
    assert not open_cache(tmp_path).complete


def harvest_or_reuse(root, barrier, hold_s, out):
    """One sweep job: open the shared cache, harvest if first (slowly), then read every row."""
    lines = []
    barrier.wait()
    cache = open_cache(root, log=lines)
    if not cache.complete:
        Path(out, f"harvested-{os.getpid()}").touch()
        cache.reset()
        cache.append(torch.randn(20, 3, generator=torch.Generator().manual_seed(os.getpid())))
        time.sleep(hold_s)
        cache.finish()
    torch.save({"rows": cache.block(0, len(cache)), "lines": lines}, Path(out, f"read-{os.getpid()}.pt"))
    cache.release()


def test_two_processes_harvest_once_and_read_the_same_rows(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(2)
    jobs = [ctx.Process(target=harvest_or_reuse, args=(tmp_path / "cache", barrier, 1.0, tmp_path)) for _ in range(2)]
    for job in jobs:
        job.start()
    for job in jobs:
        job.join(30)
    assert [job.exitcode for job in jobs] == [0, 0]
    assert len(list(tmp_path.glob("harvested-*"))) == 1
    first, second = (torch.load(p) for p in tmp_path.glob("read-*.pt"))
    assert torch.equal(first["rows"], second["rows"]) and len(first["rows"]) == 20
    waited = [line for job in (first, second) for line in job["lines"] if not line.startswith("cached ")]
    assert len(waited) == 1 and waited[0].startswith("waiting for another job to finish harvesting")


def hold_lock_forever(root, ready):
    cache = open_cache(root)
    cache.reset()
    cache.append(torch.ones(5, 3))
    Path(ready).touch()
    time.sleep(60)


def test_a_killed_harvester_does_not_block_the_next_job(tmp_path):
    ready = tmp_path / "ready"
    job = multiprocessing.get_context("spawn").Process(target=hold_lock_forever, args=(tmp_path / "cache", ready))
    job.start()
    deadline = time.time() + 20
    while not ready.exists() and time.time() < deadline:
        time.sleep(0.05)
    assert ready.exists() and len(partials(tmp_path / "cache")) == 1
    os.kill(job.pid, signal.SIGKILL)
    job.join(10)

    started = time.time()
    cache = open_cache(tmp_path / "cache")
    assert time.time() - started < 2 and not cache.complete
    owners = [p.name.split(".partial-")[1].split("-")[0] for p in partials(tmp_path / "cache")]
    assert owners == [str(os.getpid())]  # the dead job's partial folder is gone, ours is being written
    fill(cache, torch.randn(8, 3))
    assert cache.complete


def test_lru_eviction_keeps_within_budget_and_spares_caches_in_use(tmp_path):
    size = cache_bytes(100, 8, "float32")  # 3,200 bytes per cache
    lines, rows = [], [torch.randn(100, 8) for _ in range(3)]
    for i in range(3):  # 0 is the oldest
        with open_cache(tmp_path, {**PRODUCER, "i": i}, max_bytes=4 * size, expected_bytes=size) as cache:
            fill(cache, rows[i])
        os.utime(tmp_path / cache.key, (1000 + i, 1000 + i))
    in_use = open_cache(tmp_path, {**PRODUCER, "i": 0})  # the oldest, but a job is reading it
    assert in_use.complete

    budget = 3 * size + 3000  # room for three caches with their small manifest.json files and shard headers
    new = open_cache(tmp_path, {**PRODUCER, "i": 3}, max_bytes=budget, expected_bytes=size, log=lines)
    keys = {i: cache_key(**{**PRODUCER, "i": i}) for i in range(4)}
    assert (tmp_path / keys[0]).exists() and not (tmp_path / keys[1]).exists() and (tmp_path / keys[2]).exists()
    assert len(lines) == 1 and lines[0].startswith(f"evicting cached activations {tmp_path / keys[1]}")
    fill(new, torch.randn(100, 8))
    assert sum(f.stat().st_size for p in tmp_path.iterdir() if p.is_dir() for f in p.iterdir()) <= budget
    assert torch.equal(in_use.block(0, 100), rows[0])
    in_use.release()
    new.release()


def test_a_budget_too_small_says_so_in_one_line_and_evicts_nothing(tmp_path):
    with open_cache(tmp_path, {**PRODUCER, "i": 0}) as cache:
        fill(cache, torch.randn(10, 4))
    with pytest.raises(CacheError) as info:
        open_cache(tmp_path, expected_bytes=5000, max_bytes=1000)
    message = str(info.value)
    assert "\n" not in message and "budget is 1.0 kB" in message and str(tmp_path) in message
    assert "activations.cache_max_gb=0.1" in message and "activations.cache=memory" in message
    assert (tmp_path / cache.key).exists()
    assert not open_cache(tmp_path).complete  # the failed open released its lock


def test_too_little_free_disk_raises_cache_error(tmp_path, monkeypatch):
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9 - 10**6, 10**6))
    with pytest.raises(CacheError) as info:
        open_cache(tmp_path, expected_bytes=10**8)
    message = str(info.value)
    assert "\n" not in message and "free on the disk" in message and "activations.cache_dir=" in message
    assert partials(tmp_path) == []


@pytest.mark.parametrize("when", ["append", "finish"])
def test_a_full_disk_while_writing_raises_cache_error_and_leaves_no_partial_folder(tmp_path, monkeypatch, when):
    cache = open_cache(tmp_path, shard_rows=8)
    cache.reset()
    cache.append(torch.randn(10, 4))  # one shard written, 2 rows buffered

    def disk_full(path, tensors):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(shard_format, "write_shard", disk_full)
    with pytest.raises(CacheError) as info:
        cache.append(torch.randn(10, 4)) if when == "append" else cache.finish()
    assert "\n" not in str(info.value) and "filled up" in str(info.value) and str(tmp_path) in str(info.value)
    assert partials(tmp_path) == [] and not (tmp_path / cache.key).exists()
    monkeypatch.undo()
    assert not open_cache(tmp_path).complete  # lock released: the next job harvests at once


def test_a_copied_cache_opens_complete_under_another_root_and_reads_the_same_rows(tmp_path):
    rows, heldout = torch.randn(45, 6), heldout_chunks()
    with open_cache(tmp_path / "a", shard_rows=16) as cache:
        fill(cache, rows, heldout)
    shutil.copytree(tmp_path / "a" / cache.key, tmp_path / "b" / cache.key)
    lines = []
    with open_cache(tmp_path / "b", log=lines) as copied:
        assert copied.complete and lines == [] and len(copied) == 45 and copied.shards() == cache.shards()
        assert torch.equal(copied.block(0, 45), rows) and torch.equal(copied.block(10, 40), rows[10:40])
        assert [c.first for c in copied.load_heldout()] == [c.first for c in heldout]


def test_a_copy_cut_short_counts_as_incomplete_and_is_harvested_again(tmp_path):
    with open_cache(tmp_path / "a", shard_rows=16) as cache:
        fill(cache, torch.randn(45, 6))
    shutil.copytree(tmp_path / "a" / cache.key, tmp_path / "b" / cache.key)
    shard = tmp_path / "b" / cache.key / "shard-00001.safetensors"
    shard.write_bytes(shard.read_bytes()[:-10])
    again = open_cache(tmp_path / "b")
    assert not again.complete and not (tmp_path / "b" / cache.key).exists()  # replaced, as an older layout is
    fill(again, torch.randn(5, 6))
    assert len(again) == 5 and again.complete


def test_stream_harvests_into_a_shared_cache_once_then_reads_it(tmp_path):
    calls = []

    def source():
        calls.append(1)
        for i in range(10):
            yield torch.randn(30, 4) + i

    cache = open_cache(tmp_path)
    stream = ActivationStream(source, cache, batch_size=16, buffer_size=64, expected_rows=300)
    epoch1, epoch2 = torch.cat(list(stream)), torch.cat(list(stream))
    assert calls == [1] and stream.n_rows == 300 and len(epoch1) == len(epoch2) == 18 * 16
    cache.release()
    with open_cache(tmp_path) as reused:
        later = ActivationStream(source, reused, batch_size=16, buffer_size=64, expected_rows=300)
        assert later.reused_cache and len(torch.cat(list(later))) == 18 * 16 and calls == [1]
