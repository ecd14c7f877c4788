"""The on-disk layout of one producer's activations: safetensors shards, a held-out file and a manifest.

    shard-00000.safetensors …  `acts` [rows, d] in the cache dtype and, when the harvest gave them,
                               `token_ids` [rows] int32 (the token each vector sits on); every shard holds
                               shard_rows rows but the last, which may be shorter
    heldout.safetensors        the held-out contexts with their activations (cache.SharedCache writes it)
    manifest.json              written last: what made the rows, and per shard its rows, first row, bytes,
                               sha256 and norm statistics

Shards are plain safetensors files (`safetensors.torch.load_file` reads them). They are written here by hand
so that the one buffered shard goes to disk without a second copy and its sha256 is taken on the way; reads
take the data offsets from the header and read rows with preadv into fresh buffers (see ShardReader).
`verify` checks a folder against its manifest; `merge.py` joins the parts of a harvest split across machines.
"""

from __future__ import annotations

import hashlib
import json
import os
from bisect import bisect_right
from datetime import datetime, timezone
from pathlib import Path

import torch

from midisc.data.activations import STORE_DTYPES

FORMAT = 2                # manifest "format": a folder of another layout counts as incomplete and is replaced
MANIFEST_FILE, HELDOUT_FILE = "manifest.json", "heldout.safetensors"
SHARD_ROWS = 65_536       # rows per shard: 151 MB of float32 at d=576, few enough files for any budget
STATS_ROWS = 8192         # rows per float32 copy while taking a shard's norms: a bfloat16 shard is not copied whole
HEADER_LIMIT = 100_000_000  # bytes: the largest header safetensors itself accepts
SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.int32: "I32"}
MANIFEST_KEYS = ("format", "key", "producer", "dtype", "d", "rows", "shard_rows", "token_ids", "heldout", "created",
                 "shards")
SHARD_KEYS = ("file", "rows", "first", "bytes", "sha256", "stats")


class ShardError(ValueError):
    """A cache folder is damaged or not a cache, or part folders cannot be merged; the message says which."""


def cache_key(**producer) -> str:
    """A short hash of everything that determines the activations (model, hook, data, context, filters)."""
    return hashlib.sha256(json.dumps(producer, sort_keys=True, default=str).encode()).hexdigest()[:16]


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.safetensors"


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


def file_sha256(path: Path) -> str:
    with open(path, "rb") as file:
        return hashlib.file_digest(file, "sha256").hexdigest()


def sync_file(path: Path) -> None:
    with open(path, "rb") as file:
        os.fsync(file.fileno())


def write_shard(path: Path, tensors: dict[str, torch.Tensor]) -> tuple[int, str]:
    """Write `tensors` as one safetensors file, not yet synced; (bytes, sha256) of what was written."""
    header, views, offset = {}, [], 0
    for name, tensor in tensors.items():
        data = memoryview(tensor.contiguous().view(torch.uint8).numpy()).cast("B")  # the tensor's bytes, not a copy
        header[name] = {"dtype": SAFETENSORS_DTYPES[tensor.dtype], "shape": list(tensor.shape),
                        "data_offsets": [offset, offset + len(data)]}
        views.append(data)
        offset += len(data)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-(8 + len(text)) % 8)  # as safetensors pads it: the data starts 8-byte aligned
    digest = hashlib.sha256()
    with open(path, "wb") as file:
        for piece in (len(text).to_bytes(8, "little"), text, *views):
            file.write(piece)
            digest.update(piece)
    return 8 + len(text) + offset, digest.hexdigest()


def row_stats(acts: torch.Tensor) -> dict[str, float]:
    """Mean norm, max norm and mean squared norm of rows [n, d], taken in float32."""
    norm_sum = square_sum = top = 0.0
    for block in acts.split(STATS_ROWS):
        squares = block.float().square().sum(dim=1)
        norms = squares.sqrt()
        norm_sum += norms.sum(dtype=torch.float64).item()
        square_sum += squares.sum(dtype=torch.float64).item()
        top = max(top, norms.max().item())
    return {"mean_norm": norm_sum / len(acts), "max_norm": top, "mean_sq_norm": square_sum / len(acts)}


class ShardWriter:
    """Rows appended in order become shard files of `shard_rows` rows in `folder`, the last one shorter.

    One shard's rows are buffered, in tensors allocated once: memory stays flat however long the harvest.
    """

    def __init__(self, folder: Path, dtype: str, shard_rows: int = SHARD_ROWS) -> None:
        if shard_rows < 1:
            raise ValueError(f"shard_rows={shard_rows} must be a positive number of rows")
        self.folder, self.dtype_name, self.dtype, self.shard_rows = folder, dtype, STORE_DTYPES[dtype], shard_rows
        self.entries: list[dict] = []
        self.rows, self.d = 0, None
        self.token_ids: bool | None = None  # whether the appends give token ids: the first one decides
        self._acts: torch.Tensor | None = None  # [shard_rows, d] the shard being filled
        self._ids: torch.Tensor | None = None   # [shard_rows] int32 its token ids
        self._held = self._written = 0

    def append(self, acts: torch.Tensor, token_ids: torch.Tensor | None = None) -> None:
        """Buffer rows [n, d] (and their token ids [n]); every full shard goes to disk at once."""
        if acts.ndim != 2:
            raise ValueError(f"rows of shape {tuple(acts.shape)} are not vectors; append [n, d]")
        if self.d is not None and acts.shape[1] != self.d:
            raise ValueError(f"rows of shape {tuple(acts.shape)} cannot join a cache of width {self.d}; "
                             f"append [n, {self.d}]")
        if self.token_ids is not None and self.token_ids != (token_ids is not None):
            raise ValueError(f"token_ids {'missing' if self.token_ids else 'given'} here but not before; "
                             "give them with every append or with none")
        if token_ids is not None and tuple(token_ids.shape) != (len(acts),):
            raise ValueError(f"token_ids of shape {tuple(token_ids.shape)} for {len(acts)} rows; give [{len(acts)}]")
        if self._acts is None:
            # Never-touched pages are not resident: a harvest smaller than one shard costs only what it holds.
            self.d, self.token_ids = acts.shape[1], token_ids is not None
            self._acts = torch.empty(self.shard_rows, self.d, dtype=self.dtype)
            self._ids = torch.empty(self.shard_rows, dtype=torch.int32) if self.token_ids else None
        done = 0
        while done < len(acts):
            take = min(len(acts) - done, self.shard_rows - self._held)
            self._acts[self._held:self._held + take] = acts[done:done + take]
            if token_ids is not None:
                self._ids[self._held:self._held + take] = token_ids[done:done + take]
            self._held, done = self._held + take, done + take
            if self._held == self.shard_rows:
                self._flush()
        self.rows += len(acts)

    def _flush(self) -> None:
        rows, name = self._held, shard_name(len(self.entries))
        tensors = {"token_ids": self._ids[:rows]} if self.token_ids else {}
        tensors["acts"] = self._acts[:rows]  # ids first: behind bfloat16 rows they could start misaligned for int32
        size, digest = write_shard(self.folder / name, tensors)
        self.entries.append({"file": name, "rows": rows, "first": self._written, "bytes": size, "sha256": digest,
                             "stats": row_stats(self._acts[:rows])})
        self._held, self._written = 0, self._written + rows

    def close(self) -> list[dict]:
        """Write the last, shorter shard and sync them all; the manifest entries of every shard."""
        if self._held:
            self._flush()
        self._acts = self._ids = None
        # Synced here rather than one by one: the disk writes a shard back while the harvest fills the next.
        for entry in self.entries:
            sync_file(self.folder / entry["file"])
        return self.entries

    def discard(self) -> None:
        """Forget every row: the written shards go, and the next append starts shard 0 again."""
        for entry in self.entries:
            (self.folder / entry["file"]).unlink(missing_ok=True)
        self.__init__(self.folder, self.dtype_name, self.shard_rows)


def tensor_offsets(file, path: Path) -> dict[str, tuple[str, list[int], int, int]]:
    """{name: (dtype, shape, first byte, end byte)} of an open safetensors file, offsets from the file's start."""
    head = os.pread(file.fileno(), 8, 0)
    size = int.from_bytes(head, "little") if len(head) == 8 else -1
    if not 0 < size <= HEADER_LIMIT:
        raise ShardError(f"{path} is not a safetensors file (header length {size}); the cache is damaged: delete it")
    try:
        header = json.loads(os.pread(file.fileno(), size, 8))
        return {name: (e["dtype"], e["shape"], 8 + size + e["data_offsets"][0], 8 + size + e["data_offsets"][1])
                for name, e in header.items() if name != "__metadata__"}
    except (ValueError, KeyError, TypeError, IndexError, AttributeError):
        raise ShardError(f"{path} has a damaged safetensors header; the cache is damaged: delete it") from None


class ShardReader:
    """Rows [start:stop] of a complete folder, read across shard boundaries. Every shard opens now, so a later
    unlink (an eviction) cannot pull rows away from a reader that exists.

    Plain reads, not a memory map (safe_open maps the file): the pages of a map that an epoch has read count
    in the process's RSS, so a 2 GB cache read once looked like 2 GB of memory; read into fresh buffers, only
    the block in use does.
    """

    def __init__(self, folder: Path, manifest: dict) -> None:
        self.dtype, self.d, self.rows = STORE_DTYPES[manifest["dtype"]], manifest["d"], manifest["rows"]
        self.folder = folder
        self._firsts = [entry["first"] for entry in manifest["shards"]]
        self._files, self._layouts = [], []
        for entry in manifest["shards"]:
            path = folder / entry["file"]
            file = open(path, "rb")  # noqa: SIM115  lives as long as the reader
            layout = tensor_offsets(file, path)
            want = {"acts": (SAFETENSORS_DTYPES[self.dtype], [entry["rows"], self.d])}
            if manifest["token_ids"]:
                want["token_ids"] = ("I32", [entry["rows"]])
            if any(layout.get(name, (None, None))[:2] != (dtype, shape) for name, (dtype, shape) in want.items()):
                raise ShardError(f"{path} does not hold the {entry['rows']} rows of {self.d} its manifest says; "
                                 "the cache is damaged: delete it")
            self._files.append(file)
            self._layouts.append(layout)

    def read(self, start: int, stop: int, name: str = "acts") -> torch.Tensor:
        """Tensor `name` ("acts" [n, d] or "token_ids" [n]) for rows [start:stop], clipped to the rows there are."""
        start, stop = max(start, 0), min(stop, self.rows)
        dtype, width = (self.dtype, self.d) if name == "acts" else (torch.int32, 1)
        row_bytes = (width or 0) * dtype.itemsize
        buffer = bytearray(max(stop - start, 0) * row_bytes)
        view, row = memoryview(buffer), start
        shard = bisect_right(self._firsts, start) - 1
        while row < stop:
            first, (_, shape, offset, _) = self._firsts[shard], self._layouts[shard][name]
            take = min(stop, first + shape[0]) - row
            piece = view[(row - start) * row_bytes:(row - start + take) * row_bytes]
            if os.preadv(self._files[shard].fileno(), [piece], offset + (row - first) * row_bytes) != len(piece):
                raise ShardError(f"{self._files[shard].name} is shorter than its header says; the cache is "
                                 "damaged: delete it")
            row, shard = row + take, shard + 1
        if not buffer:
            return torch.empty(0, self.d or 0, dtype=dtype) if name == "acts" else torch.empty(0, dtype=dtype)
        rows = torch.frombuffer(buffer, dtype=dtype)
        return rows.view(-1, width) if name == "acts" else rows


def make_manifest(*, producer: dict, dtype: str, d: int | None, shard_rows: int, shards: list[dict],
                  token_ids: bool, heldout: dict | None) -> dict:
    """The manifest of a folder holding `shards` (their entries) and the held-out file `heldout` describes."""
    return {"format": FORMAT, "key": cache_key(**producer), "producer": producer, "dtype": dtype, "d": d,
            "rows": sum(entry["rows"] for entry in shards), "shard_rows": shard_rows, "token_ids": token_ids,
            "heldout": heldout, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "shards": shards}


def describe_file(folder: Path, name: str) -> dict:
    """A manifest's entry for a file other than a shard: {file, bytes, sha256}."""
    return {"file": name, "bytes": (folder / name).stat().st_size, "sha256": file_sha256(folder / name)}


def load_manifest(folder: Path) -> dict:
    """The manifest of a cache folder; ShardError (one line) when it has none, or one of another format."""
    path = folder / MANIFEST_FILE
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        old = " (it has format 1's acts.bin: harvest again)" if (folder / "acts.bin").exists() else ""
        raise ShardError(f"{folder} holds no {MANIFEST_FILE}: it is not a complete activation cache{old}") from None
    except (OSError, ValueError) as err:
        raise ShardError(f"{path} cannot be read ({err}); the cache is damaged: delete it") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else None
        raise ShardError(f"{path} is of format {found!r}, not {FORMAT}: an older layout; harvest again")
    shards = manifest.get("shards")
    if (any(key not in manifest for key in MANIFEST_KEYS) or not isinstance(shards, list)
            or not all(isinstance(e, dict) and all(k in e for k in SHARD_KEYS) for e in shards)
            or [e["first"] for e in shards] != [sum(e["rows"] for e in shards[:i]) for i in range(len(shards))]
            or manifest["rows"] != sum(e["rows"] for e in shards) or manifest["dtype"] not in STORE_DTYPES):
        raise ShardError(f"{path} lacks entries or its shards' rows do not add up; the cache is damaged: delete it")
    return manifest


def files_of(manifest: dict) -> list[dict]:
    """The entries {file, bytes, sha256} of every file the manifest describes: its shards, then the held-out file."""
    return manifest["shards"] + ([manifest["heldout"]] if manifest["heldout"] else [])


def size_problems(folder: Path, manifest: dict) -> list[str]:
    """One line per file the manifest names that is missing or of another size: a cheap check for each open."""
    problems = []
    for entry in files_of(manifest):
        try:
            size = (folder / entry["file"]).stat().st_size
        except OSError:
            problems.append(f"{folder / entry['file']} is missing")
            continue
        if size != entry["bytes"]:
            problems.append(f"{folder / entry['file']} is {size:,} bytes, its manifest says {entry['bytes']:,}")
    return problems


def complete_manifest(folder: Path) -> dict | None:
    """The manifest of a complete folder whose files all have their sizes, else None: harvest it again."""
    try:
        manifest = load_manifest(folder)
    except ShardError:
        return None
    return None if size_problems(folder, manifest) else manifest


def verify(folder: Path) -> list[str]:
    """Every file's size and sha256 against the manifest: one line per problem, none when the folder is sound."""
    folder = Path(folder)
    try:
        manifest = load_manifest(folder)
    except ShardError as err:
        return [str(err)]
    problems = size_problems(folder, manifest)
    for entry in files_of(manifest):
        path = folder / entry["file"]
        if not any(p.startswith(f"{path} ") for p in problems) and (digest := file_sha256(path)) != entry["sha256"]:
            problems.append(f"{path}: sha256 {digest[:16]}… differs from its manifest's {entry['sha256'][:16]}…")
    return problems
