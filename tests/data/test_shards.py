import errno
import hashlib
import json
import os
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from midisc.data import merge as merging
from midisc.data.cache import SharedCache, cache_key
from midisc.data.merge import merge, merge_into
from midisc.data.shards import MANIFEST_FILE, ShardError, ShardReader, load_manifest, verify
from midisc.data.activations import ContextChunk

PRODUCER = dict(model="tiny", hook="model.layers.1", data={"name": "bbc"}, context_size=8)


def harvest(root, rows, *, producer=PRODUCER, dtype="float32", shard_rows=7, token_ids=None, heldout=None,
            chunk=5):
    """A complete cache of `rows`, appended in chunks of `chunk` rows as a harvest does; its folder."""
    cache = SharedCache.open(root, producer, dtype=dtype, max_bytes=None, expected_bytes=0, log=lambda _: None,
                             shard_rows=shard_rows)
    assert not cache.complete
    if heldout is not None:
        cache.save_heldout(heldout)
    cache.reset()
    for start in range(0, len(rows), chunk):
        ids = None if token_ids is None else token_ids[start:start + chunk]
        cache.append(rows[start:start + chunk], ids)
    cache.finish()
    cache.release()
    return cache.folder


def reopen(root, producer=PRODUCER):
    return SharedCache.open(root, producer, dtype="float32", max_bytes=None, expected_bytes=0, log=lambda _: None)


def heldout_set(seed):
    g = torch.Generator().manual_seed(seed)
    keep = torch.rand(2, 5, generator=g) > 0.3
    return [ContextChunk(tokens=torch.randint(0, 50, (2, 5), generator=g), keep=keep,
                         acts=torch.randn(int(keep.sum()), 4, generator=g), first=0)]


def multiset(rows):
    return sorted(map(tuple, rows.tolist()))


def test_reads_across_shard_boundaries_equal_a_plain_concatenation(tmp_path):
    rows = torch.randn(100, 6)
    folder = harvest(tmp_path, rows, shard_rows=7, chunk=13)
    rng = random.Random(0)
    with reopen(tmp_path) as cache:
        assert [s["rows"] for s in cache.shards()] == [7] * 14 + [2]  # fixed size, the last one shorter
        assert [s["first"] for s in cache.shards()] == list(range(0, 100, 7))
        for _ in range(300):
            start, stop = sorted(rng.randrange(-5, 110) for _ in range(2))
            want = rows[max(start, 0):max(stop, 0)]
            got = cache.block(start, stop)
            assert got.shape == want.shape and torch.equal(got, want)
        assert torch.equal(cache.block(0, 100), rows) and cache.block(50, 50).shape == (0, 6)
        assert torch.equal(cache.block(6, 8), rows[6:8]) and torch.equal(cache.block(7, 14), rows[7:14])
    # Each shard is a safetensors file of its own, and they add up to the whole.
    shards = [load_file(folder / s["file"])["acts"] for s in load_manifest(folder)["shards"]]
    assert torch.equal(torch.cat(shards), rows)


def test_a_full_shard_is_written_at_once_and_memory_holds_one_shard_at_most(tmp_path):
    cache = SharedCache.open(tmp_path, PRODUCER, dtype="float32", max_bytes=None, expected_bytes=0,
                             log=lambda _: None, shard_rows=8)
    cache.reset()
    cache.append(torch.randn(20, 3))
    partial = cache._partial
    assert sorted(p.name for p in partial.glob("shard-*")) == ["shard-00000.safetensors", "shard-00001.safetensors"]
    assert cache._writer._acts.shape == (8, 3)  # the one buffer, holding the 4 rows of the third shard
    cache.reset()  # a harvest started again drops what it wrote
    assert list(partial.glob("shard-*")) == []
    cache.append(torch.randn(3, 3))
    cache.finish()
    assert len(cache) == 3 and cache._writer is None and [s["rows"] for s in cache.shards()] == [3]
    cache.release()


@pytest.mark.parametrize("given", [torch.float32, torch.bfloat16])
def test_bfloat16_round_trip(tmp_path, given):
    rows = torch.randn(30, 5).to(given)
    folder = harvest(tmp_path, rows, dtype="bfloat16", shard_rows=8)
    with reopen(tmp_path) as cache:
        assert cache.dtype == "bfloat16" and cache.block(0, 30).dtype == torch.bfloat16
        assert torch.equal(cache.block(3, 27), rows.to(torch.bfloat16)[3:27])  # bit for bit, rounded once
    first = load_file(folder / "shard-00000.safetensors")["acts"]
    assert first.dtype == torch.bfloat16 and torch.equal(first, rows.to(torch.bfloat16)[:8])


def test_token_ids_are_kept_beside_their_rows(tmp_path):
    rows, ids = torch.randn(23, 4).to(torch.bfloat16), torch.randint(0, 50_000, (23,))
    folder = harvest(tmp_path, rows, dtype="bfloat16", shard_rows=6, token_ids=ids)
    with reopen(tmp_path) as cache:
        assert cache.meta["token_ids"] and torch.equal(cache.token_ids(4, 20), ids[4:20].to(torch.int32))
        assert torch.equal(cache.block(0, 23), rows)
    shard = load_file(folder / "shard-00001.safetensors")
    assert shard["token_ids"].dtype == torch.int32 and torch.equal(shard["token_ids"], ids[6:12].to(torch.int32))
    assert torch.equal(shard["acts"], rows[6:12])

    without = harvest(tmp_path / "none", rows)
    with reopen(tmp_path / "none") as cache:
        assert cache.token_ids(0, 5) is None and set(load_file(without / "shard-00000.safetensors")) == {"acts"}


def test_token_ids_with_some_appends_only_are_refused(tmp_path):
    with SharedCache.open(tmp_path, PRODUCER, dtype="float32", max_bytes=None, expected_bytes=0,
                          log=lambda _: None) as cache:
        cache.reset()
        cache.append(torch.randn(3, 4), torch.arange(3))
        with pytest.raises(ValueError, match="give them with every append or with none"):
            cache.append(torch.randn(3, 4))
        with pytest.raises(ValueError, match=r"token_ids of shape \(2,\) for 3 rows"):
            cache.append(torch.randn(3, 4), torch.arange(2))
        with pytest.raises(ValueError, match="cannot join a cache of width 4"):
            cache.append(torch.randn(3, 5), torch.arange(3))


def test_the_manifest_describes_every_shard_with_hand_computed_stats(tmp_path):
    rows = torch.tensor([[3.0, 4.0], [0.0, 0.0], [1.0, 0.0], [6.0, 8.0], [0.0, -2.0]])
    folder = harvest(tmp_path, rows, shard_rows=3, heldout=[ContextChunk(
        tokens=torch.zeros(1, 3, dtype=torch.int64), keep=torch.tensor([[False, True, True]]),
        acts=torch.ones(2, 2), first=0)])
    manifest = json.loads((folder / MANIFEST_FILE).read_text())
    assert {k: manifest[k] for k in ("format", "key", "producer", "dtype", "d", "rows", "shard_rows", "token_ids")} \
        == {"format": 2, "key": cache_key(**PRODUCER), "producer": PRODUCER, "dtype": "float32", "d": 2, "rows": 5,
            "shard_rows": 3, "token_ids": False}
    assert manifest["created"] and manifest["heldout"]["file"] == "heldout.safetensors"
    first, second = manifest["shards"]
    assert (first["file"], first["rows"], first["first"]) == ("shard-00000.safetensors", 3, 0)
    assert (second["file"], second["rows"], second["first"]) == ("shard-00001.safetensors", 2, 3)
    assert first["stats"] == pytest.approx({"mean_norm": (5 + 0 + 1) / 3, "max_norm": 5, "mean_sq_norm": 26 / 3})
    assert second["stats"] == pytest.approx({"mean_norm": (10 + 2) / 2, "max_norm": 10, "mean_sq_norm": 104 / 2})
    for entry in manifest["shards"] + [manifest["heldout"]]:
        data = (folder / entry["file"]).read_bytes()
        assert entry["bytes"] == len(data) and entry["sha256"] == hashlib.sha256(data).hexdigest()


def test_the_reader_takes_data_offsets_from_the_safetensors_header(tmp_path):
    rows, ids = torch.randn(9, 3), torch.arange(9)
    folder = harvest(tmp_path, rows, shard_rows=4, token_ids=ids)
    data = (folder / "shard-00000.safetensors").read_bytes()
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + size])
    assert (8 + size) % 8 == 0 and header["acts"]["shape"] == [4, 3] and header["token_ids"]["dtype"] == "I32"
    begin = 8 + size + header["acts"]["data_offsets"][0]
    assert torch.equal(torch.frombuffer(bytearray(data[begin:begin + 48]), dtype=torch.float32).view(4, 3), rows[:4])
    reader = ShardReader(folder, load_manifest(folder))
    assert torch.equal(reader.read(2, 9), rows[2:]) and torch.equal(reader.read(3, 6, "token_ids"),
                                                                      ids[3:6].to(torch.int32))


def test_verify_passes_a_sound_folder_and_catches_a_flipped_byte_and_a_truncated_shard(tmp_path):
    folder = harvest(tmp_path, torch.randn(20, 4), shard_rows=8, heldout=heldout_set(0))
    assert verify(folder) == []
    shard = folder / "shard-00001.safetensors"
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0x01
    shard.write_bytes(bytes(data))
    (problem,) = verify(folder)
    assert "\n" not in problem and str(shard) in problem and "sha256" in problem
    last = folder / "shard-00002.safetensors"
    last.write_bytes(last.read_bytes()[:-4])
    problems = verify(folder)
    assert len(problems) == 2 and any(p.startswith(f"{last} is ") and "its manifest says" in p for p in problems)
    (folder / "heldout.safetensors").unlink()
    assert any(p.endswith("heldout.safetensors is missing") for p in verify(folder))
    (folder / MANIFEST_FILE).unlink()
    assert verify(folder) == [f"{folder} holds no manifest.json: it is not a complete activation cache"]


def test_a_folder_of_the_old_layout_is_replaced(tmp_path):
    old = tmp_path / cache_key(**PRODUCER)
    old.mkdir()
    (old / "acts.bin").write_bytes(torch.randn(10, 4).numpy().tobytes())
    (old / "meta.json").write_text(json.dumps({"format": 1, "rows": 10, "d": 4, "dtype": "float32"}))
    with pytest.raises(ShardError, match="format 1's acts.bin"):
        load_manifest(old)
    rows = torch.randn(12, 4)
    folder = harvest(tmp_path, rows)
    assert folder == old and not (old / "acts.bin").exists() and not (old / "meta.json").exists()
    with reopen(tmp_path) as cache:
        assert cache.complete and torch.equal(cache.block(0, 12), rows)


def split_harvest(root, rows, parts=2, heldout_in=0, **kwargs):
    """The folders of a harvest split into `parts`, each from its own slice of the rows; the held-out set in one."""
    folders = []
    for i, piece in enumerate(rows.tensor_split(parts)):
        producer = {**PRODUCER, "part": f"{i}/{parts}"}
        folders.append(harvest(root / f"machine{i}", piece, producer=producer,
                               heldout=heldout_set(0) if i == heldout_in else None, **kwargs))
    return folders


def test_merging_two_halves_gives_the_whole_and_opens_as_the_unsplit_producer(tmp_path):
    rows, ids = torch.randn(41, 5), torch.randint(0, 1000, (41,))
    whole = harvest(tmp_path / "whole", rows, shard_rows=6, token_ids=ids, heldout=heldout_set(0))
    parts = []
    for i, (piece, piece_ids) in enumerate(zip(rows.tensor_split(2), ids.tensor_split(2))):
        parts.append(harvest(tmp_path / f"machine{i}", piece, producer={**PRODUCER, "part": f"{i}/2"}, shard_rows=6,
                             token_ids=piece_ids, heldout=heldout_set(0) if i == 1 else None))
    folder = merge_into(parts, tmp_path / "cache", log=lambda _: None)
    assert folder == tmp_path / "cache" / cache_key(**PRODUCER) and verify(folder) == []
    manifest = load_manifest(folder)
    assert manifest["producer"] == PRODUCER and manifest["rows"] == 41 and manifest["token_ids"]
    assert [s["file"] for s in manifest["shards"]] == [f"shard-{i:05d}.safetensors" for i in range(8)]
    assert os.stat(folder / "shard-00004.safetensors").st_ino == os.stat(parts[1] / "shard-00000.safetensors").st_ino
    with reopen(tmp_path / "cache") as merged, reopen(tmp_path / "whole") as one:
        assert merged.complete and len(merged) == len(one) == 41
        assert multiset(merged.block(0, 41)) == multiset(one.block(0, 41)) == multiset(rows)
        assert torch.equal(merged.block(0, 41), rows) and torch.equal(merged.token_ids(0, 41), ids.to(torch.int32))
        assert [torch.equal(a.acts, b.acts) for a, b in zip(merged.load_heldout(), one.load_heldout())] == [True]
    assert whole.name == folder.name  # the same key as the unsplit harvest's
    said = []
    assert merge_into(parts, tmp_path / "cache", log=said.append) == folder  # again: kept, nothing merged
    assert said == [f"{folder} already holds a complete cache of this producer; nothing merged"]
    assert os.stat(folder / "shard-00004.safetensors").st_ino == os.stat(parts[1] / "shard-00000.safetensors").st_ino


def test_merge_copies_where_hard_links_fail(tmp_path, monkeypatch):
    parts = split_harvest(tmp_path, torch.randn(20, 3))

    def no_links(source, target):
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(os, "link", no_links)
    lines = []
    manifest = merge(parts, tmp_path / "merged", log=lines.append)
    assert manifest["rows"] == 20 and verify(tmp_path / "merged") == [] and "copied" in lines[0]
    assert os.stat(tmp_path / "merged" / "shard-00000.safetensors").st_nlink == 1


@pytest.mark.parametrize("change, message", [
    (dict(dtype="bfloat16"),
     "cannot merge: .*machine1/\\w+ has dtype='bfloat16' but .*machine0/\\w+ has dtype='float32'"),
    (dict(width=6), "cannot merge: .*machine1/\\w+ has d=6 but .*machine0/\\w+ has d=4"),
    (dict(producer={"context_size": 16}), "made by another producer than .*: context_size=16 there, 8 here"),
])
def test_merge_refuses_parts_that_differ(tmp_path, change, message):
    first = harvest(tmp_path / "machine0", torch.randn(10, 4), producer={**PRODUCER, "part": "0/2"})
    second = harvest(tmp_path / "machine1", torch.randn(10, change.get("width", 4)),
                     producer={**PRODUCER, **change.get("producer", {}), "part": "1/2"},
                     dtype=change.get("dtype", "float32"))
    with pytest.raises(ShardError, match=message) as info:
        merge([first, second], tmp_path / "merged")
    assert "\n" not in str(info.value) and not (tmp_path / "merged").exists()
    assert not [p for p in tmp_path.iterdir() if ".partial-" in p.name]


def test_merge_refuses_two_held_out_sets_a_missing_part_and_a_part_twice(tmp_path):
    rows = torch.randn(20, 4)
    parts = split_harvest(tmp_path / "a", rows)
    other = harvest(tmp_path / "b", rows[10:], producer={**PRODUCER, "part": "1/2"}, heldout=heldout_set(1))
    with pytest.raises(ShardError, match="hold different held-out sets"):
        merge([parts[0], other], tmp_path / "merged")
    with pytest.raises(ShardError, match=r"the parts are 0/2: not every part of one split"):
        merge(parts[:1], tmp_path / "merged")
    with pytest.raises(ShardError, match="are both part '1/2': one part given twice"):
        merge([parts[0], parts[1], other], tmp_path / "merged")
    with pytest.raises(ShardError, match="holds no manifest.json"):
        merge([parts[0], tmp_path], tmp_path / "merged")
    assert not (tmp_path / "merged").exists()


def test_a_merge_cut_short_leaves_no_folder(tmp_path, monkeypatch):
    parts = split_harvest(tmp_path, torch.randn(20, 3))

    def crash(*args):
        raise RuntimeError("killed mid-merge")

    monkeypatch.setattr(merging, "write_synced", crash)
    with pytest.raises(RuntimeError, match="killed mid-merge"):
        merge(parts, tmp_path / "root" / "merged")
    assert list((tmp_path / "root").iterdir()) == []
    assert all(Path(p).is_dir() and verify(p) == [] for p in parts)  # the parts are untouched
