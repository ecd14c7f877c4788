"""Disk cache reads: the sharded layout through `SharedCache.block` against raw reads of one flat file.

Why: format 2 of the activation cache (midisc/data/shards.py) splits the rows into safetensors shards of 65,536
rows, each read at the data offset its header gives; format 1 was one flat file of raw rows. Training reads
the cache back in blocks of 4096 rows (ActivationStream.block_rows) in random order, so what the shards add is
per block: finding the shard, and a second read where a block crosses a boundary. This measures that price.

- sharded: a cache written through `SharedCache` (append in chunks of 4096 rows, finish), read with
  `SharedCache.block(start, stop)`: preadv into a fresh buffer, as epochs after the first do.
- flat: the same rows in the same order as one raw file, read with preadv into a fresh buffer and viewed as a
  tensor: what format 1's reader did.

Patterns: `random`, every 4096-row block once in a random order with starts at multiples of 4096 (how
ActivationStream reads); `sequential`, the same blocks in order; `random, unaligned`, as many blocks at random
starts, one in 16 of which crosses a shard boundary and takes two reads. The two readers read each block in turn,
taking turns to go first, and each figure is the median of the rounds. Both files sit in the page cache (they
were just written), so this is the cost of the format itself; `--cold` drops each file's pages before each pass
(posix_fadvise DONTNEED) to read from the disk instead: give it --rows and --rounds that fit the time. The write
figures time the harvest's side: append and finish (sha256 and norms included) against writing and syncing the
flat file.

    python bench/shards.py [--quick] [--rows N] [--d N] [--dtype float32|bfloat16] [--cold] [--dir PATH]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from midisc.data.cache import SharedCache
from midisc.data.shards import SHARD_ROWS

from output import result, table

BLOCK = 4096   # rows per read: ActivationStream.block_rows
TARGET = 0.9   # sharded / flat read throughput, for every pattern


def chunks(rows: int, d: int, seed: int = 0):
    """The same rows [BLOCK, d] every time: the cache and the flat file are written from one sequence."""
    generator = torch.Generator().manual_seed(seed)
    for start in range(0, rows, BLOCK):
        yield torch.randn(min(BLOCK, rows - start), d, generator=generator)


def write_both(folder: Path, rows: int, d: int, dtype: str, shard_rows: int) -> tuple[SharedCache, Path, dict]:
    cache = SharedCache.open(folder / "cache", {"bench": "shards", "rows": rows, "d": d}, dtype=dtype, max_bytes=None,
                             expected_bytes=0, log=lambda _: None, shard_rows=shard_rows)
    seconds = {"sharded": 0.0, "flat": 0.0}
    cache.reset()
    for chunk in chunks(rows, d):
        start = time.perf_counter()
        cache.append(chunk)
        seconds["sharded"] += time.perf_counter() - start
    start = time.perf_counter()
    cache.finish()
    seconds["sharded"] += time.perf_counter() - start
    flat = folder / "flat.bin"
    torch_dtype = getattr(torch, dtype)
    with open(flat, "wb") as file:
        for chunk in chunks(rows, d):
            start = time.perf_counter()
            file.write(memoryview(chunk.to(torch_dtype).view(torch.uint8).numpy()).cast("B"))
            seconds["flat"] += time.perf_counter() - start
        start = time.perf_counter()
        file.flush()
        os.fsync(file.fileno())
        seconds["flat"] += time.perf_counter() - start
    return cache, flat, seconds


def flat_reader(path: Path, d: int, dtype: torch.dtype):
    """Format 1's reader: rows [start:stop] of a raw file by preadv into a fresh buffer."""
    file = open(path, "rb")  # noqa: SIM115  lives as long as the reader
    row_bytes = d * dtype.itemsize

    def block(start: int, stop: int) -> torch.Tensor:
        buffer = bytearray((stop - start) * row_bytes)
        if os.preadv(file.fileno(), [buffer], start * row_bytes) != len(buffer):
            raise OSError(f"{path} is short")
        return torch.frombuffer(buffer, dtype=dtype).view(-1, d)
    return block


def drop_pages(paths: list[Path]) -> None:
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="24,576 rows of 32 in shards of 5,000 (for tests)")
    parser.add_argument("--rows", type=int, default=524_288, help="vectors in the cache (default 524,288: 8 shards)")
    parser.add_argument("--d", type=int, default=576, help="vector width (default 576, SmolLM2's)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--rounds", type=int, default=7, help="timed rounds of each reader and pattern")
    parser.add_argument("--cold", action="store_true", help="drop the files' pages before each pass: read the disk")
    parser.add_argument("--dir", type=Path, default=None, help="where to write the files (default: the temp folder)")
    args = parser.parse_args()
    rows, d, shard_rows, rounds = (24_576, 32, 5_000, 2) if args.quick else (args.rows, args.d, SHARD_ROWS,
                                                                            args.rounds)
    dtype = getattr(torch, args.dtype)
    gb = rows * d * dtype.itemsize / 1e9
    generator = torch.Generator().manual_seed(1)
    starts = list(range(0, rows, BLOCK))
    patterns = {"random": [starts[i] for i in torch.randperm(len(starts), generator=generator).tolist()],
                "sequential": starts,
                "random, unaligned": torch.randint(0, rows - BLOCK + 1, (len(starts),), generator=generator).tolist()}
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        cache, flat, write_s = write_both(Path(tmp), rows, d, args.dtype, shard_rows)
        files = [cache.folder / s["file"] for s in cache.shards()] + [flat]
        readers = {"sharded": cache.block, "flat": flat_reader(flat, d, dtype)}
        for start in (0, starts[-1], patterns["random, unaligned"][0]):  # both read the same rows, or nothing counts
            assert torch.equal(readers["sharded"](start, start + BLOCK), readers["flat"](start, start + BLOCK))
        seconds = {(pattern, name): [] for pattern in patterns for name in readers}
        for i in range(rounds + 1):  # the first round warms up and is not counted
            for pattern, order in patterns.items():
                if args.cold:
                    drop_pages(files)
                spent = dict.fromkeys(readers, 0.0)
                for j, first in enumerate(order):
                    # Block by block, who goes first taking turns: a machine that slows down slows both alike.
                    for name, read in sorted(readers.items(), reverse=bool((i + j) % 2)):
                        start = time.perf_counter()
                        read(first, min(first + BLOCK, rows))
                        spent[name] += time.perf_counter() - start
                for name in readers:
                    seconds[(pattern, name)].append(spent[name])
        shards = len(cache.shards())
        cache.release()
    out = []
    for pattern, order in patterns.items():
        read_gb = sum(min(first + BLOCK, rows) - first for first in order) * d * dtype.itemsize / 1e9
        sharded, plain = (read_gb / statistics.median(seconds[(pattern, name)][1:]) for name in readers)
        out.append({"pattern": pattern, "sharded_gb_s": sharded, "flat_gb_s": plain, "ratio": sharded / plain,
                    "pass": sharded / plain >= TARGET})
    write = {"sharded_gb_s": gb / write_s["sharded"], "flat_gb_s": gb / write_s["flat"],
             "ratio": write_s["flat"] / write_s["sharded"]}
    where = "the disk (pages dropped)" if args.cold else "the page cache"
    table(f"reads of {BLOCK}-row blocks from {rows:,} rows × {d} {args.dtype} ({gb:.2f} GB, {shards} shards of "
          f"{shard_rows:,}) from {where}, median of {rounds} rounds",
          ["pattern", "sharded GB/s", "flat file GB/s", "ratio", "target", "result"],
          [[r["pattern"], r["sharded_gb_s"], r["flat_gb_s"], r["ratio"], f"≥ {TARGET}×", r["pass"]] for r in out])
    table("writes (the harvest's side: sha256 and norms of every shard included)",
          ["writer", "sharded GB/s", "flat file GB/s", "ratio"],
          [["append + finish", write["sharded_gb_s"], write["flat_gb_s"], write["ratio"]]])
    result({"rows": out, "targets_met": all(r["pass"] for r in out), "write": write, "vectors": rows, "d": d,
            "dtype": args.dtype, "shards": shards, "cold": args.cold})


if __name__ == "__main__":
    main()
