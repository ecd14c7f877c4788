"""Several hooks from one pass of the language model: each batch of contexts runs once, up to the deepest
hooked module, and every hook's filtered vectors go to that hook's cache.

A job training SAEs on layers 4, 8, 15 and 24 of a 30-block model runs 24 blocks per batch instead of the
4 + 8 + 15 + 24 = 51 of four separate harvests, loads the weights and tokenises the corpus once. The caches it
fills are the ones separate runs would fill (same chunks, row for row: `harvest_many` filters each hook as a
harvest of it alone does), so each hook's run then trains exactly as a run that found its cache complete.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from midisc.data.activations import ActivationCache, ContextChunk, harvest_many
from midisc.data.cache import SharedCache
from midisc.data.recipe import Source


def prefill(sources: Sequence[Source], caches: Sequence[ActivationCache], train_contexts: torch.Tensor,
            heldout_contexts: torch.Tensor, max_vectors: int | None) -> list[list[ContextChunk]]:
    """Harvest the held-out and training activations of every source (one model, several hooks) in one pass
    each; the training vectors fill `caches` (empty ones, in the sources' order), which are finished and
    published at the end. Returns each source's held-out chunks, which a disk cache also keeps."""
    if not sources:
        return []
    model, modules = sources[0].model, [source.module for source in sources]
    options = sources[0].harvest_options()  # the recipes differ in their hook alone
    many = f" of {len(sources)} hooks" if len(sources) > 1 else ""
    heldout: list[list[ContextChunk]] = [[] for _ in sources]
    for chunks in harvest_many(model, modules, heldout_contexts, progress=f"held-out activations{many}", **options):
        for kept, chunk in zip(heldout, chunks):
            kept.append(chunk)
    for cache, chunks in zip(caches, heldout):
        if isinstance(cache, SharedCache) and len(heldout_contexts):  # a part of a split harvest may hold none
            cache.save_heldout(chunks)
        cache.reset()
    left = [max_vectors] * len(sources)  # None: every vector
    try:
        for chunks in harvest_many(model, modules, train_contexts, progress=f"training activations{many}",
                                   **options):
            for i, (cache, chunk) in enumerate(zip(caches, chunks)):
                rows = chunk.acts if left[i] is None else chunk.acts[:max(left[i], 0)]
                if len(rows):
                    cache.append(rows)
                if left[i] is not None:
                    left[i] -= len(rows)
            if all(n is not None and n <= 0 for n in left):  # the model runs no further than the rows needed
                break
    except BaseException:  # a harvest cut short publishes nothing
        for cache in caches:
            cache.abort()
        raise
    for cache in caches:
        cache.finish()
    return heldout
