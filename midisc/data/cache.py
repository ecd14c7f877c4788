"""Activations harvested once per producer and shared on disk by every run and process that needs them.

A sweep of six SAE settings on one layer runs the language model once: the first job harvests into
root/<key>/ (key: a hash of the model, hook, data, context… that produced the vectors), the others wait
for it and then read its files. Under root:

    <key>/             a complete cache: shard-*.safetensors, heldout.safetensors, manifest.json (shards.py)
    <key>.lock         flock: exclusive while a job harvests or evicts it, shared while jobs read it
    <key>.partial-*    a harvest in progress, published with one rename: a cut-off harvest is never read
    .budget.lock       one job at a time weighs the disk budget and evicts

flock(2) locks belong to an open file, and the kernel drops them when a process dies, even by SIGKILL:
a crashed job never blocks the next one, which also removes the crashed job's partial folder. A folder is
self-contained: copied to another root (or merged from parts, merge.py), it opens there as complete.
"""

from __future__ import annotations

import errno
import fcntl
import json
import math
import os
import random
import re
import secrets
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import BinaryIO

import torch
from safetensors.torch import load_file, save

from midisc.data.activations import STORE_DTYPES, ContextChunk
from midisc.data.shards import (HELDOUT_FILE, MANIFEST_FILE, SHARD_ROWS, ShardReader, ShardWriter, cache_key,
                                complete_manifest, describe_file, fsync_dir, make_manifest, write_synced)

RESERVED_FILE = "expected_bytes"
DISK_MARGIN = 64 * 2**20  # free disk left after a harvest, for checkpoints, logs and the filesystem itself
KEY_NAME = re.compile(r"[0-9a-f]{16}")
DISK_FIXES = "free disk space, or set activations.cache_dir=… on a bigger disk or activations.cache=memory"


class CacheError(RuntimeError):
    """The activation cache cannot be written: budget or disk too small, or the disk filled up while writing."""


def cache_bytes(rows: int, d: int, dtype: str, *, tokens: int = 0) -> int:
    """Bytes on disk for `rows` vectors of width d, plus `tokens` held-out token positions (int64 id + keep flag)."""
    return rows * d * STORE_DTYPES[dtype].itemsize + tokens * 9


def human(n: float) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB" if n >= 1e6 else f"{n / 1e3:.1f} kB"


class SharedCache:
    """One producer's activations under root/<key>/, harvested by one process and read by all others.

    `open` returns it complete (read it with `block` and `load_heldout`), or empty while this process holds
    the harvest lock: the caller then fills it (`save_heldout`; `reset`, `append`…, `finish`, which
    ActivationStream does in its first epoch) and `finish` publishes it and lets waiting jobs in. A shared
    lock held until `release` keeps other jobs from evicting the cache while this one reads it.
    """

    def __init__(self, root: Path, producer: dict, dtype: str, log: Callable[[str], None],
                 shard_rows: int = SHARD_ROWS) -> None:
        self.root, self.producer, self.dtype, self.log, self.shard_rows = root, producer, dtype, log, shard_rows
        self.key = cache_key(**producer)
        self.folder = root / self.key
        self.meta: dict = {}
        self.n_rows, self.d = 0, None
        self.complete = False
        self._lock: BinaryIO | None = None  # the open lock file whose flock we hold
        self._partial: Path | None = None   # our unpublished folder while harvesting
        self._writer: ShardWriter | None = None
        self._reader: ShardReader | None = None
        self._heldout: dict | None = None  # the held-out file's manifest entry, once written

    @classmethod
    def open(cls, root: str | Path, producer: dict, *, dtype: str, max_bytes: int | None, expected_bytes: int,
             log: Callable[[str], None] = print, shard_rows: int = SHARD_ROWS) -> SharedCache:
        """The complete cache for `producer`, or an empty one for this process to harvest (room made for it)."""
        if dtype not in STORE_DTYPES:
            raise ValueError(f"cache dtype={dtype!r} is not supported; valid: {', '.join(STORE_DTYPES)}")
        if shard_rows < 1:
            raise ValueError(f"shard_rows={shard_rows} must be a positive number of rows per shard")
        root = Path(root)
        root.mkdir(parents=True, exist_ok=True)
        cache = cls(root, producer, dtype, log, shard_rows)
        cache._lock = open(root / f"{cache.key}.lock", "a+b")
        try:
            cache._wait_for_lock()
            if cache.complete:
                os.utime(cache.folder)  # its last use, for LRU eviction
            else:
                cache._prepare(max_bytes, expected_bytes)
        except BaseException:
            cache.release()
            raise
        return cache

    def _wait_for_lock(self) -> None:
        """Leave holding the shared lock on a complete cache, or the exclusive lock on an incomplete one."""
        said = False
        while True:
            if not try_flock(self._lock, fcntl.LOCK_SH):
                if not said:
                    self.log(f"waiting for another job to finish harvesting {self.folder} …")
                    said = True
                fcntl.flock(self._lock, fcntl.LOCK_SH)
            if self._read_meta():
                return
            fcntl.flock(self._lock, fcntl.LOCK_UN)
            if try_flock(self._lock, fcntl.LOCK_EX):
                if not self._read_meta():
                    return
                fcntl.flock(self._lock, fcntl.LOCK_UN)  # published between our two locks: read it, shared
                continue
            # Another opener holds a shared lock for a moment, or a harvest has just begun: look again soon.
            time.sleep(random.uniform(0.01, 0.1))

    def _read_meta(self) -> bool:
        # No manifest, another format (format 1's acts.bin), or a file of the wrong size (a copy cut short).
        meta = complete_manifest(self.folder)
        if meta is None:
            return False
        self.meta, self.n_rows, self.d, self.dtype = meta, meta["rows"], meta["d"], meta["dtype"]
        self.complete = True
        return True

    def _prepare(self, max_bytes: int | None, expected_bytes: int) -> None:
        # We hold the exclusive lock: anything under our key is a dead harvest's or an older layout's leftovers.
        for stale in [self.folder, *self.root.glob(f"{self.key}.partial-*")]:
            remove(stale)
        with flocked(self.root / ".budget.lock"):
            make_room(self.root, expected_bytes, max_bytes, self.log)
            self._partial = self.root / f"{self.key}.partial-{os.getpid()}-{secrets.token_hex(4)}"
            self._partial.mkdir()
            # Harvests running beside this one count it against the budget before it has grown.
            (self._partial / RESERVED_FILE).write_text(str(expected_bytes))

    def _harvesting(self, what: str) -> None:
        if self._partial is None:
            raise RuntimeError(f"{what}: the cache {self.folder} is not being harvested by this job "
                               f"({'complete' if self.complete else 'released'}); open it again")

    @contextmanager
    def _writing(self) -> Iterator[None]:
        """Any write failure drops the partial folder and the lock; a full disk becomes a one-line CacheError."""
        try:
            yield
        except OSError as err:
            written = self.n_rows * (self.d or 0) * STORE_DTYPES[self.dtype].itemsize
            self.release()
            if err.errno in (errno.ENOSPC, errno.EDQUOT):
                raise CacheError(f"the disk under {self.root} filled up while caching activations "
                                 f"({human(written)} written, nothing kept); {DISK_FIXES}") from None
            raise

    def save_heldout(self, chunks: list[ContextChunk]) -> None:
        """Keep the held-out contexts with their activations, so runs that reuse the cache skip them too."""
        self._harvesting("save_heldout")
        cat = (lambda name: torch.cat([getattr(c, name) for c in chunks]) if chunks else torch.empty(0))
        tensors = {"tokens": cat("tokens"), "keep": cat("keep"), "acts": cat("acts").to(STORE_DTYPES[self.dtype]),
                   "contexts": torch.tensor([len(c.tokens) for c in chunks], dtype=torch.int64),
                   "rows": torch.tensor([len(c.acts) for c in chunks], dtype=torch.int64),
                   "first": torch.tensor([c.first for c in chunks], dtype=torch.int64)}
        if chunks:
            self.d = chunks[0].acts.shape[1]
        with self._writing():
            write_synced(self._partial / HELDOUT_FILE, save({k: v.contiguous() for k, v in tensors.items()}))
            self._heldout = describe_file(self._partial, HELDOUT_FILE)

    def load_heldout(self) -> list[ContextChunk]:
        """The chunks given to `save_heldout`, equal and in the same order."""
        if not self.complete or not self.meta.get("heldout"):
            raise RuntimeError(f"the cache {self.folder} holds no held-out contexts"
                               f"{'' if self.complete else ' (it is not complete)'}")
        t = load_file(self.folder / self.meta["heldout"]["file"])
        if not len(t["contexts"]):
            return []
        tokens, keep = t["tokens"].split(t["contexts"].tolist()), t["keep"].split(t["contexts"].tolist())
        acts = t["acts"].split(t["rows"].tolist())
        return [ContextChunk(tokens=a, keep=b, acts=c, first=int(f))
                for a, b, c, f in zip(tokens, keep, acts, t["first"].tolist())]

    def reset(self) -> None:
        """Start the rows again (a harvest refilled from the start); the held-out contexts stay."""
        self._harvesting("reset")
        if self._writer is not None:
            self._writer.discard()
        self._writer = ShardWriter(self._partial, self.dtype, self.shard_rows)
        self.n_rows, self._reader = 0, None

    def append(self, chunk: torch.Tensor, token_ids: torch.Tensor | None = None) -> None:
        """Rows [n, d] and, optionally, the token [n] each sits on; a full shard goes to disk at once."""
        self._harvesting("append")
        if self._writer is None:
            self.reset()
        with self._writing():
            self._writer.append(chunk, token_ids)
        self.n_rows += len(chunk)
        self.d = chunk.shape[1]

    def finish(self) -> None:
        """Publish: shards and manifest.json synced, then one rename makes the folder visible whole."""
        self._harvesting("finish")
        if self._writer is None:
            self.reset()
        with self._writing():
            shards = self._writer.close()
            meta = make_manifest(producer=self.producer, dtype=self.dtype, d=self.d, shard_rows=self.shard_rows,
                                 shards=shards, token_ids=bool(self._writer.token_ids), heldout=self._heldout)
            write_synced(self._partial / MANIFEST_FILE, json.dumps(meta, indent=1, default=str).encode())
            fsync_dir(self._partial)
            os.rename(self._partial, self.folder)
            fsync_dir(self.root)
        self._partial, self._writer, self.meta, self.complete = None, None, meta, True
        os.utime(self.folder)
        # The shards open before the lock turns shared (flock drops it first), so even an eviction in between
        # cannot pull the rows away.
        self._reader = ShardReader(self.folder, meta)
        fcntl.flock(self._lock, fcntl.LOCK_SH)
        self.log(f"cached {self.describe()} in {self.folder}")

    def abort(self) -> None:
        """Drop an unfinished harvest: nothing is published, and the next job harvests afresh."""
        self.release()

    def release(self) -> None:
        """Unlock (others may evict the cache); an unfinished harvest's folder goes. Safe to call twice."""
        self._writer = None  # its shards lie in the partial folder, which goes now
        if self._partial is not None:
            remove(self._partial)  # before unlocking: a partial folder with a free lock means a dead harvest
            self._partial = None
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def __enter__(self) -> SharedCache:
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def __len__(self) -> int:
        return self.n_rows

    def _read(self, start: int, stop: int, name: str) -> torch.Tensor:
        if not self.complete:
            raise RuntimeError(f"the cache {self.folder} is not complete: finish it before reading rows")
        if self._reader is None:
            self._reader = ShardReader(self.folder, self.meta)
        return self._reader.read(start, stop, name)

    def block(self, start: int, stop: int) -> torch.Tensor:
        """Rows [start:stop] as [n, d], read across shard boundaries."""
        return self._read(start, stop, "acts")

    def token_ids(self, start: int, stop: int) -> torch.Tensor | None:
        """The token [n] rows [start:stop] sit on; None when the harvest gave no token ids."""
        return self._read(start, stop, "token_ids") if self.meta.get("token_ids") else None

    def shards(self) -> list[dict]:
        """The manifest's shard entries (file, rows, first, bytes, sha256, stats): ranks of a distributed job each
        take a disjoint set of them and read each with block(first, first + rows)."""
        return [dict(entry) for entry in self.meta.get("shards", [])]

    def describe(self) -> str:
        """'265,004 vectors × 576, float32, 610.6 MB in 5 shards, made 2026-05-09T07:35:25+00:00', for log lines."""
        size = human(cache_bytes(self.n_rows, self.d or 0, self.dtype))
        shards = len(self.meta.get("shards", []))
        made = f", made {self.meta['created']}" if self.meta.get("created") else ""
        return f"{self.n_rows:,} vectors × {self.d}, {self.dtype}, {size} in {shards} shard{'s' * (shards != 1)}{made}"


def make_room(root: Path, need: int, max_bytes: int | None, log: Callable[[str], None]) -> None:
    """Evict least-recently-used caches no job is using until `need` more bytes fit the budget and the disk.

    Nothing is evicted when even evicting them all would not make room: the CacheError says what would.
    """
    idle: list[tuple[float, int, Path]] = []  # (last used, bytes, folder) of caches nobody holds a lock on
    held: list[BinaryIO] = []
    busy = growing = 0  # bytes of caches in use; bytes that running harvests have reserved but not written yet
    try:
        for entry in root.iterdir():
            owner, _, suffix = entry.name.partition(".partial-")
            if not entry.is_dir() or not KEY_NAME.fullmatch(owner):
                continue
            size = folder_bytes(entry)
            lock = open(root / f"{owner}.lock", "a+b")
            if not try_flock(lock, fcntl.LOCK_EX):
                lock.close()
                busy += max(size, reserved(entry)) if suffix else size
                growing += max(reserved(entry) - size, 0) if suffix else 0
            elif suffix:  # a partial folder whose harvester is gone
                remove(entry)
                lock.close()
            else:
                held.append(lock)
                idle.append((entry.stat().st_mtime, size, entry))
        idle.sort()
        used = busy + sum(size for _, size, _ in idle)
        free = shutil.disk_usage(root).free - growing
        evictable = sum(size for _, size, _ in idle)
        if max_bytes is not None and busy + need > max_bytes:
            raise CacheError(f"caching these activations needs {human(need)} but the budget is {human(max_bytes)} "
                             f"under {root} and running jobs hold {human(busy)} of it; set "
                             f"activations.cache_max_gb={math.ceil((busy + need) / 1e8) / 10}, "
                             f"activations.cache_dir=… (a folder of its own) or activations.cache=memory")
        if free + evictable < need + DISK_MARGIN:
            raise CacheError(f"caching these activations needs {human(need + DISK_MARGIN)} free on the disk of "
                             f"{root} but only {human(free + evictable)} is, even after evicting every unused cache; "
                             f"{DISK_FIXES}")
        freed = 0
        for last_used, size, folder in idle:
            if (max_bytes is None or used - freed + need <= max_bytes) and free + freed >= need + DISK_MARGIN:
                break
            when = datetime.fromtimestamp(last_used).strftime("%Y-%m-%d %H:%M")
            log(f"evicting cached activations {folder} ({human(size)}, last used {when}) "
                f"to make room for {human(need)}")
            # Renamed to a partial name first: if we die half-way, the next job removes the rest.
            gone = root / f"{folder.name}.partial-evicted-{os.getpid()}-{secrets.token_hex(4)}"
            os.rename(folder, gone)
            remove(gone)
            freed += size
    finally:
        for lock in held:
            lock.close()


def try_flock(file: BinaryIO, mode: int) -> bool:
    """Lock `file` in `mode` (shared or exclusive) if no other open file holds a conflicting lock."""
    try:
        fcntl.flock(file, mode | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


@contextmanager
def flocked(path: Path) -> Iterator[None]:
    with open(path, "a+b") as file:
        fcntl.flock(file, fcntl.LOCK_EX)
        yield


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.iterdir() if f.is_file())


def reserved(partial: Path) -> int:
    try:
        return int((partial / RESERVED_FILE).read_text())
    except (OSError, ValueError):
        return 0


def remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
