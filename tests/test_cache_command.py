"""`python -m midisc.cache` show, verify and merge.

Most cases call `main` in this process; two run the real command line, for the exit status and the one-line
error that `run_tool` makes of a mistake.
"""

from __future__ import annotations

import json

import torch

from conftest import run_cli
from midisc.cache import main
from midisc.data.cache import SharedCache, cache_key

PRODUCER = {"model": "tiny", "hook": "model.layers.1", "context_size": 8}


def harvest(root, rows, producer=PRODUCER, shard_rows=4):
    with SharedCache.open(root, producer, dtype="float32", max_bytes=None, expected_bytes=0, log=lambda _: None,
                          shard_rows=shard_rows) as cache:
        cache.reset()
        cache.append(rows)
        cache.finish()
    return cache.folder


def test_show_prints_the_producer_and_a_line_per_shard(tmp_path, capsys):
    folder = harvest(tmp_path, torch.tensor([[3.0, 4.0]] * 5 + [[0.0, 1.0]] * 4))
    assert main(["show", str(folder)]) == 0
    out = capsys.readouterr().out
    assert f"cache {folder} (format 2, key {folder.name}" in out and "model='tiny'" in out
    assert "9 vectors × 2, float32, in 3 shard(s) of up to 4 rows; token ids: no; held-out: none" in out
    lines = {line.split()[0]: line.split() for line in out.splitlines() if line.startswith(("shard-", "all"))}
    assert sorted(lines) == ["all", "shard-00000.safetensors", "shard-00001.safetensors", "shard-00002.safetensors"]
    # Shard 1 holds one row of norm 5 and three of norm 1: rows, first, size (2 words), mean, max, mean square.
    second = lines["shard-00001.safetensors"]
    assert second[1:3] == ["4", "4"] and second[5:8] == ["2", "5", "7"]
    assert lines["all"][1] == "9" and lines["all"][4:7] == ["3.222", "5", "14.33"]  # weighted by rows: 29/9, 129/9

    assert main(["show", str(folder), "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["rows"] == 9 and len(shown["shards"]) == 3 and shown["totals"]["max_norm"] == 5.0


def test_verify_says_sound_or_lists_the_problems_with_exit_status_1(tmp_path, capsys):
    folder = harvest(tmp_path, torch.randn(9, 3))
    assert main(["verify", str(folder)]) == 0
    assert "all 3 file(s) match the sizes and sha256 of the manifest (9 vectors)" in capsys.readouterr().out
    shard = folder / "shard-00001.safetensors"
    shard.write_bytes(shard.read_bytes()[:-1] + b"\x7f")
    assert main(["verify", str(folder), "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert not report["sound"] and len(report["problems"]) == 1 and "sha256" in report["problems"][0]


def test_merge_puts_the_whole_harvest_where_training_finds_it(tmp_path, capsys):
    rows = torch.randn(10, 3)
    parts = [harvest(tmp_path / f"machine{i}", piece, {**PRODUCER, "part": f"{i}/2"})
             for i, piece in enumerate(rows.tensor_split(2))]
    assert main(["merge", *map(str, parts), "--into", str(tmp_path / "cache")]) == 0
    folder = tmp_path / "cache" / cache_key(**PRODUCER)
    assert f"{folder}: the whole harvest of 2 part(s), 10 vectors in 4 shard(s)" in capsys.readouterr().out
    with SharedCache.open(tmp_path / "cache", PRODUCER, dtype="float32", max_bytes=None, expected_bytes=0,
                          log=lambda _: None) as cache:
        assert cache.complete and torch.equal(cache.block(0, 10), rows)


def test_mistakes_end_in_one_error_line_and_exit_status_2(tmp_path):
    first = harvest(tmp_path / "machine0", torch.randn(4, 3), {**PRODUCER, "part": "0/2"})
    wide = harvest(tmp_path / "machine1", torch.randn(4, 5), {**PRODUCER, "part": "1/2"})
    done = run_cli(["midisc.cache", "merge", str(first), str(wide), "--into", str(tmp_path / "cache")], cwd=tmp_path)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.startswith("error: cannot merge: ") and len(done.stderr.splitlines()) == 1
    assert "has d=5 but" in done.stderr and not (tmp_path / "cache" / cache_key(**PRODUCER)).exists()
    done = run_cli(["midisc.cache", "show", str(tmp_path)], cwd=tmp_path)
    assert done.returncode == 2 and done.stderr == f"error: {tmp_path} holds no manifest.json: it is not a " \
                                                   "complete activation cache\n"


def test_merge_takes_the_roots_of_a_split_harvest_of_several_hooks(tmp_path, capsys):
    def part(root, producer, label, rows):
        cache = SharedCache.open(root, {**producer, "part": label}, dtype="float32", max_bytes=None,
                                 expected_bytes=0, log=lambda _: None)
        cache.reset()
        cache.append(rows)
        cache.finish()
        cache.release()

    hooks = [{"hook": "model.layers.1"}, {"hook": "model.layers.2"}]
    for i in range(2):
        for producer in hooks:
            part(tmp_path / f"part{i}", producer, f"{i}/2", torch.full((3, 4), float(i)))
    assert main(["merge", str(tmp_path / "part0"), str(tmp_path / "part1"), "--into", str(tmp_path / "c")]) == 0
    out = capsys.readouterr().out
    assert out.count("the whole harvest of 2 part(s), 6 vectors") == 2
    for producer in hooks:
        with SharedCache.open(tmp_path / "c", producer, dtype="float32", max_bytes=None, expected_bytes=0,
                              log=lambda _: None) as cache:
            assert cache.complete and len(cache) == 6
    # Again: the caches are kept (the same vectors), nothing merged twice.
    assert main(["merge", str(tmp_path / "part0"), str(tmp_path / "part1"), "--into", str(tmp_path / "c")]) == 0
    assert capsys.readouterr().out.count("nothing merged") == 2
    refused = run_cli(["midisc.cache", "merge", str(tmp_path), "--into", str(tmp_path / "d")], tmp_path)
    assert refused.returncode == 2 and "holds no part of a split harvest" in refused.stderr  # a root of no parts
