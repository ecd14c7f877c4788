"""Activations harvested once per producer and shared on disk by every run and process that needs them.

A sweep of six SAE settings on one layer runs the language model once: the first job harvests into
root/<key>/ (key: a hash of the model, hook, data, context… that produced the vectors), the others wait
for it and then read its files. Under root:

    <key>/             a complete cache: acts.bin (raw rows), heldout.safetensors, meta.json (what made it)
    <key>.lock         flock: exclusive while a job harvests or evicts it, shared while jobs read it
    <key>.partial-*    a harvest in progress, published with one rename: a cut-off harvest is never read
    .budget.lock       one job at a time weighs the disk budget and evicts

flock(2) locks belong to an open file, and the kernel drops them when a process dies, even by SIGKILL:
a crashed job never blocks the next one, which also removes the crashed job's partial folder.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
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
from datetime import datetime, timezone
from pathlib import Path
from typing import BinaryIO

import torch
from safetensors.torch import load_file, save

from midisc.data.activations import STORE_DTYPES, ContextChunk

ACTS_FILE, HELDOUT_FILE, META_FILE, RESERVED_FILE = "acts.bin", "heldout.safetensors", "meta.json", "expected_bytes"
FORMAT = 1                # meta.json "format": a folder of another layout counts as incomplete and is replaced
DISK_MARGIN = 64 * 2**20  # free disk left after a harvest, for checkpoints, logs and the filesystem itself
KEY_NAME = re.compile(r"[0-9a-f]{16}")
DISK_FIXES = "free disk space, or set activations.cache_dir=… on a bigger disk or activations.cache=memory"


class CacheError(RuntimeError):
    """The activation cache cannot be written: budget or disk too small, or the disk filled up while writing."""


def cache_key(**producer) -> str:
    """A short hash of everything that determines the activations (model, hook, data, context, filters)."""
    return hashlib.sha256(json.dumps(producer, sort_keys=True, default=str).encode()).hexdigest()[:16]


def cache_bytes(rows: int, d: int, dtype: str, *, tokens: int = 0) -> int:
    """Bytes on disk for `rows` vectors of width d, plus `tokens` held-out token positions (int64 id + keep flag)."""
    return rows * d * STORE_DTYPES[dtype].itemsize + tokens * 9


def human(n: float) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB" if n >= 1e6 else f"{n / 1e3:.1f} kB"


def write_rows(file: BinaryIO, chunk: torch.Tensor) -> None:
    # bfloat16 has no numpy type: its bits travel as int16.
    bits = chunk.view(torch.int16) if chunk.dtype == torch.bfloat16 else chunk
    file.write(bits.contiguous().numpy().tobytes())


def read_rows(path: Path, n_rows: int, d: int | None, dtype: str) -> Callable[[int, int], torch.Tensor]:
    """A reader of rows [start:stop] from a raw file; the file opens now, so a later unlink cannot hurt.

    Plain reads, not a memory map: the pages of a map that an epoch has read count in the process's RSS, so
    a 2 GB cache read once looked like 2 GB of memory; read into fresh buffers, only the block in use does.
    """
    torch_dtype = STORE_DTYPES[dtype]
    if n_rows == 0:
        return lambda start, stop: torch.empty(0, d or 0, dtype=torch_dtype)
    row_bytes = d * torch.empty(0, dtype=torch_dtype).element_size()
    file = open(path, "rb")  # noqa: SIM115  lives as long as the reader: the closure holds it

    def block(start: int, stop: int) -> torch.Tensor:
        start, stop = max(start, 0), min(stop, n_rows)
        buffer = bytearray(max(stop - start, 0) * row_bytes)
        if buffer and os.preadv(file.fileno(), [buffer], start * row_bytes) != len(buffer):
            raise OSError(f"{path} is shorter than its {n_rows} rows of {d}; the cache is damaged, delete it")
        return torch.frombuffer(buffer, dtype=torch_dtype).view(-1, d) if buffer else torch.empty(0, d, dtype=torch_dtype)
    return block


class SharedCache:
    """One producer's activations under root/<key>/, harvested by one process and read by all others.

    `open` returns it complete (read it with `block` and `load_heldout`), or empty while this process holds
    the harvest lock: the caller then fills it (`save_heldout`; `reset`, `append`…, `finish`, which
    ActivationStream does in its first epoch) and `finish` publishes it and lets waiting jobs in. A shared
    lock held until `release` keeps other jobs from evicting the cache while this one reads it.
    """

    def __init__(self, root: Path, producer: dict, dtype: str, log: Callable[[str], None]) -> None:
        self.root, self.producer, self.dtype, self.log = root, producer, dtype, log
        self.key = cache_key(**producer)
        self.folder = root / self.key
        self.meta: dict = {}
        self.n_rows, self.d = 0, None
        self.complete = False
        self._lock: BinaryIO | None = None  # the open lock file whose flock we hold
        self._partial: Path | None = None   # our unpublished folder while harvesting
        self._file: BinaryIO | None = None
        self._read: Callable[[int, int], torch.Tensor] | None = None
        self._heldout: str | None = None

    @classmethod
    def open(cls, root: str | Path, producer: dict, *, dtype: str, max_bytes: int | None, expected_bytes: int,
             log: Callable[[str], None] = print) -> SharedCache:
        """The complete cache for `producer`, or an empty one for this process to harvest (room made for it)."""
        if dtype not in STORE_DTYPES:
            raise ValueError(f"cache dtype={dtype!r} is not supported; valid: {', '.join(STORE_DTYPES)}")
        root = Path(root)
        root.mkdir(parents=True, exist_ok=True)
        cache = cls(root, producer, dtype, log)
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
        try:
            meta = json.loads((self.folder / META_FILE).read_text())
        except (OSError, ValueError):
            return False
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
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
        self._heldout = HELDOUT_FILE

    def load_heldout(self) -> list[ContextChunk]:
        """The chunks given to `save_heldout`, equal and in the same order."""
        if not self.complete or not self.meta.get("heldout"):
            raise RuntimeError(f"the cache {self.folder} holds no held-out contexts"
                               f"{'' if self.complete else ' (it is not complete)'}")
        t = load_file(self.folder / self.meta["heldout"])
        if not len(t["contexts"]):
            return []
        tokens, keep = t["tokens"].split(t["contexts"].tolist()), t["keep"].split(t["contexts"].tolist())
        acts = t["acts"].split(t["rows"].tolist())
        return [ContextChunk(tokens=a, keep=b, acts=c, first=int(f))
                for a, b, c, f in zip(tokens, keep, acts, t["first"].tolist())]

    def reset(self) -> None:
        self._harvesting("reset")
        with self._writing():
            if self._file is not None:
                self._file.close()
            self._file = open(self._partial / ACTS_FILE, "wb")
        self.n_rows, self._read = 0, None

    def append(self, chunk: torch.Tensor) -> None:
        self._harvesting("append")
        chunk = chunk.to(STORE_DTYPES[self.dtype])
        with self._writing():
            write_rows(self._file, chunk)
        self.n_rows += len(chunk)
        self.d = chunk.shape[1]

    def finish(self) -> None:
        """Publish: data and meta.json synced, then one rename makes the folder visible whole."""
        self._harvesting("finish")
        if self._file is None:
            self.reset()
        meta = {"format": FORMAT, "rows": self.n_rows, "d": self.d, "dtype": self.dtype, "producer": self.producer,
                "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "heldout": self._heldout,
                "key": self.key}
        with self._writing():
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            self._file = None
            write_synced(self._partial / META_FILE, json.dumps(meta, indent=1, default=str).encode())
            fsync_dir(self._partial)
            os.rename(self._partial, self.folder)
            fsync_dir(self.root)
        self._partial, self.meta, self.complete = None, meta, True
        os.utime(self.folder)
        # The map opens before the lock turns shared, so even an eviction in between cannot pull the rows away.
        self._read = read_rows(self.folder / ACTS_FILE, self.n_rows, self.d, self.dtype)
        fcntl.flock(self._lock, fcntl.LOCK_SH)
        self.log(f"cached {self.describe()} in {self.folder}")

    def abort(self) -> None:
        """Drop an unfinished harvest: nothing is published, and the next job harvests afresh."""
        self.release()

    def release(self) -> None:
        """Unlock (others may evict the cache); an unfinished harvest's folder goes. Safe to call twice."""
        if self._file is not None:
            self._file.close()
            self._file = None
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

    def block(self, start: int, stop: int) -> torch.Tensor:
        if self._read is None:
            self._read = read_rows(self.folder / ACTS_FILE, self.n_rows, self.d, self.dtype)
        return self._read(start, stop)

    def describe(self) -> str:
        """'265,004 vectors × 576, float32, 610.6 MB, made 2026-05-09T07:35:25+00:00', for log lines."""
        size = human(cache_bytes(self.n_rows, self.d or 0, self.dtype))
        made = f", made {self.meta['created']}" if self.meta.get("created") else ""
        return f"{self.n_rows:,} vectors × {self.d}, {self.dtype}, {size}{made}"


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


def write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as file:
        file.write(data)
        file.flush()
        os.fsync(file.fileno())


def fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
