"""The activation stream: hooked forwards, token filtering, a shuffling buffer, and a cache.

Epoch 1 runs the language model over the packed contexts and writes every kept activation vector to
the cache while the shuffling buffer feeds the SAE; later epochs read the cache back in a fresh random
order and never run the language model again.

Which tokens are kept matters more than it looks: in SmolLM2's residual stream position 0, every
separator and a few other tokens have norms of 1e3–2.6e4 where typical tokens have 128–320; together
they carry ~70 % of the squared norm, so leaving them in makes MSE and FVU measure those few tokens.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Protocol

import torch
from torch.utils.data import IterableDataset
from tqdm.auto import tqdm

from midisc.data.lm import capture_many

STORE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def keep_mask(tokens: torch.Tensor, special_ids: Iterable[int]) -> torch.Tensor:
    """[B, T] bool: False at position 0 and at special tokens (separators, BOS, padding)."""
    keep = ~torch.isin(tokens, torch.tensor(sorted(set(special_ids)), dtype=tokens.dtype, device=tokens.device))
    keep[:, 0] = False
    return keep


def drop_outliers(acts: torch.Tensor, keep: torch.Tensor, outlier_factor: float | None) -> torch.Tensor:
    """keep [B, T] minus the tokens whose norm exceeds outlier_factor × the median norm of the kept ones."""
    if not outlier_factor or not keep.any():
        return keep
    norms = acts.float().norm(dim=-1).to(keep.device)
    return keep & (norms <= outlier_factor * norms[keep].median())


def filter_activations(acts: torch.Tensor, keep: torch.Tensor, outlier_factor: float | None) -> torch.Tensor:
    """acts [B, T, d] -> [n, d]: the kept tokens, minus norm outliers (> outlier_factor × median norm)."""
    return acts[drop_outliers(acts, keep, outlier_factor).to(acts.device)]


@dataclass
class ContextChunk:
    """Activations that remember where they came from, for feature analysis and concept tests."""

    tokens: torch.Tensor  # [b, T] token ids of these contexts
    keep: torch.Tensor    # [b, T] bool: the positions whose activations are in `acts`
    acts: torch.Tensor    # [n, d] the kept activations, in row-major order of `keep`
    first: int            # index of tokens[0] among all contexts of the harvest


def harvest_contexts(model, module, contexts: torch.Tensor, **options) -> Iterator[ContextChunk]:
    """Run `model` up to `module` over contexts [N, T]; yield filtered activations with their positions, on the CPU.
    `options`: those of `harvest_many`."""
    for chunks in harvest_many(model, [module], contexts, **options):
        yield chunks[0]


def harvest_many(model, modules, contexts: torch.Tensor, *, special_ids: Iterable[int], batch_contexts: int = 32,
                 outlier_factor: float | None = 4.0, store_dtype: str = "float32", transcode: bool = False,
                 progress: str | None = None) -> Iterator[list[ContextChunk]]:
    """One forward per batch of contexts up to the deepest of `modules`; yield each module's chunk of the batch,
    filtered as `harvest_contexts` filters it alone (norm outliers are judged per module), so the chunks are
    the ones separate harvests would give. With `transcode`, each vector is a module's input and output side by
    side (`lm.capture_many`), and an outlier is judged by the norm of the two together."""
    special = sorted(set(special_ids))
    starts = range(0, len(contexts), batch_contexts)
    for start in tqdm(starts, desc=progress, unit="batch", disable=True if progress is None else None, leave=False):
        tokens = contexts[start:start + batch_contexts]
        chunks = []
        with torch.inference_mode():
            outputs = capture_many(model, modules, tokens, transcode=transcode)
        for acts in outputs:
            with torch.inference_mode():
                keep = drop_outliers(acts, keep_mask(tokens, special).to(acts.device), outlier_factor)
                kept = acts[keep]
            # Cloning outside inference mode gives an ordinary tensor that autograd may use later.
            chunks.append(ContextChunk(tokens=tokens.cpu(), keep=keep.cpu().clone(),
                                       acts=kept.to("cpu", STORE_DTYPES[store_dtype]).clone(), first=start))
        yield chunks


def harvest(model, module, contexts: torch.Tensor, **kwargs) -> Iterator[torch.Tensor]:
    """The activation vectors of `harvest_contexts` alone: chunks [n, d] for training."""
    for chunk in harvest_contexts(model, module, contexts, **kwargs):
        yield chunk.acts


def take_rows(chunks: Iterable[torch.Tensor], limit: int | None) -> Iterator[torch.Tensor]:
    """The first `limit` rows of chunks [n, d] (all of them when limit is None); stops pulling once it has them,
    so the language model runs no further than the rows it needs."""
    left = limit
    for chunk in chunks:
        if left is not None and len(chunk) >= left:
            if left:
                yield chunk[:left]
            return
        if left is not None:
            left -= len(chunk)
        yield chunk


def shuffled_batches(chunks: Iterable[torch.Tensor], batch_size: int, buffer_size: int,
                     generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Mix chunks in a buffer and yield batches [batch_size, d]; the last partial batch is dropped.

    Each time the buffer holds `buffer_size` rows it is permuted and all but half are emitted, so a batch
    draws from many contexts rather than from the few a single forward produced.
    """
    buffer_size = max(buffer_size, 2 * batch_size)
    pool: list[torch.Tensor] = []
    held = 0
    for chunk in chunks:
        pool.append(chunk)
        held += len(chunk)
        if held < buffer_size:
            continue
        rows = torch.cat(pool)
        rows = rows[torch.randperm(len(rows), generator=generator)]
        emit = (len(rows) - buffer_size // 2) // batch_size * batch_size
        for start in range(0, emit, batch_size):
            yield rows[start:start + batch_size]
        pool, held = [rows[emit:]], len(rows) - emit
    if held >= batch_size:
        rows = torch.cat(pool)
        rows = rows[torch.randperm(len(rows), generator=generator)]
        for start in range(0, len(rows) - batch_size + 1, batch_size):
            yield rows[start:start + batch_size]


class MemoryCache:
    """Activation vectors kept in RAM: fastest, bounded by memory (262k × 576 floats ≈ 600 MB)."""

    def __init__(self) -> None:
        self.rows: torch.Tensor | None = None
        self._parts: list[torch.Tensor] = []
        self.complete = False

    def reset(self) -> None:
        self.rows, self._parts, self.complete = None, [], False

    def append(self, chunk: torch.Tensor) -> None:
        self._parts.append(chunk)

    def finish(self) -> None:
        self.rows = torch.cat(self._parts) if self._parts else torch.empty(0)
        self._parts, self.complete = [], True

    def abort(self) -> None:
        self.reset()

    def __len__(self) -> int:
        return len(self.rows) if self.complete else sum(len(p) for p in self._parts)

    def block(self, start: int, stop: int) -> torch.Tensor:
        return self.rows[start:stop]


class ActivationCache(Protocol):
    """Where epoch 1 leaves the vectors for later epochs: MemoryCache or cache.SharedCache."""

    complete: bool

    def reset(self) -> None: ...
    def append(self, chunk: torch.Tensor) -> None: ...
    def finish(self) -> None: ...
    def abort(self) -> None: ...
    def block(self, start: int, stop: int) -> torch.Tensor: ...
    def __len__(self) -> int: ...


class ActivationStream(IterableDataset):
    """Batches of activation vectors [batch_size, d] for the SAE; one iteration is one epoch."""

    def __init__(self, harvest_chunks: Callable[[], Iterator[torch.Tensor]], cache: ActivationCache, *,
                 batch_size: int, buffer_size: int, expected_rows: int, seed: int = 0,
                 block_rows: int = 4096) -> None:
        self.harvest_chunks = harvest_chunks
        self.cache = cache
        self.batch_size = batch_size
        self.buffer_size = buffer_size
        self.expected_rows = expected_rows  # an upper bound before harvesting: kept positions of the contexts
        self.block_rows = block_rows
        self.seed = seed
        self.epoch = 0
        # Optional () -> (epoch, batches of it already trained on), from the trainer; see checkpoints.py.
        self.position: Callable[[], tuple[int, int]] | None = None
        # Optional () -> (rank, world size) of a distributed run, from the trainer: each rank reads its own blocks.
        self.shard: Callable[[], tuple[int, int]] | None = None
        self.harvested = 0  # vectors the language model gave in epoch 1, even when it was cut short
        self.reused_cache = cache.complete  # a complete disk cache from an earlier run with the same producer

    def _harvest_into_cache(self) -> Iterator[torch.Tensor]:
        self.cache.reset()
        self.harvested = 0
        try:
            for chunk in self.harvest_chunks():
                self.cache.append(chunk)
                self.harvested += len(chunk)
                yield chunk
        except BaseException:  # GeneratorExit too: an epoch cut short (max_steps) must not publish part of it
            self.cache.abort()
            raise
        self.cache.finish()

    def _cached_chunks(self, generator: torch.Generator, rank: int = 0, world: int = 1) -> Iterator[torch.Tensor]:
        # Blocks in random order, then the buffer permutes rows across blocks: reads stay sequential on disk.
        size = self._block(world)
        starts = torch.arange(0, len(self.cache), size)
        order = starts[torch.randperm(len(starts), generator=generator)].tolist()
        if world > 1:  # disjoint full blocks, as many for every rank (see `_shared_blocks`); the rest sit out
            order = [start for start in order if start + size <= len(self.cache)]
            order = order[rank:self._shared_blocks(world) * world:world]
        for start in order:
            yield self.cache.block(start, min(start + size, len(self.cache)))

    def _block(self, world: int) -> int:
        """Rows per block: `block_rows`, or in a distributed run small enough that every rank gets 16 blocks or
        more, so what sits out (see `_shared_blocks`) stays a sliver of a small cache."""
        return self.block_rows if world == 1 else max(1, min(self.block_rows, len(self.cache) // (16 * world)))

    def _shared_blocks(self, world: int) -> int:
        """Full blocks each rank of a distributed run reads per epoch: the same number everywhere, so every rank
        trains the same number of steps (a rank that ran out first would leave the others waiting in a gradient
        all-reduce). Fewer than `world` blocks and the short last one sit out each epoch, other ones each time:
        under 1/16 of the rows."""
        return len(self.cache) // self._block(world) // world

    def _sharding(self) -> tuple[int, int]:
        rank, world = self.shard() if self.shard else (0, 1)
        if world > 1 and not self.cache.complete:
            raise RuntimeError("a distributed run reads its activations from a complete cache; harvest it first "
                               "(data/prefill.py)")
        if world > 1 and self._shared_blocks(world) * self._block(world) < self.batch_size:
            raise ValueError(f"{len(self.cache):,} activation vectors are too few for {world} processes to get one "
                             f"batch of {self.batch_size:,} each; raise max_samples or lower batch_size or "
                             "trainer.devices")
        return rank, world

    def __iter__(self) -> Iterator[torch.Tensor]:
        # Asked at the first batch, not when iter() is called: a resumed trainer knows its place only then.
        epoch, skip = self.position() if self.position else (self.epoch, 0)
        self.epoch = epoch + 1
        if epoch > 0 and not self.cache.complete:
            # A run resumed in a later epoch finds its memory cache empty. Epoch 1's harvest fills it again, row
            # for row as before, so this epoch serves the same shuffled cached order as it would have without
            # the restart: a fresh harvest comes in corpus order, and skipping the trained batches of it would
            # skip the wrong vectors.
            for _ in tqdm(self._harvest_into_cache(), desc="refilling the activation cache", unit="chunk",
                          leave=False, disable=None):
                pass
        rank, world = self._sharding()
        generator = torch.Generator().manual_seed(self.seed + epoch)  # one order for all ranks: they split it
        chunks = self._cached_chunks(generator, rank, world) if self.cache.complete else self._harvest_into_cache()
        batches = shuffled_batches(chunks, self.batch_size, self.buffer_size, generator)
        try:
            for i, batch in enumerate(batches):
                if i >= skip:  # a resumed epoch replays its seeded order up to where the checkpoint was
                    yield batch
        finally:
            batches.close()  # an epoch cut short reaches _harvest_into_cache, which must not publish it

    def __len__(self) -> int:
        _, world = self._sharding()
        rows = len(self.cache) if self.cache.complete else self.expected_rows
        if world > 1:
            rows = self._shared_blocks(world) * self._block(world)
        return max(rows // self.batch_size, 1)

    @property
    def n_rows(self) -> int:
        """Activation vectors in one epoch (known once the first epoch has run)."""
        return len(self.cache) if self.cache.complete else self.harvested
